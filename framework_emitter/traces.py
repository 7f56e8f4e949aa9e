"""Reading the shared multi-agent traces (format: ../shared/traces/SOURCES.md)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

WORKLOADS = ("ag2_captainagent", "chatdev", "crewai", "magentic_one", "tau_airline")


@dataclass(frozen=True, slots=True)
class TraceCall:
    """One LLM call of a real multi-agent run."""

    workload: str
    session: str
    seq: int
    t: float | None
    agent: str
    segments: tuple[tuple[str, int], ...]  # (segment id, tokens); same id => same tokens
    output_tokens: int
    output_seg: str | None

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    def generated_tokens(self, max_tokens: int) -> int:
        """The tokens an engine that stops at ``max_tokens`` generates for this call: the trace's reply length,
        at most that, at least one."""
        return max(1, min(self.output_tokens, max_tokens))

    def truncated(self, max_tokens: int) -> "TraceCall":
        """The call with its prompt cut to ``max_tokens`` (as an engine with that context gets it)."""
        if self.prompt_tokens <= max_tokens:
            return self
        kept: list[tuple[str, int]] = []
        left = max_tokens
        for seg_id, n in self.segments:
            if left <= 0:
                break
            kept.append((seg_id, min(n, left)))
            left -= n
        return dataclasses.replace(self, segments=tuple(kept))


@dataclass
class TraceProblem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def traces_dir() -> Path:
    """$AGENTRT_TRACES, else the shared traces beside the checkout."""
    env = os.environ.get("AGENTRT_TRACES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "traces"


def trace_path(workload_or_path: str) -> Path:
    path = Path(workload_or_path)
    if path.suffix == ".jsonl" or path.exists():
        return path
    return traces_dir() / f"{workload_or_path}.jsonl"


def _parse(record: object) -> TraceCall:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        segments = tuple((str(s), int(n)) for s, n in record["segments"])
        call = TraceCall(
            workload=str(record["workload"]), session=str(record["session"]), seq=int(record["seq"]),
            t=None if record.get("t") is None else float(record["t"]), agent=str(record["agent"]),
            segments=segments, output_tokens=int(record["output_tokens"]), output_seg=record.get("output_seg"),
        )
    except KeyError as exc:
        raise ValueError(f"missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad field value: {exc}") from None
    if not call.segments or any(n < 0 for _, n in call.segments) or call.output_tokens < 0:
        raise ValueError("segments must be non-empty with non-negative token counts")
    return call


def read_trace(workload_or_path: str, problems: list[TraceProblem] | None = None) -> Iterator[TraceCall]:
    """Yield the calls of a trace file; a line that doesn't parse is logged with file and line, and skipped."""
    path = trace_path(workload_or_path)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield _parse(json.loads(line))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                problem = TraceProblem(str(path), number, str(exc))
                log.warning("skipping trace line: %s", problem)
                if problems is not None:
                    problems.append(problem)


def sessions(calls: Iterator[TraceCall] | list[TraceCall]) -> dict[str, list[TraceCall]]:
    """Calls grouped by session, in file order, each session ordered by seq."""
    grouped: dict[str, list[TraceCall]] = {}
    for call in calls:
        grouped.setdefault(call.session, []).append(call)
    for calls_of_session in grouped.values():
        calls_of_session.sort(key=lambda c: c.seq)
    return grouped


def next_in_session(calls: Sequence[TraceCall]) -> dict[int, TraceCall]:
    """Call index -> the same session's next call (absent for a session's last)."""
    following: dict[int, TraceCall] = {}
    last_of: dict[str, int] = {}
    for k, call in enumerate(calls):
        if call.session in last_of:
            following[last_of[call.session]] = call
        last_of[call.session] = k
    return following
