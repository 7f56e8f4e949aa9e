"""The engine's decision book (pure; no vLLM needed)."""
from __future__ import annotations

from engine_emitter.decision_book import DecisionBook
from streams import events as ev

NOW = 1_800_000_000.0


def _score(score, hashes=(), agent="planner", did="d1", expires=NOW + 30):
    return ev.EvictionScore(workload="w", agent=agent, time=NOW, policy="p", decision_id=did, expires_at=expires,
                            block_hashes=hashes, score=score)


def test_block_scores_beat_agent_scores_and_expire():
    book = DecisionBook()
    assert book.apply(_score(0.9), NOW)
    assert book.apply(_score(0.1, hashes=("aa",), did="d2", expires=NOW + 5), NOW)
    assert book.score("aa", ("w", "planner"), NOW) == 0.1
    assert book.score("bb", ("w", "planner"), NOW) == 0.9
    assert book.score("bb", ("w", "other"), NOW) is None
    assert book.score("aa", ("w", "planner"), NOW + 6) == 0.9  # the block score expired
    book.expire(NOW + 6)
    assert "aa" not in book.block_scores


def test_duplicate_and_stale_decisions_are_ignored_and_counted():
    book = DecisionBook()
    assert book.apply(_score(0.5), NOW)
    assert not book.apply(_score(0.5), NOW)  # same id: a replay or duplicate does nothing
    assert not book.apply(_score(0.5, did="old", expires=NOW - 1), NOW)
    prefetch = ev.Prefetch(workload="w", agent="a", time=NOW, policy="p", decision_id="pf", expires_at=NOW + 9,
                           probability=0.9)
    assert book.apply(prefetch, NOW) and not book.apply(prefetch, NOW)
    assert book.counters == {"applied:eviction_score": 1, "applied:prefetch": 1, "duplicate": 2, "expired": 1}
    book.clear()  # a new run (the bench's next repeat) sends the same ids again: they apply
    assert book.apply(prefetch, NOW) and book.apply(_score(0.5), NOW)


def test_pins_last_their_ttl_and_unpin_ends_them():
    book = DecisionBook()
    pin = ev.Pin(workload="w", agent="planner", time=NOW, policy="p", decision_id="p1", expires_at=NOW + 30, ttl_s=3.0)
    book.apply(pin, NOW)
    assert book.pinned_until("x", ("w", "planner"), NOW + 2) == NOW + 3
    assert book.pinned_until("x", ("w", "planner"), NOW + 3.5) is None
    book.apply(ev.Pin(workload="w", agent="planner", time=NOW, policy="p", decision_id="p2", expires_at=NOW + 30,
                      ttl_s=10.0, block_hashes=("x",)), NOW)
    book.apply(ev.Unpin(workload="w", agent="planner", time=NOW, policy="p", decision_id="u1", expires_at=NOW + 30,
                        block_hashes=("x",)), NOW)
    assert book.pinned_until("x", None, NOW + 1) is None
