"""CacheSage and its transition model, tested directly (no Kafka)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from streams import events as ev
from policy_workers.cachesage import CacheSage
from policy_workers.transitions import TransitionModel

AGENTS = ["planner", "coder", "reviewer", "tester"]
CHAIN = np.array([[0.0, 0.7, 0.2, 0.1],
                  [0.1, 0.1, 0.6, 0.2],
                  [0.5, 0.4, 0.0, 0.1],
                  [0.8, 0.1, 0.1, 0.0]])


def walk(chain: np.ndarray, steps: int, seed: int, start: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    states = [start]
    for _ in range(steps):
        states.append(int(rng.choice(len(chain), p=chain[states[-1]])))
    return states


def learned(model: TransitionModel) -> np.ndarray:
    order = [model.index[a] for a in AGENTS]
    return model.matrix()[np.ix_(order, order)]


@pytest.mark.parametrize("decay, steps, tolerance", [(1.0, 5000, 0.05), (0.995, 5000, 0.12)])
def test_learned_matrix_converges_on_a_known_chain(decay, steps, tolerance):
    model = TransitionModel(decay=decay, prior_strength=0.5)
    states = walk(CHAIN, steps, seed=1)
    for a, b in zip(states, states[1:]):
        model.observe(AGENTS[a], AGENTS[b])
    assert np.abs(learned(model) - CHAIN).max() <= tolerance


def test_decay_tracks_a_switched_chain_where_plain_counts_do_not():
    switched = CHAIN[[1, 2, 3, 0]]  # each agent now behaves like the next one did
    decayed, plain = TransitionModel(decay=0.97), TransitionModel(decay=1.0)
    before, after = walk(CHAIN, 3000, seed=2), walk(switched, 600, seed=3)
    for states in (before, after):
        for a, b in zip(states, states[1:]):
            decayed.observe(AGENTS[a], AGENTS[b])
            plain.observe(AGENTS[a], AGENTS[b])
    assert np.abs(learned(decayed) - switched).max() <= 0.2
    assert np.abs(learned(plain) - switched).max() > 0.3


def test_unseen_transitions_and_agents_keep_a_nonzero_probability():
    model = TransitionModel()
    for _ in range(50):
        model.observe_call("a"), model.observe_call("b")
        model.observe("a", "b")
    model.observe_call("c")
    row = model.row("a")
    assert row.sum() == pytest.approx(1.0)
    assert row[model.index["c"]] > 0 and row[model.index["a"]] > 0
    assert model.row("never-seen").sum() == pytest.approx(1.0)  # the prior
    assert model.hitting("never-seen", 3) == {}


@pytest.mark.parametrize("agents", [12, 90])  # dense counts, and sparse past the 64-agent limit
def test_the_whole_matrix_holds_each_row_as_row_computes_it(agents):
    model = TransitionModel(dense_limit=64)
    rng = np.random.default_rng(7)
    names = [f"agent-{i}" for i in range(agents)]
    for _ in range(3000):
        a, b = rng.integers(0, agents, size=2)
        model.observe_call(names[a])
        model.observe(names[a], names[b])
    assert (model._dense is None) == (agents > 64)
    whole = model.matrix()
    assert whole.shape == (agents, agents)
    for name in names:
        assert np.allclose(whole[model.index[name]], model.row(name), rtol=1e-12, atol=1e-15)


def test_hitting_probabilities_match_monte_carlo():
    model = TransitionModel(decay=1.0, prior_strength=1e-6)
    states = walk(CHAIN, 20000, seed=4)
    for a, b in zip(states, states[1:]):
        model.observe(AGENTS[a], AGENTS[b])
    exact = model.hitting("planner", 3)
    rng = np.random.default_rng(5)
    runs = 20000
    hits = {a: 0 for a in AGENTS}
    for _ in range(runs):
        s, seen = 0, set()
        for _ in range(3):
            s = int(rng.choice(4, p=CHAIN[s]))
            seen.add(AGENTS[s])
        for a in seen:
            hits[a] += 1
    for agent in AGENTS:
        assert exact[agent] == pytest.approx(hits[agent] / runs, abs=0.03), agent


def test_first_call_distribution_matches_monte_carlo():
    model = TransitionModel(decay=1.0, prior_strength=1e-6)
    states = walk(CHAIN, 20000, seed=7)
    for a, b in zip(states, states[1:]):
        model.observe(AGENTS[a], AGENTS[b])
    names, pmf = model.first_call_pmf("planner", 4)
    rng = np.random.default_rng(8)
    runs = 20000
    first = {a: np.zeros(4) for a in AGENTS}
    for _ in range(runs):
        s, seen = 0, set()
        for t in range(4):
            s = int(rng.choice(4, p=CHAIN[s]))
            if AGENTS[s] not in seen:
                seen.add(AGENTS[s])
                first[AGENTS[s]][t] += 1
    for agent in AGENTS:
        column = pmf[:, names.index(agent)]
        assert column == pytest.approx(first[agent] / runs, abs=0.03), agent


@pytest.mark.parametrize("agents", [12, 150])  # dense, and past the dense limit (the reachable sub-chain)
def test_one_agents_first_call_column_equals_the_whole_tables(agents):
    rng = np.random.default_rng(9)
    model = TransitionModel()
    names = [f"expert-{k}" for k in range(agents)]
    current = 0
    for _ in range(3000):  # sticky agents with a few favourite successors, as in a group chat
        nxt = current if rng.random() < 0.3 else int(rng.integers(min(current + 4, agents)))
        model.observe(names[current], names[nxt])
        current = nxt
    for start in (names[0], names[agents // 2]):
        table_names, table = model.first_call_pmf(start, 32)
        for target in (names[0], names[1], names[agents // 2], names[-1]):
            column = model.first_call_column(start, target, 32)
            expected = table[:, table_names.index(target)] if target in table_names else np.zeros(32)
            assert column == pytest.approx(expected, abs=1e-9), (start, target)
    assert not model.first_call_column("never-seen", names[0], 32).any()


def test_the_session_that_has_waited_longest_ranks_first():
    """Sessions served in turn: the one whose last call started longest ago calls next, so its blocks
    are worth more than those of a session that has just run (LRU keeps the opposite)."""
    sage = CacheSage()
    sessions = [f"s{k}" for k in range(8)]
    t = 0.0
    for round_ in range(6):  # round robin: every session calls once every 8 s
        for k, session in enumerate(sessions):
            _prompt(sage, session, "coder", round_, [f"sys-{session}", f"{session}-{round_}"], t)
            t += 1.0
    # s0 ran 8 s ago and runs next; s7 has just run
    scores = sage.score("w", t)
    assert scores["sys-s0"] > scores["sys-s4"] > scores["sys-s7"]


def test_state_stays_within_20kb_at_64_agents_and_10mb_at_10k():
    rng = np.random.default_rng(6)
    sage = CacheSage()
    names = [f"agent-{i:02d}" for i in range(64)]
    for step in range(20000):
        agent = names[int(rng.integers(64))]
        sage.observe(ev.AgentStepStart(workload="w64", agent=agent, time=1e9 + step, session=f"s{step // 50}",
                                       step=step % 50, prefix_fingerprint="f", prefix_tokens=1))
        chain = tuple(f"{agent}-{k}" for k in range(int(rng.integers(1, 300))))  # every reuse class gets learned
        sage.observe(ev.KvBlocksStored(workload="w64", agent=agent, time=1e9 + step + 0.1, session=f"s{step // 50}",
                                       request=f"r{step}", block_hashes=chain, block_size=32))
        sage.observe(ev.AgentStepEnd(workload="w64", agent=agent, time=1e9 + step + 0.5, session=f"s{step // 50}",
                                     step=step % 50))
    assert len(sage.workload("w64").model) == 64
    assert sage.learned_nbytes("w64") <= 20 * 1024

    big = TransitionModel()
    for step in range(60000):
        a, b = int(rng.integers(10000)), int(rng.integers(10000))
        big.observe(f"agent-{a}", f"agent-{b}")
    assert len(big) == 10000
    assert big.nbytes() <= 10 * 1024 * 1024
    assert 0 < sum(big.hitting("agent-1", 2).values())


def _run_session(sage: CacheSage, session: str, agents: list[str], start: float, workload: str = "w",
                 blocks: dict[str, list[str]] | None = None) -> float:
    t = start
    for step, agent in enumerate(agents):
        sage.observe(ev.AgentStepStart(workload=workload, agent=agent, time=t, session=session, step=step,
                                       prefix_fingerprint="f", prefix_tokens=64))
        if blocks and agent in blocks:
            sage.observe(ev.KvBlocksStored(workload=workload, agent=agent, time=t + 0.1, session=session,
                                           request=f"{session}-{step}", block_hashes=tuple(blocks[agent]),
                                           block_size=32))
        sage.observe(ev.AgentStepEnd(workload=workload, agent=agent, time=t + 1.0, session=session, step=step))
        t += 2.0
    return t


def test_survival_ranks_a_soon_recurring_agent_above_a_rare_one():
    sage = CacheSage(horizon_s=10.0)
    # Learn: the planner comes back every other call; the auditor almost never runs.
    for k in range(30):
        agents = ["planner", "coder", "planner", "reviewer", "planner", "coder"]
        if k % 10 == 0:
            agents.append("auditor")
        _run_session(sage, f"old-{k}", agents + ["planner"], start=k * 100.0)
        sage.observe(ev.SessionEnd(workload="w", agent="planner", time=k * 100.0 + 50, session=f"old-{k}"))
    # A live session where both have cached their own prefix, and the coder has just run.
    now = _run_session(sage, "live", ["planner", "auditor", "coder"], start=5000.0,
                       blocks={"planner": ["p1", "p2"], "auditor": ["a1", "a2"]})
    scores = sage.score("w", now)
    assert scores["p1"] > scores["a1"] + 0.2
    assert scores["p2"] == pytest.approx(scores["p1"])


def test_a_block_shared_across_sessions_is_worth_more_than_a_private_one():
    sage = CacheSage(horizon_s=30.0)
    t = 0.0
    for k in range(6):  # every session starts with the shared system prompt block "sys"
        t = _run_session(sage, f"s{k}", ["agent"], start=t, blocks={"agent": ["sys", f"private-{k}"]})
        sage.observe(ev.SessionEnd(workload="w", agent="agent", time=t, session=f"s{k}"))
    scores = sage.score("w", t)
    assert scores["sys"] > 0.5
    assert scores["private-0"] == 0.0  # its session ended: nobody will reuse it


def test_a_prefix_that_stops_at_two_sessions_is_worth_less_than_one_that_spreads():
    """Documents each read by two sessions (a crew's file, analysed twice) against documents every third
    session reads again: both learned from whether a block that n sessions used got another one."""

    def learn(readers: int) -> tuple[CacheSage, float]:
        sage = CacheSage(horizon_s=30.0)
        t = 0.0
        for k in range(12):
            for r in range(readers):
                session = f"doc{k}-reader{r}"
                t = _run_session(sage, session, ["analyst"], start=t, blocks={"analyst": ["sys", f"doc-{k}"]})
                sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=session))
        for r in range(2):  # the same ending in both: a new document two sessions have read
            t = _run_session(sage, f"new-reader{r}", ["analyst"], start=t, blocks={"analyst": ["sys", "doc-new"]})
            sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=f"new-reader{r}"))
        return sage, t

    (pairs, t_pairs), (triples, t_triples) = learn(2), learn(3)
    assert pairs.workload("w").spread.p_more(2, 0, prior=1.0) < 0.3  # no document had a third reader
    assert pairs.workload("w").spread.p_more(1, 0, prior=0.0) > 0.8  # every one had a second (revived stops)
    assert triples.workload("w").spread.p_more(2, 0, prior=1.0) > 0.8
    scores = pairs.score("w", t_pairs)
    assert scores["doc-new"] < triples.score("w", t_triples)["doc-new"] - 0.1
    assert scores["sys"] > scores["doc-new"] + 0.1  # every session reads the system prompt


def test_whether_a_prefix_spreads_past_two_sessions_is_learned_per_agent():
    """One agent's documents each get a third reader, another's stop at two (crewAI: a file analysed by a
    few test runs, a research brief by two): pooled, the two agents' next documents would look alike."""
    sage = CacheSage(horizon_s=30.0)
    t = 0.0
    for k in range(12):
        for agent, readers in (("analyst", 3), ("writer", 2)):
            for r in range(readers):
                session = f"{agent}-doc{k}-reader{r}"
                t = _run_session(sage, session, [agent], start=t, blocks={agent: [f"sys-{agent}", f"{agent}-doc-{k}"]})
                sage.observe(ev.SessionEnd(workload="w", agent=agent, time=t, session=session))
    for agent in ("analyst", "writer"):  # the same history for both new documents: two readers, back to back
        for r in range(2):
            session = f"{agent}-new-reader{r}"
            t = _run_session(sage, session, [agent], start=t, blocks={agent: [f"sys-{agent}", f"{agent}-doc-new"]})
            sage.observe(ev.SessionEnd(workload="w", agent=agent, time=t, session=session))
    w = sage.workload("w")
    analyst, writer = (w.model.agent_id(a) + 1 for a in ("analyst", "writer"))
    assert w.p_spread(2, analyst) > 0.8
    assert w.p_spread(2, writer) < 0.3
    scores = sage.score("w", t)
    assert scores["analyst-doc-new"] > scores["writer-doc-new"] + 0.1


def test_a_shared_prefix_whose_sessions_stopped_coming_is_worth_less_than_one_still_read():
    """Two documents, each read by two ended sessions, born together: one's readers came back to back long ago
    (it is done with), the other's second reader has just come. The rate of new sessions alone (one per
    lifetime for both) cannot tell them apart; the silence since the latest, against their spacing, can."""
    sage = CacheSage(horizon_s=30.0)
    t = 0.0
    for k in range(12):  # half the documents get a third reader: a second reader says little by itself
        for r in range(2 + k % 2):
            session = f"doc{k}-reader{r}"
            t = _run_session(sage, session, ["analyst"], start=t, blocks={"analyst": ["sys", f"doc-{k}"]})
            sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=session))
    born = t
    for name, readers in (("doc-done", ["a", "b"]), ("doc-read", ["c"])):
        for reader in readers:
            t = _run_session(sage, reader, ["analyst"], start=t, blocks={"analyst": ["sys", name]})
            sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=reader))
    for k in range(80):  # other work goes on; nobody reads either document
        t = _run_session(sage, f"other-{k}", ["analyst"], start=t, blocks={"analyst": ["sys", f"other-{k}"]})
        sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=f"other-{k}"))
    t = _run_session(sage, "d", ["analyst"], start=t, blocks={"analyst": ["sys", "doc-read"]})
    sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session="d"))
    assert t - born > 150  # both documents were born about as long ago
    scores = sage.score("w", t)
    assert scores["doc-read"] > scores["doc-done"] + 0.1
    assert scores["sys"] > scores["doc-read"]  # every session reads the system prompt


def test_act_emits_valid_idempotent_decisions_pins_and_prefetches():
    sage = CacheSage(horizon_s=30.0, pin_threshold=0.5, prefetch_threshold=0.5, clock="wall")
    for k in range(20):
        _run_session(sage, f"old-{k}", ["planner", "worker"] * 3, start=k * 100.0)
    now = _run_session(sage, "live", ["planner", "worker"], start=4000.0,
                       blocks={"planner": ["p1", "p2"], "worker": ["w1"]})
    sage.observe(ev.ToolCallStart(workload="w", agent="worker", time=now, session="live", tool_name="python"))
    first = sage.act("w", now)
    for decision in first:
        ev.validate(decision)
    kinds = {type(d).__name__ for d in first}
    assert {"EvictionScore", "Pin"} <= kinds
    pin = next(d for d in first if isinstance(d, ev.Pin))
    assert pin.agent == "planner" and set(pin.block_hashes) == {"p1", "p2"} and pin.ttl_s > 0
    assert sage.act("w", now + 1) == []  # nothing changed: nothing new to say

    sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=now + 2, block_hashes=("p1", "p2")))
    sage.observe(ev.ToolCallEnd(workload="w", agent="worker", time=now + 2, session="live", tool_name="python"))
    sage.observe(ev.AgentStepStart(workload="w", agent="planner", time=now + 3, session="live", step=2,
                                   prefix_fingerprint="f", prefix_tokens=64))
    sage.observe(ev.KvBlocksStored(workload="w", agent="planner", time=now + 3.1, session="live", request="r2",
                                   block_hashes=("p1", "p2"), block_size=32))
    sage.observe(ev.AgentStepEnd(workload="w", agent="planner", time=now + 4, session="live", step=2))
    sage.observe(ev.AgentStepStart(workload="w", agent="worker", time=now + 5, session="live", step=3,
                                   prefix_fingerprint="f", prefix_tokens=64))
    sage.observe(ev.AgentStepEnd(workload="w", agent="worker", time=now + 6, session="live", step=3))
    sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=now + 6.5, block_hashes=("p1", "p2")))
    later = sage.act("w", now + 7)
    prefetch = [d for d in later if isinstance(d, ev.Prefetch)]
    assert len(prefetch) == 1 and prefetch[0].agent == "planner" and prefetch[0].block_hashes == ("p1", "p2")
    assert prefetch[0].decision_id == sage._decision_id("prefetch", "w", "planner", "live", 3)


def test_a_pin_lasts_until_its_call_starts_or_its_session_ends():
    """Unpinned once the call it was for starts (its prompt holds the blocks) or its session ends, less the
    blocks another session's pin still holds."""
    sage = CacheSage(horizon_s=30.0, pin_threshold=0.5, prefetch_threshold=2.0)
    for k in range(20):
        _run_session(sage, f"old-{k}", ["planner", "worker"] * 3, start=k * 100.0)
    pins: dict[str, ev.Pin] = {}
    ends = {}
    for name, start in (("a", 4000.0), ("b", 4100.0)):
        ends[name] = _run_session(sage, name, ["planner", "worker"], start=start,
                                  blocks={"planner": ["sys", f"{name}-1"], "worker": [f"{name}-w"]})
        sage.observe(ev.ToolCallStart(workload="w", agent="worker", time=ends[name], session=name, tool_name="py"))
        pins |= {d.session: d for d in sage.act("w", ends[name]) if isinstance(d, ev.Pin)}
    assert {s: set(d.block_hashes) for s, d in pins.items()} == {"a": {"sys", "a-1"}, "b": {"sys", "b-1"}}
    t = ends["b"] + 1
    sage.observe(ev.AgentStepStart(workload="w", agent="planner", time=t, session="a", step=2,
                                   prefix_fingerprint="f", prefix_tokens=64))
    unpins = [d for d in sage.act("w", t) if isinstance(d, ev.Unpin)]
    for decision in unpins:
        ev.validate(decision)
    # b's pin still holds the shared system prompt
    assert [(d.session, d.agent, d.block_hashes) for d in unpins] == [("a", "planner", ("a-1",))]
    assert not [d for d in sage.act("w", t + 1) if isinstance(d, ev.Unpin)]  # said once
    sage.observe(ev.SessionEnd(workload="w", agent="worker", time=t + 2, session="b"))
    unpins = [d for d in sage.act("w", t + 2) if isinstance(d, ev.Unpin)]
    assert [(d.session, set(d.block_hashes)) for d in unpins] == [("b", {"sys", "b-1"})]
    assert len({d.decision_id for d in unpins} | {d.decision_id for d in pins.values()}) == 3


def test_no_pin_or_prefetch_for_a_session_its_agent_is_done_with():
    """A file analyst reads its document twice per session, then the session ends: after its first call
    its prefix is pinned for the second; after the second nothing is held for a call that never comes."""
    sage = CacheSage(pin_threshold=0.5, prefetch_threshold=0.5)
    for k in range(20):
        end = _run_session(sage, f"old-{k}", ["analyst", "analyst"], start=k * 100.0)
        sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=end, session=f"old-{k}"))
    doc = {"analyst": ["sys", "doc-1", "doc-2"]}
    once = _run_session(sage, "live-1", ["analyst"], start=5000.0, blocks=doc)
    pins = [d for d in sage.act("w", once) if isinstance(d, ev.Pin)]
    assert len(pins) == 1 and pins[0].session == "live-1"
    twice = _run_session(sage, "live-2", ["analyst", "analyst"], start=6000.0, blocks=doc)
    assert not [d for d in sage.act("w", twice) if isinstance(d, (ev.Pin, ev.Prefetch)) and d.session == "live-2"]


def test_the_agent_the_framework_names_next_is_held_for_although_its_turns_say_it_is_done():
    """As above, the analyst is done after two calls; but when the framework hands the session to it again
    (its routing decision, made when the step ends) its prefix is pinned and worth more than before."""
    sage = CacheSage(pin_threshold=0.5, prefetch_threshold=0.5)
    for k in range(20):
        end = _run_session(sage, f"old-{k}", ["analyst", "analyst"], start=k * 100.0)
        sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=end, session=f"old-{k}"))
    twice = _run_session(sage, "live", ["analyst", "analyst"], start=6000.0,
                         blocks={"analyst": ["sys", "doc-1", "doc-2"]})
    assert not [d for d in sage.act("w", twice) if isinstance(d, ev.Pin)]
    unnamed = sage.score("w", twice)["doc-2"]
    sage.observe(ev.Handoff(workload="w", agent="analyst", time=twice, session="live", step=2, to_agent="analyst"))
    pins = [d for d in sage.act("w", twice + 0.1) if isinstance(d, ev.Pin)]
    assert [(d.session, d.agent) for d in pins] == [("live", "analyst")]
    assert sage.score("w", twice + 0.1)["doc-2"] > unnamed
    # A handoff that arrives after the step it named started (its giver's partition ran behind) is stale.
    sage.observe(ev.AgentStepStart(workload="w", agent="analyst", time=twice + 1, session="live", step=2,
                                   prefix_fingerprint="f", prefix_tokens=64))
    sage.observe(ev.Handoff(workload="w", agent="analyst", time=twice, session="live", step=2, to_agent="analyst"))
    assert sage.workload("w").sessions["live"].handoff_to is None
    assert sage.skipped["handoff_after_its_step"] == 1


def test_prefetch_only_for_the_sessions_due_to_call_soonest():
    """Three sessions wait with the planner's prefix evicted; served in turn, the one whose latest call started
    first calls next. A prefetch far ahead of its call would be evicted again before the call comes."""
    sage = CacheSage(pin_threshold=2.0, prefetch_threshold=0.5, prefetch_lead=1, clock="wall")
    for k in range(20):
        _run_session(sage, f"old-{k}", ["planner", "worker"] * 3, start=k * 100.0)
    for name, start in (("late", 5001.0), ("first", 5000.0), ("middle", 5000.5)):
        _run_session(sage, name, ["planner", "worker"], start=start,
                     blocks={"planner": [f"{name}-p1", f"{name}-p2"], "worker": [f"{name}-w1"]})
    hashes = tuple(f"{name}-p{k}" for name in ("late", "first", "middle") for k in (1, 2))
    sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=5005.0, block_hashes=hashes))
    prefetches = [d for d in sage.act("w", 5006.0) if isinstance(d, ev.Prefetch)]
    assert [(d.session, d.agent, d.block_hashes) for d in prefetches] == [("first", "planner", ("first-p1", "first-p2"))]
    # Its call starts: the next due is prefetched for now, and no session twice for one predicted call.
    sage.observe(ev.AgentStepStart(workload="w", agent="planner", time=5006.5, session="first", step=2,
                                   prefix_fingerprint="f", prefix_tokens=64))
    prefetches = [d for d in sage.act("w", 5007.0) if isinstance(d, ev.Prefetch)]
    assert [d.session for d in prefetches] == ["middle"]


def test_unusable_events_are_counted_not_raised():
    sage = CacheSage()
    sage.observe(ev.AgentStepStart(workload="w", agent="a", time=1e9, session="s", step=5, prefix_fingerprint="f",
                                   prefix_tokens=1))
    sage.observe(ev.AgentStepStart(workload="w", agent="b", time=1e9 + 1, session="s", step=5,  # duplicate
                                   prefix_fingerprint="f", prefix_tokens=1))
    sage.observe(ev.AgentStepStart(workload="w", agent="a", time=1e9, prefix_fingerprint="f", prefix_tokens=1))
    sage.observe(ev.AgentStepEnd(workload="w", agent="zzz", time=1e9 + 2, session="s", step=5))
    sage.observe(ev.RequestQueued(workload="w", agent="a", time=1e9, prompt_tokens=3))
    assert sage.skipped == {"duplicate_step": 1, "missing_session": 1, "step_end_without_start": 1,
                            "unused:request_queued": 1}


def test_sessions_that_never_end_expire():
    sage = CacheSage(session_idle_expiry_s=60.0, clock="wall")
    _run_session(sage, "forgotten", ["a", "b"], start=1e9)
    assert len(sage.predict("w", 1e9 + 10)) == 1
    assert sage.predict("w", 1e9 + 1000) == []


def test_a_state_saved_with_the_older_timing_rows_loads_its_step_and_gap_times():
    """Before session 10 the timing held two more rows per agent (a call rate nothing read)."""
    sage = CacheSage()
    for k in range(5):
        _run_session(sage, f"s{k}", ["planner", "coder", "reviewer"], start=k * 50.0)
    state = json.loads(json.dumps(sage.to_state()))
    timing = state["w"]["timing"]
    assert len(timing) == 2 and any(timing[1])  # step and gap times, learned
    state["w"]["timing"] = timing + [[7.0] * len(timing[0]), [1e9] * len(timing[0])]
    restored = CacheSage()
    restored.load_state(state)
    assert np.allclose(restored.workload("w").timing.arrays[:, :3], sage.workload("w").timing.arrays[:, :3])


def test_state_round_trips_through_json():
    sage = CacheSage()
    for k in range(5):
        _run_session(sage, f"s{k}", ["planner", "coder", "reviewer"], start=k * 50.0)
    restored = CacheSage()
    restored.load_state(json.loads(json.dumps(sage.to_state())))
    a, b = sage.workload("w").model, restored.workload("w").model
    assert np.allclose(a.matrix(), b.matrix())
    assert np.allclose(sage.workload("w").timing.arrays[:, :3], restored.workload("w").timing.arrays[:, :3])
    # Active sessions come back too: the next step still completes a transition.
    before = b.observed
    restored.observe(ev.AgentStepStart(workload="w", agent="planner", time=300.0, session="s4", step=3,
                                       prefix_fingerprint="f", prefix_tokens=1))
    assert b.observed == before + 1


def test_transitions_do_not_depend_on_arrival_order_across_agents():
    """Agent-keyed partitions interleave one session's agents arbitrarily; steps restore the order."""
    order = ["planner", "coder", "reviewer", "coder", "planner", "tester"]
    events = []
    for step, agent in enumerate(order):
        events.append(ev.AgentStepStart(workload="w", agent=agent, time=1e9 + step, session="s", step=step,
                                        prefix_fingerprint="f", prefix_tokens=1))
        events.append(ev.AgentStepEnd(workload="w", agent=agent, time=1e9 + step + 0.5, session="s", step=step))
    # Without decay the learned counts must be identical (with decay, recency within a row follows arrival).
    in_order, shuffled = CacheSage(decay=1.0), CacheSage(decay=1.0)
    for event in events:
        in_order.observe(event)
    by_agent: dict[str, list] = {}
    for event in events:  # per-agent order kept, agents interleaved differently
        by_agent.setdefault(event.agent, []).append(event)
    for agent in ["tester", "reviewer", "planner", "coder"]:
        for event in by_agent[agent]:
            shuffled.observe(event)
    a, b = in_order.workload("w").model, shuffled.workload("w").model
    assert a.observed == b.observed == len(order) - 1
    names = sorted(a.names)
    pa = a.matrix()[np.ix_([a.index[n] for n in names], [a.index[n] for n in names])]
    pb = b.matrix()[np.ix_([b.index[n] for n in names], [b.index[n] for n in names])]
    # Identical transition counts; only the prior's decayed call frequencies depend on arrival order.
    assert np.allclose(pa, pb, atol=0.05)

    def counts(model):
        state = model.to_state()
        return {(state["names"][i], state["names"][int(j)]): round(c, 6)
                for i, row in enumerate(state["rows"]) for j, c in row.items()}

    assert counts(a) == counts(b)
    assert shuffled.skipped == {}


def test_previous_agent_makes_learning_immune_to_any_partition_skew():
    """One agent's partition may run far ahead of another's (catching up a backlog)."""
    agents = ["programmer", "reviewer"] * 75
    events = [ev.AgentStepStart(workload="w", agent=agent, time=1e9 + step, session="s", step=step,
                                prefix_fingerprint="f", prefix_tokens=1,
                                previous_agent=agents[step - 1] if step else None)
              for step, agent in enumerate(agents)]
    sage = CacheSage()
    for agent in ("reviewer", "programmer"):  # every reviewer step before any programmer step
        for event in events:
            if event.agent == agent:
                sage.observe(event)
    assert sage.workload("w").model.observed == len(agents) - 1
    assert sage.skipped == {}
    # Replayed duplicates (a restart re-reading uncommitted events) are not counted twice.
    for event in events[:10]:
        sage.observe(event)
    assert sage.workload("w").model.observed == len(agents) - 1
    assert sage.skipped == {"duplicate_step": 10}


def _prompt(sage: CacheSage, session: str, agent: str, step: int, chain: list[str], t: float,
            reply_tokens: int | None = None, newest_from: int | None = None) -> None:
    """One call whose prompt is ``chain``; its newest message starts at block ``newest_from`` (default: none)."""
    newest_from = len(chain) if newest_from is None else newest_from
    sage.observe(ev.AgentStepStart(workload="w", agent=agent, time=t, session=session, step=step,
                                   prefix_fingerprint="f", prefix_tokens=32 * newest_from))
    sage.observe(ev.KvBlocksStored(workload="w", agent=agent, time=t + 0.1, session=session,
                                   request=f"{session}-{step}", block_hashes=tuple(chain), block_size=32))
    sage.observe(ev.AgentStepEnd(workload="w", agent=agent, time=t + 0.5, session=session, step=step,
                                 output_tokens=reply_tokens))


def test_a_prefetch_brings_blocks_back_without_counting_as_a_prompt_of_the_agent():
    """A prefetch recomputes evicted blocks for an agent: they are resident again with what was known of
    them, and what CacheSage learns from the agent's next prompt is as if the prefetch had not happened."""
    def run(prefetch: bool) -> CacheSage:
        sage = CacheSage()
        system, first = [f"sys-{i}" for i in range(4)], [f"a-{i}" for i in range(4)]
        _prompt(sage, "s", "coder", 0, system + first, 0.0)
        _prompt(sage, "s", "reviewer", 1, [f"r-{i}" for i in range(4)], 1.0)
        sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=1.8, block_hashes=tuple(system + first)))
        if prefetch:
            sage.observe(ev.KvBlocksStored(workload="w", agent="coder", session="s", time=1.9,
                                           request="agentrt-prefetch-1", block_hashes=tuple(system + first),
                                           block_size=32, prefetch=True))
            w = sage.workload("w")
            assert all(w.blocks[h].resident for h in system + first)
            assert w.prefix_of[("coder", "s")][0] == "s-0"  # still the coder's latest prompt
            assert {h for members in w.groups.values() for h in members} >= set(system + first)
        _prompt(sage, "s", "coder", 2, system + first + [f"b-{i}" for i in range(4)], 2.0)
        return sage

    with_prefetch, without = run(True), run(False)
    a, b = with_prefetch.workload("w"), without.workload("w")
    assert a.prefix_of == b.prefix_of and a.earlier == b.earlier
    assert json.dumps(with_prefetch.to_state(), sort_keys=True) == json.dumps(without.to_state(), sort_keys=True)
    assert {h: blk.key for h, blk in a.blocks.items()} == {h: blk.key for h, blk in b.blocks.items()}


def test_reuse_hazard_learns_prompt_families_that_come_back_a_call_later():
    """An agent alternating two prompt families (one per peer) reuses the other family's blocks at age 1,
    never the latest prompt's tail at age 0; the system prompt at any age."""
    from policy_workers.reuse import POSITION_BINS, position_bin

    sage = CacheSage()
    t = 0.0
    for k in range(12):
        session = f"s{k}"
        for step in range(8):
            family = "ab"[step % 2]
            chain = [f"sys-{k}-{i}" for i in range(8)] + [f"{family}-{k}-{i}" for i in range(8)]
            _prompt(sage, session, "coder", step, chain, t)
            t += 1.0
        sage.observe(ev.SessionEnd(workload="w", agent="coder", time=t, session=session))
    w = sage.workload("w")
    i = w.model.index["coder"]
    tail, head = position_bin(12), position_bin(4)
    assert w.reuse.hazard(0, i, head) > 0.9  # the system prompt is in every prompt
    assert w.reuse.hazard(0, i, tail + POSITION_BINS) < 0.1  # the latest family's tail: not in the next prompt
    assert w.reuse.hazard(1, i, tail + POSITION_BINS) > 0.9  # ...but in the one after


def test_a_prompts_newest_message_is_learned_apart_from_the_blocks_before_it():
    """Each prompt: system prompt, a document, then a new question (the newest message, from the step's
    prefix_tokens). The next prompt keeps the document and drops the question, although both share a
    chain position bin (blocks 8-15)."""
    from policy_workers.reuse import position_bin, tail_class

    sage = CacheSage()
    t = 0.0
    for k in range(12):
        session = f"s{k}"
        for step in range(6):
            chain = [f"sys-{i}" for i in range(4)] + [f"doc-{k}-{i}" for i in range(8)] + [
                f"q-{k}-{step}-{i}" for i in range(4)]
            _prompt(sage, session, "analyst", step, chain, t, newest_from=12)
            t += 1.0
        sage.observe(ev.SessionEnd(workload="w", agent="analyst", time=t, session=session))
    w = sage.workload("w")
    i = w.model.index["analyst"]
    document, question = position_bin(10), tail_class(13, newest_from=12)
    assert position_bin(13) == document  # one position bin: only the newest-message class tells them apart
    assert w.blocks["doc-11-0"].key[-1] != document  # reused by a second prompt by now
    assert w.reuse.hazard(0, i, question) < 0.1
    # A live session's first prompt: its document (fresh, before the newest message) outscores its question.
    _prompt(sage, "live", "analyst", 0, [f"sys-{i}" for i in range(4)] + [f"live-doc-{i}" for i in range(8)] + [
        f"live-q-{i}" for i in range(4)], t, newest_from=12)
    assert w.reuse.hazard(0, i, document) > 0.9
    scores = sage.score("w", t + 1)
    assert scores["live-doc-7"] > scores["live-q-0"]  # one key without the newest-message class: one score


def test_a_reply_longer_than_the_agents_usual_closes_the_conversation_the_next_prompt_extends():
    """Three tool-calling turns (short replies) extend one conversation; the fourth, the answer (a long reply),
    closes it and the agent's next prompt starts afresh. Which newest messages come back is learned per reply
    class; the blocks before them (system prompt, history) do not depend on it."""
    from policy_workers.reuse import position_bin, reply_class, tail_class

    sage = CacheSage()
    t = 0.0
    for k in range(12):
        session = f"s{k}"
        for step in range(12):
            turn, conversation = step % 4, step // 4
            chain = [f"sys-{k}-{i}" for i in range(8)] + [f"c{conversation}-{k}-{i}" for i in range(4 + 4 * turn)]
            _prompt(sage, session, "coder", step, chain, t, reply_tokens=2000 if turn == 3 else 60,
                    newest_from=len(chain) - 4)
            t += 1.0
        sage.observe(ev.SessionEnd(workload="w", agent="coder", time=t, session=session))
    w = sage.workload("w")
    i = w.model.index["coder"]
    tail = tail_class(20, newest_from=20)  # the blocks a turn added, before a second prompt has used them
    assert tail != position_bin(20) and reply_class(position_bin(20), True) == position_bin(20)
    assert w.reuse.hazard(0, i, reply_class(tail, False)) > 0.9  # after a tool call: extended
    assert w.reuse.hazard(0, i, reply_class(tail, True)) < 0.1  # after the answer: left
    # A live session's blocks score by the reply their prompt got.
    for session, reply in (("a", 60), ("b", 2000)):
        _prompt(sage, session, "coder", 0, [f"{session}-{i}" for i in range(24)], t, reply_tokens=reply,
                newest_from=20)
    scores = sage.score("w", t + 1)
    assert scores["a-20"] > scores["b-20"]
    restored = CacheSage()
    restored.load_state(sage.to_state())
    assert np.array_equal(restored.workload("w").reuse.typical_reply[:1], w.reuse.typical_reply[:1])


def test_blocks_their_users_forgot_or_never_reuse_score_zero_and_the_system_prompt_high():
    sage = CacheSage()
    t = 0.0
    for step in range(12):  # every prompt: the system prompt's blocks, then a tail never seen again
        chain = [f"sys-{i}" for i in range(4)] + [f"p{step}-{i}" for i in range(4)]
        _prompt(sage, "live", "coder", step, chain, t)
        t += 1.0
    scores = sage.score("w", t)
    assert scores["p0-1"] == 0.0  # five prompts ago: forgotten
    # the latest tail: learned never to come back (its estimate is shrunk, not zero: twelve prompts are evidence,
    # not certainty), far below the system prompt every prompt reuses
    w = sage.workload("w")
    assert w.reuse.hazard(0, w.model.index["coder"], w.blocks["p11-1"].key[-1]) < 0.05
    assert scores["p11-1"] < scores["sys-0"]
    assert scores["sys-0"] > 0.5


def test_turnover_follows_the_engine_eviction_rate():
    sage = CacheSage(rate_window_s=100.0, clock="wall")
    _prompt(sage, "s", "coder", 0, [f"b{i}" for i in range(100)], 0.0)
    for k in range(50):  # 2 blocks evicted per second for 50 s
        sage.observe(ev.KvBlocksRemoved(workload="w", agent="coder", time=1.0 + k,
                                        block_hashes=(f"gone-{k}-a", f"gone-{k}-b")))
    w = sage.workload("w")
    # 100 resident blocks at 2 evicted per second: 50 s, although only half the rate window was watched
    assert sage._turnover_s(w, 50.0) == pytest.approx(100 / 2, rel=0.1)
    assert CacheSage()._turnover_s(CacheSage().workload("x"), 0.0) == CacheSage().config.horizon_s  # no pressure


def test_continuation_learns_that_agents_have_their_turns_from_decided_outcomes_only():
    from policy_workers.continuation import Continuation

    turns = Continuation()
    proposer, verifier = 1, 2
    assert turns.p_more(1, proposer, prior=0.7) == pytest.approx(0.7)  # nothing learned: the prior stands
    for _ in range(30):  # the proposer speaks once per session, the verifier three times
        turns.observe_stopped(1, proposer)
        turns.observe_continued(1, verifier)
        turns.observe_continued(2, verifier)
        turns.observe_stopped(3, verifier)
    assert turns.p_more(1, proposer, prior=0.7) < 0.1
    assert turns.p_more(1, verifier, prior=0.7) > 0.9
    assert turns.p_more(3, verifier, prior=0.7) < 0.1
    # An agent never seen at a count leans on every agent's outcomes there, then on the prior.
    assert turns.p_more(1, 9, prior=0.7) == pytest.approx(turns.p_more(1, 0, prior=0.7))
    # Two outcomes are evidence, not certainty.
    fresh = Continuation()
    fresh.observe_stopped(1, proposer)
    fresh.observe_stopped(1, proposer)
    assert 0.2 < fresh.p_more(1, proposer, prior=0.9) < 0.9


def test_an_agent_that_has_had_its_turn_is_worth_less_than_one_that_speaks_again():
    """Group-chat sessions: a proposer speaks once, then a verifier three times. Once that is learned, the
    proposer's own blocks in a running session score below the verifier's, although the proposer ran later."""
    sage = CacheSage()
    t = 0.0
    for k in range(20):
        session = f"s{k}"
        for step, agent in enumerate(["verifier", "proposer", "verifier", "verifier"]):
            _prompt(sage, session, agent, step, [f"{session}-{agent}-{step}-{i}" for i in range(4)], t)
            t += 1.0
        sage.observe(ev.SessionEnd(workload="w", agent="verifier", time=t, session=session))
    # A running session: the verifier spoke, then the proposer.
    _prompt(sage, "live", "verifier", 0, [f"live-verifier-{i}" for i in range(4)], t)
    _prompt(sage, "live", "proposer", 1, [f"live-proposer-{i}" for i in range(4)], t + 1.0)
    w = sage.workload("w")
    assert w.turns.p_more(1, w.model.index["proposer"] + 1, prior=0.5) < 0.2
    scores = sage.score("w", t + 1.5)
    # The chain alone sees the proposer follow a verifier once per session (0.79 against 0.90 without turns).
    assert scores["live-verifier-1"] - scores["live-proposer-1"] > 0.3


def test_a_reuse_class_seen_once_is_not_priced_at_zero_and_learning_survives_a_restart():
    from policy_workers.reuse import ReuseHazard

    reuse = ReuseHazard()
    reuse.observe(0, [["a", "b"]], ["c"], lambda h, p: 5)  # one prompt: nothing of the previous one reused
    assert 0.0 < reuse.hazard(0, 0, 5) < 0.5
    for _ in range(20):
        reuse.observe(0, [["a", "b"]], ["c"], lambda h, p: 5)
    assert reuse.hazard(0, 0, 5) < 0.1
    for _ in range(20):  # drift: now it is always reused
        reuse.observe(0, [["a", "b"]], ["a", "b"], lambda h, p: 5)
    assert reuse.hazard(0, 0, 5) > 0.8
    sage = CacheSage()
    _prompt(sage, "s", "coder", 0, ["x", "y"], 0.0)
    _prompt(sage, "s", "coder", 1, ["x", "z"], 1.0)
    restored = CacheSage()
    restored.load_state(sage.to_state())
    assert np.array_equal(restored.workload("w").reuse.arrays[:, :, :1], sage.workload("w").reuse.arrays[:, :, :1])
    assert np.array_equal(restored.workload("w").turns.counts, sage.workload("w").turns.counts)
    # A state saved with another class layout (an older version's) is relearned, not misread.
    older = sage.to_state()
    older["w"]["reuse_layout"] = "bins=0,4,8,12,16,24,32,64,128;reused;long-reply"  # session 7's: 27 classes
    older["w"]["reuse_packed"] = np.full((4, 27, 1), 200).tolist()
    relearning = CacheSage()
    relearning.load_state(older)
    assert not relearning.workload("w").reuse.arrays.any()


def _waiting_for_the_planner(sage: CacheSage) -> float:
    """The live session waits for the planner (the chain's pick), whose prefix was evicted; returns now."""
    for k in range(20):
        _run_session(sage, f"old-{k}", ["planner", "worker"] * 3, start=k * 100.0)
    now = _run_session(sage, "live", ["planner", "worker"], start=4000.0,
                       blocks={"planner": ["p1", "p2"], "worker": ["w1"]})
    sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=now, block_hashes=("p1", "p2")))
    return now


def test_what_a_prefetch_would_have_served_is_learned_and_decides_the_next():
    """Each prefetch considered is scored by the session's next prompt (issued or not): the share of its
    blocks that prompt read, by the prediction's probability. A prefetch is made when predictions that
    confident have served at least the threshold, not when the probability alone reaches it."""
    sage = CacheSage(pin_threshold=2.0, prefetch_threshold=0.5, clock="wall")
    now = _waiting_for_the_planner(sage)
    prefetch = [d for d in sage.act("w", now + 1) if isinstance(d, ev.Prefetch)]
    assert len(prefetch) == 1
    probability = prefetch[0].probability
    calibration = sage.workload("w").calibration
    before = calibration.sums.copy()
    _prompt(sage, "live", "planner", 2, ["p1", "p3"], now + 2)  # read half of what it would compute
    added = calibration.sums - before
    assert added.sum(axis=0) == pytest.approx([0.5, 1.0])
    assert added[calibration._bin(probability)].tolist() == pytest.approx([0.5, 1.0])

    # Where predictions this confident have served little, the same prefetch is not made, but still scored.
    doubtful = CacheSage(pin_threshold=2.0, prefetch_threshold=0.5, clock="wall")
    now = _waiting_for_the_planner(doubtful)
    for _ in range(30):
        doubtful.workload("w").calibration.observe(probability, 0.1)
    assert not [d for d in doubtful.act("w", now + 1) if isinstance(d, ev.Prefetch)]
    calibration = doubtful.workload("w").calibration
    before = calibration.sums[calibration._bin(probability)].copy()
    doubtful.observe(ev.SessionEnd(workload="w", agent="worker", time=now + 2, session="live"))  # no call came
    assert calibration.sums[calibration._bin(probability)].tolist() == pytest.approx(
        (before * calibration.decay + [0.0, 1.0]).tolist())


def test_a_prefetch_that_ran_learns_how_much_of_it_was_still_cached_when_read():
    """The prefetch ran (its KV event came back), then one of its two blocks was evicted before the call:
    the next prompt read both, one was still there."""
    sage = CacheSage(pin_threshold=2.0, prefetch_threshold=0.5, clock="wall")
    now = _waiting_for_the_planner(sage)
    assert [d for d in sage.act("w", now + 1) if isinstance(d, ev.Prefetch)]
    sage.observe(ev.KvBlocksStored(workload="w", agent="planner", session="live", time=now + 1.5,
                                   request="agentrt-prefetch-1", block_hashes=("p1", "p2"), block_size=32,
                                   prefetch=True))
    sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=now + 1.8, block_hashes=("p2",)))
    calibration = sage.workload("w").calibration
    before = calibration.kept.copy()
    _prompt(sage, "live", "planner", 2, ["p1", "p2", "p3"], now + 2)
    assert (calibration.kept - before * calibration.decay).tolist() == pytest.approx([1.0, 2.0])


def test_a_score_that_returns_to_an_earlier_bucket_is_applied_again():
    """Acts come many times a second on a busy engine: a group's score may go A -> B -> A within one
    second. The third decision must reach the engine as a new decision, not be dropped as a duplicate of
    the first (the engine's book would keep B)."""
    from engine_emitter.decision_book import DecisionBook

    sage, book = CacheSage(), DecisionBook()
    for step in range(12):  # the coder and the reviewer take turns in many sessions: the chain is learned
        agent = ("coder", "reviewer")[step % 2]
        _prompt(sage, f"old-{step // 4}", agent, step % 4, [f"{agent}-sys", f"old-{step}"], float(step))
    _prompt(sage, "live", "coder", 0, ["coder-sys", "live-0"], 20.0)
    for k in range(20):  # under pressure: blocks last seconds, so the scores spread over the buckets
        sage.observe(ev.KvBlocksRemoved(workload="w", agent="", time=float(k),
                                        block_hashes=tuple(f"gone-{k}-{i}" for i in range(4))))
    buckets = []
    for k, to_agent in enumerate(("coder", "reviewer", "coder")):
        now = 21.0 + 0.2 * k
        sage.observe(ev.Handoff(workload="w", agent="coder", time=now, session="live", to_agent=to_agent))
        for decision in sage.act("w", now):
            book.apply(decision, now)
        buckets.append(book.score("live-0", ("w", "coder"), now))
    assert buckets[0] != buckets[1]  # the framework named another agent next: the coder's blocks wait longer
    assert buckets[2] == buckets[0]
    assert book.counters["duplicate"] == 0
