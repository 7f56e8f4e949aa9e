"""The clocks a policy can keep time on: the wall clock, or work done (agent steps started).

A KV cache only turns over when requests run, so what decides whether a block
survives until its reuse is how much work comes first, not how many seconds
pass: Belady and LHD count time in accesses for that reason. On the wall clock
the same workload gets other timings, scores and decisions on a faster or a
slower machine, and from one repeat to the next (BENCHMARKS, sessions 28-29).
``StepClock`` counts a workload's agent steps started instead, so a run's
decisions do not move with the machine's speed, and idle time (a tool running,
no traffic) neither ages anything nor expires a session.

Decisions still reach the engine with wall-clock expiry, so that a silent
worker's decisions lapse and the engine falls back to plain LRU: a duration on
the step clock becomes seconds at the workload's measured seconds per step.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

from streams import events as ev

CLOCKS = ("steps", "wall")


class Clock(Protocol):
    """A workload's policy time: what events and acts are timed with, and its durations in wall seconds."""

    kind: str

    def event_time(self, event: ev.Event) -> float:
        """The event's time on this clock (called once per event, in arrival order)."""

    def step_started(self) -> None:
        """The step start last timed by ``event_time`` is a new step (not a duplicate): count it."""

    def now(self, wall: float) -> float:
        """The time on this clock of an act at wall time ``wall``."""

    def seconds(self, duration: float) -> float:
        """A duration on this clock in wall seconds."""


class WallClock:
    """Seconds: the events' own timestamps."""

    kind = "wall"

    def event_time(self, event: ev.Event) -> float:
        return event.time

    def step_started(self) -> None:
        pass

    def now(self, wall: float) -> float:
        return wall

    def seconds(self, duration: float) -> float:
        return duration


class StepClock:
    """Agent steps started in the workload, counted in arrival order.

    Events between two step starts are placed by their kind within the step:
    a step starts at ``n``, the engine's events for it come at ``n + 0.25``,
    its end (and the framework's other events) at ``n + 0.5`` and an act at
    ``n + 0.6``. So a step's duration and the gap after it are fractions of a
    step, and a session's call interval is the number of steps the workload
    ran meanwhile: the work its cached blocks must survive.

    A workload whose framework sends no step starts (the engine's events only)
    is counted by its requests instead: a request's first store starts a step.
    """

    kind = "steps"
    ENGINE, FRAMEWORK, ACT = 0.25, 0.5, 0.6
    WINDOW = 64  # step starts the seconds-per-step rate is measured over

    def __init__(self, steps: int = 0, default_step_s: float = 1.0) -> None:
        self.steps = steps
        self.default_step_s = default_step_s
        self._starts: deque[float] = deque(maxlen=self.WINDOW)  # wall times of the latest step starts
        self._start_wall = 0.0  # the wall time of the step start last timed
        self._framework_steps = False  # whether the workload's framework sends step starts

    def event_time(self, event: ev.Event) -> float:
        if isinstance(event, ev.AgentStepStart):
            self._framework_steps = True
            self._start_wall = event.time
            return float(self.steps + 1)  # the step it starts (``step_started`` counts it, unless a duplicate)
        if (not self._framework_steps and isinstance(event, ev.KvBlocksStored) and event.start_index == 0
                and not event.prefetch):
            self._start_wall = event.time
            self.step_started()
            return self.steps + self.ENGINE
        return self.steps + (self.ENGINE if isinstance(event, ev.EngineEvent) else self.FRAMEWORK)

    def step_started(self) -> None:
        self.steps += 1
        if not self._starts or self._start_wall >= self._starts[-1]:  # frameworks' partitions interleave
            self._starts.append(self._start_wall)

    def now(self, wall: float) -> float:
        return self.steps + self.ACT

    def seconds_per_step(self) -> float:
        """Wall seconds per step started over the last ``WINDOW`` steps (``default_step_s`` before two)."""
        if len(self._starts) < 2 or self._starts[-1] <= self._starts[0]:
            return self.default_step_s
        return (self._starts[-1] - self._starts[0]) / (len(self._starts) - 1)

    def seconds(self, duration: float) -> float:
        return duration * self.seconds_per_step()


def make_clock(kind: str, steps: int = 0) -> Clock:
    """A workload's clock by name (``CLOCKS``); ``steps``: a step clock's count so far (restored state)."""
    if kind == "steps":
        return StepClock(steps)
    if kind == "wall":
        return WallClock()
    raise ValueError(f"unknown clock {kind!r}: expected one of {', '.join(CLOCKS)}")
