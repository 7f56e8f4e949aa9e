"""Reading the shared real traces."""
from __future__ import annotations

from framework_emitter.traces import WORKLOADS, TraceProblem, read_trace, sessions, trace_path


def test_all_five_shared_traces_parse_cleanly():
    for workload in WORKLOADS:
        problems: list[TraceProblem] = []
        calls = list(read_trace(workload, problems))
        assert calls and not problems, (workload, problems[:3])
        assert {c.workload for c in calls} == {workload}
        grouped = sessions(calls)
        assert all([c.seq for c in s] == sorted(c.seq for c in s) for s in grouped.values())


def test_a_bad_line_is_reported_with_file_and_line_and_the_rest_goes_on(tmp_path):
    source = trace_path("crewai").read_text().splitlines()[:3]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([source[0], "{truncated", source[1], '{"workload": "x"}', source[2]]) + "\n")
    problems: list[TraceProblem] = []
    calls = list(read_trace(str(path), problems))
    assert len(calls) == 3
    assert [(p.line, p.path) for p in problems] == [(2, str(path)), (4, str(path))]
    assert "missing field 'segments'" in str(problems[1])
