"""How likely a cached block comes back: the reuse hazard by prompt age and block class.

CacheSage remembers, per (agent, session), which blocks each of its last
``AGES`` prompts held. Whether the agent's next prompt reuses a block depends
on how many prompts ago the agent last had it (agents alternate prompt
families, so a dropped block often returns a call later) and on the block's
class: its chain position, whether a second prompt has used it, whether it is
in its prompt's newest message and, if so, how long a reply that prompt got.
Pure numpy, no I/O; bounded state (one byte per agent, age and class).
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable, Sequence

import numpy as np

AGES = 4  # prompts remembered per (agent, session): its latest (age 0) and the 3 before

# Chain positions (in blocks) at which prompt retention is learned; a block uses the bin it falls in.
RETENTION_BOUNDS = (0, 4, 8, 16, 32, 64, 128)
POSITION_BINS = len(RETENTION_BOUNDS)
# A block's class, set when a prompt first stores it and changed once, when a second prompt uses it:
# - its chain position bin, if it precedes the prompt's newest message (the step's ``prefix_tokens``,
#   the framework's view: system prompt, history);
# - + REUSED once a second prompt has used it;
# - + TAIL while only one prompt has and it is in that prompt's newest message, + POSITION_BINS more
#   if the prompt got a longer reply than its agent's usual. A long reply (code, a report) tends to
#   close a conversation whose next prompt starts afresh; a short one (a tool call, an
#   acknowledgement) tends to be followed by the same conversation, extended. The newest message
#   is what a conversation drops first: on ChatDev a later prompt of the session reuses 7-8% of the
#   newest messages of the Programmer's prompts and 31-39% of their other segments (whole trace).
REUSED = POSITION_BINS
TAIL = 2 * POSITION_BINS
CLASSES = 4 * POSITION_BINS
# Saved with the learned hazard: a state saved with another layout (an older version's) is relearned.
REUSE_LAYOUT = f"bins={','.join(map(str, RETENTION_BOUNDS))};reused;newest,long-reply;logit8"


def is_fresh(block_class: int) -> bool:
    """Only one prompt has used the block so far."""
    return block_class < REUSED or TAIL <= block_class


def reused_class(block_class: int) -> int:
    """A block's class once a second prompt has used it: its position bin, reused."""
    return block_class % POSITION_BINS + REUSED


def tail_class(position: int, newest_from: float) -> int:
    """A block's class when a prompt first stores it (``newest_from``: the newest message's first block)."""
    return position_bin(position) + (TAIL if position >= newest_from else 0)


def reply_class(block_class: int, long_reply: bool) -> int:
    """A newest-message block's class given its prompt's reply (known once the step ended; unknown: short)."""
    return block_class + POSITION_BINS if long_reply and TAIL <= block_class < TAIL + POSITION_BINS else block_class


def position_bin(position: int) -> int:
    """The bin of a chain position (a chained hash has exactly one)."""
    return bisect.bisect_right(RETENTION_BOUNDS, position) - 1


class ReuseHazard:
    """Per agent, age and position bin: P(the agent's next prompt in a session reuses a block of age ``age``).

    A block's age for a user is how many prompts ago the user last had it (0:
    its latest prompt). Agents alternate prompt families (a role prompt per
    phase or per peer), so a block the latest prompt dropped often comes back a
    few calls later: this is the hazard of reuse by age. Cells are per block
    class (``CLASSES``): chain position bin, whether a second prompt has used
    the block, whether it is in its prompt's newest message and, if so,
    whether the prompt's reply was long for its agent.

    Each prompt is one observation: the reused fraction of the blocks in a
    class. A cell starts at its first observation, then follows an EWMA, in
    one byte to keep state bounded (state budget: 64 agents in 20 KB): 0
    for no observation, else the value on a logit scale (254 steps from
    0.001 to 0.999). The scale is fine where hazards are small, which is
    where a block's rank is decided (density is compared on a log scale),
    and fine enough everywhere that an EWMA step is not rounded away: the
    earlier linear six-bit value ignored any step under 1/126 and froze
    cells near their first observations (chatdev's share of the LRU→Belady
    gap over ``evaluation.sweep --grid``'s 12 settings: 59.5% → 66.6%).
    Reading shrinks a cell toward the mean over the agents that have one
    (and that toward a prior) with ``strength`` pseudo-observations, so an
    unlucky prompt does not price a class at zero.
    """

    PRIOR = 0.5
    ALPHA = 0.25
    OBSERVED_WEIGHT = 7.0  # what an EWMA of rate ALPHA weighs, in observations ((2 - a) / a)
    STEPS = 254  # cell values 1..255
    LOGIT_SPAN = 7.0  # cell 1 is sigmoid(-7), cell 255 sigmoid(7)
    VALUES = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_SPAN, LOGIT_SPAN, STEPS + 1)))])

    def __init__(self, strength: float = 2.0) -> None:
        self.strength = strength
        self.arrays = np.zeros((AGES, CLASSES, 8), dtype=np.uint8)
        self.typical_reply = np.zeros(8, dtype=np.float16)  # per agent: EWMA of log(1 + reply tokens)
        self._everyone: dict[tuple[int, int], float] = {}  # all agents' mean per (age, class), until the next update
        self._first: dict[tuple, list[float]] = {}  # first_reuse's answers, until the next update
        self._hazards: dict[tuple, float] = {}  # hazard's answers, until the next update

    def long_reply(self, i: int, output_tokens: int | None) -> bool:
        """Whether a reply is longer than the agent's typical one so far (False when unknown); then learn it."""
        if output_tokens is None or output_tokens < 0:
            return False
        while i >= self.typical_reply.shape[0]:
            self.typical_reply = np.concatenate([self.typical_reply, np.zeros_like(self.typical_reply)])
        value = math.log1p(output_tokens)
        typical = float(self.typical_reply[i])
        self.typical_reply[i] = value if typical == 0 else typical + self.ALPHA * (value - typical)
        return typical > 0 and value > typical

    def observe(self, i: int, chains: Iterable[list[str]], current: Iterable[str],
                class_of: Callable[[str, int], int], long_replies: Sequence[bool] = ()) -> None:
        """Learn from a new prompt (``current``) which blocks of the user's earlier prompts (newest first) it reused.

        ``class_of(hash, position)`` is the block's class before this prompt used it.
        """
        while i >= self.arrays.shape[2]:
            self.arrays = np.concatenate([self.arrays, np.zeros_like(self.arrays)], axis=2)
        self._everyone.clear()
        self._first.clear()
        self._hazards.clear()
        current = set(current)
        seen: set[str] = set()
        classes = self.arrays.shape[1]
        for age, chain in enumerate(chains):
            total = [0] * classes
            reused = [0] * classes
            for p, block_hash in enumerate(chain):
                if block_hash in seen:
                    continue  # younger in a newer prompt
                seen.add(block_hash)
                b = reply_class(class_of(block_hash, p), age < len(long_replies) and long_replies[age])
                total[b] += 1
                reused[b] += block_hash in current
            for b, n in enumerate(total):
                if n:
                    self._update(age, b, i, reused[b] / n)

    def _update(self, age: int, b: int, i: int, outcome: float) -> None:
        cell = int(self.arrays[age, b, i])
        previous = float(self.VALUES[cell])
        value = outcome if cell == 0 else previous + self.ALPHA * (outcome - previous)
        self.arrays[age, b, i] = self._encode(value)

    @classmethod
    def _encode(cls, value: float) -> int:
        """The cell (1..255) nearest a value on the logit scale."""
        logit = math.log(max(value, 1e-9) / max(1.0 - value, 1e-9))
        return 1 + min(max(round((logit + cls.LOGIT_SPAN) / (2 * cls.LOGIT_SPAN) * cls.STEPS), 0), cls.STEPS)

    def hazard(self, age: int, i: int | None, position_bin: int) -> float:
        """The agent's reuse probability for a block of this age and class, shrunk toward all agents' mean.

        Kept until the next update: an act asks for the same few cells once per block of every kept prefix."""
        key = (age, i, position_bin)
        found = self._hazards.get(key)
        if found is None:
            found = self._hazards[key] = self._hazard(min(age, AGES - 1), i, position_bin)
        return found

    def _hazard(self, age: int, i: int | None, position_bin: int) -> float:
        k = self.strength
        cells = self.arrays[age, position_bin]
        everyone = self._everyone.get((age, position_bin))
        if everyone is None:
            observed = float(np.count_nonzero(cells)) * self.OBSERVED_WEIGHT
            everyone = self._everyone[(age, position_bin)] = (
                (float(self.VALUES[cells].sum()) * self.OBSERVED_WEIGHT + k * self.PRIOR) / (observed + k))
        if i is None or i >= cells.shape[0]:
            return everyone
        cell = int(cells[i])
        if cell == 0:
            return everyone
        return (self.OBSERVED_WEIGHT * float(self.VALUES[cell]) + k * everyone) / (self.OBSERVED_WEIGHT + k)

    def first_reuse(self, age: int, i: int | None, position_bin: int) -> list[float]:
        """P(the agent's j-th next prompt is the first to reuse a block of this age and class), j = 0..

        Kept until the next update: a scorer asks for the same few cells on every act.
        """
        key = (age, i, position_bin)
        found = self._first.get(key)
        if found is None:
            found, not_yet = [], 1.0
            for j in range(max(AGES - age, 0)):
                h = self.hazard(age + j, i, position_bin)
                found.append(not_yet * h)
                not_yet *= 1.0 - h
            self._first[key] = found
        return found

    def nbytes(self, n: int) -> int:
        return self.arrays.shape[0] * self.arrays.shape[1] * n * self.arrays.itemsize + n * self.typical_reply.itemsize
