"""evaluation.bench's figures and results database, on hand-made call results (no engine needed)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from evaluation.bench import main, metrics, save_sql, table
from evaluation.engine_replay import ArmResult, CallResult, OwnClock


def _result(ttfts: list[float]) -> ArmResult:
    calls = [CallResult(session=f"s{i % 4}", agent="a", seq=i // 4, prompt_tokens=100, cached_tokens=50,
                        submitted=float(i), first_token=float(i) + ttft, finished=float(i) + ttft + 0.1)
             for i, ttft in enumerate(ttfts)]
    return ArmResult(arm="stock", calls=calls, wall_s=float(len(ttfts)), output_tokens=10 * len(ttfts))


def test_the_p99_after_the_first_burst_leaves_out_only_the_first_requests_submitted():
    # the first 8 requests wait behind each other on an empty cache; three later ones are slow for their own reasons
    result = _result([5.0] * 8 + [0.1] * 189 + [2.0] * 3)
    figures = metrics(result, warmup_calls=8)
    assert figures["ttft_p99_s"] == pytest.approx(5.0)
    assert figures["ttft_p99_warm_s"] == pytest.approx(2.0)  # not hidden: only the burst is left out
    assert metrics(result)["ttft_p99_warm_s"] == figures["ttft_p99_s"]


def test_a_results_database_from_before_a_new_figure_takes_the_new_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    old = metrics(_result([0.2] * 20))
    del old["ttft_p99_warm_s"]
    save_sql(url, "before", "crewai", {}, "stock", 0, old)
    save_sql(url, "after", "crewai", {}, "stock", 0, metrics(_result([0.2] * 20), warmup_calls=2))
    with sa.create_engine(url).connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT run_id, ttft_p99_warm_s FROM agentrt_eval_runs")).all())
    assert rows["before"] is None and rows["after"] == pytest.approx(0.2)


class _CountingPolicy:
    name = "counting"

    def __init__(self) -> None:
        self.acts = 0

    def observe(self, event):  # noqa: ANN001, ANN201
        pass

    def act(self, workload, now):  # noqa: ANN001, ANN201
        self.acts += 1
        return []


def test_the_in_engine_policy_acts_at_every_step_end_and_otherwise_at_its_cadence():
    from evaluation.engine_replay import PolicyArm

    policy = _CountingPolicy()
    arm = PolicyArm(policy, act_every_s=0.1)
    arm.workload, arm.scheduler = "w", None
    for step in range(1, 11):  # a request finishes every 10 ms: an act after each
        arm.after_step(100.0 + 0.01 * step, finished=1)
    assert policy.acts == arm.acts == 10
    for step in range(1, 10):  # steps with nothing finished, within 0.1 s of the last act: none
        arm.after_step(100.1 + 0.01 * step, finished=0)
    assert policy.acts == 10
    arm.after_step(100.1 + 0.11, finished=0)  # the cadence comes round
    assert policy.acts == 11


class _RecordingPolicy(_CountingPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.seen_at_act: list[int] = []

    def observe(self, event):  # noqa: ANN001, ANN201
        self.seen.append(event)

    def act(self, workload, now):  # noqa: ANN001, ANN201
        self.seen_at_act.append(len(self.seen))
        return super().act(workload, now)


class _Observers:
    def __init__(self) -> None:
        self.observers: list = []


def test_the_in_engine_policy_takes_the_events_of_a_step_only_when_it_next_acts_in_their_order():
    from evaluation.engine_replay import PolicyArm

    policy, scheduler = _RecordingPolicy(), _Observers()
    arm = PolicyArm(policy, act_every_s=0.1)
    framework = arm.attach(scheduler, "w")
    assert framework is not None
    for event in range(5):  # what the engine emits while it serves a call: nothing is taken yet
        scheduler.observers[0](event)
    assert policy.seen == []
    arm.after_step(100.0, finished=0)  # the first act: everything before it, oldest first
    scheduler.observers[0](5)
    arm.after_step(100.05, finished=0)  # throttled: the event waits
    assert policy.seen == [0, 1, 2, 3, 4]
    arm.after_step(100.06, finished=1)
    assert policy.seen_at_act == [5, 6]
    scheduler.observers[0](6)
    arm.detach()  # the last events are taken when the arm lets go
    assert policy.seen == list(range(7)) and scheduler.observers == []


def test_cachesage_settings_from_the_command_line_are_typed_and_checked():
    import argparse

    from evaluation.bench import config_overrides

    parser = argparse.ArgumentParser()
    assert config_overrides(parser, ["prefetch_threshold=0.6", "prefetch_lead=3"]) == {
        "prefetch_threshold": 0.6, "prefetch_lead": 3}
    for bad in ("no_such_setting=1", "prefetch_lead=two", "prefetch_lead"):
        with pytest.raises(SystemExit):
            config_overrides(parser, [bad])


def test_with_the_control_arm_each_policy_arm_is_also_compared_with_its_own_engine_without_a_policy():
    from evaluation.bench import table

    stock, control, policy = (metrics(_result([ttft] * 20)) for ttft in (0.4, 0.5, 0.3))
    text = table({"stock": [stock], "lru-runtime": [control], "cachesage": [policy]}, {})
    assert "lru-runtime vs stock: hit rate +0.0 pp, mean TTFT +25.0%" in text
    assert "cachesage vs stock: hit rate +0.0 pp, mean TTFT -25.0%" in text
    assert "cachesage vs lru-runtime: hit rate +0.0 pp, mean TTFT -40.0%" in text
    assert "stock vs lru-runtime" not in text
    assert "vs lru-runtime" not in table({"stock": [stock], "cachesage": [policy]}, {})


def test_a_runs_own_clock_holds_its_own_steps_only():
    clock = OwnClock()
    for began, ended in ((10.0, 12.0), (15.0, 16.0), (20.0, 23.0)):  # another run stepped in the gaps
        clock.start(began)
        clock.stop(ended)
    assert clock.total == pytest.approx(6.0)
    assert clock.own(11.0) == pytest.approx(1.0)
    assert clock.own(15.5) == pytest.approx(2.5)
    assert clock.own(22.0) == pytest.approx(5.0)


def test_side_by_side_each_arm_is_compared_with_the_stock_run_of_its_repeat():
    # the machine ran at three speeds, one per repeat; the policy was 10% faster than stock in each
    speeds = (1.0, 2.0, 3.0)
    rows = {"stock": [metrics(_result([0.2 * s] * 20)) for s in speeds],
            "cachesage": [metrics(_result([0.18 * s] * 20)) for s in (2.0, 3.0, 1.0)]}  # stored out of step
    assert "mean TTFT -10.0% [-10.0% to -10.0%]" not in table(rows, {}, side_by_side=True)
    rows["cachesage"] = [metrics(_result([0.18 * s] * 20)) for s in speeds]
    text = table(rows, {}, side_by_side=True)
    assert "cachesage vs stock (side by side, repeat by repeat: median [range]): hit rate +0.0 pp, " \
           "mean TTFT -10.0% [-10.0% to -10.0%]" in text


def test_tool_gaps_need_the_arms_one_after_another():
    with pytest.raises(SystemExit, match="2"):
        main(["--time-scale", "1"])
