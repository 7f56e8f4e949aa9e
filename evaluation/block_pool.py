"""A vLLM v1 prefix-cache block pool as the simulator keeps it (pure, no I/O): which hashes have a cached
block, which blocks are empty, who uses each block and the free cached blocks' eviction order (the policy).
``evaluation.simulator`` drives it one call at a time, ``evaluation.batched`` one engine step at a time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence


class EvictionOrder:
    """Free cached blocks, in the order they would be evicted."""

    def add(self, h: str, now: int) -> None: ...
    def remove(self, h: str) -> None: ...
    def pop(self, now: int) -> str: ...
    def __len__(self) -> int: ...
    def __contains__(self, h: str) -> bool: ...


@dataclass
class SimResult:
    policy: str
    capacity_blocks: int
    prompt_tokens: int = 0
    hit_tokens: int = 0
    calls: int = 0
    evictions: int = 0
    prefetches: int = 0  # prefetches run (one whose blocks were all resident is not)
    prefetch_tokens: int = 0  # prompt tokens they computed (their resident heads were hits)
    per_call_hits: list[int] = field(default_factory=list, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens computed: the calls' uncached tokens plus every prefetch's (the engine's account)."""
        return self.prompt_tokens - self.hit_tokens + self.prefetch_tokens


class BlockPool:
    """The blocks of a run: hashes with a cached block (in use or free), empty blocks, who uses each block,
    and the free cached blocks' eviction ``order``. A hash is one block (see the module's simplification)."""

    def __init__(self, capacity_blocks: int, order: EvictionOrder, result: SimResult,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.order, self.result, self.on_evict = order, result, on_evict
        self.cached: set[str] = set()
        self.empty = capacity_blocks  # blocks with no cached content (never cached, or dropped)
        self.users: dict[str, int] = {}  # hash -> requests using its block

    @property
    def free(self) -> int:
        """Blocks an allocation can take: empty ones and free cached ones."""
        return self.empty + len(self.order)

    def resident_head(self, hashes: Iterable[str]) -> int:
        found = 0
        for h in hashes:
            if h not in self.cached:
                break
            found += 1
        return found

    def cache_hit(self, hashes: Iterable[str], tokens: int, block_size: int) -> tuple[int, int]:
        """(blocks hit, resident blocks computed again) for a request of ``tokens`` tokens whose full blocks are
        ``hashes``: as vLLM's ``get_computed_blocks``, a hit is whole blocks and never the last token, so a
        request cached to its end on a block boundary computes its last block again."""
        resident = self.resident_head(hashes)
        hit = min(resident, max(tokens - 1, 0) // block_size)
        return hit, resident - hit

    def take(self, h: str) -> None:
        """A request uses ``h``'s cached block: out of the free queue while anyone does."""
        if h in self.order:
            self.order.remove(h)
        self.users[h] = self.users.get(h, 0) + 1

    def allocate(self, need: int, now: int) -> None:
        """Take ``need`` blocks: empty ones first (vLLM puts them at the front of its free queue), then free
        cached ones in eviction order."""
        take_empty = min(need, self.empty)
        self.empty -= take_empty
        for _ in range(need - take_empty):
            if len(self.order) == 0:
                break  # the request does not fit: in vLLM it would wait; counted as computed
            victim = self.order.pop(now)
            self.cached.discard(victim)
            self.result.evictions += 1
            if self.on_evict:
                self.on_evict(victim)

    def compute(self, h: str) -> None:
        """A newly computed full block, used by the request that computed it."""
        self.cached.add(h)
        self.users[h] = self.users.get(h, 0) + 1

    def release(self, hashes: Sequence[str], spare: int, now: int) -> None:
        """A request's blocks, freed tail first (the chain's tail is evicted first, as vLLM orders them); ``spare``
        blocks hold nothing reusable (a partial block, a recomputed copy) and are empty again."""
        for h in reversed(hashes):
            self.users[h] -= 1
            if not self.users[h]:
                del self.users[h]
                self.order.add(h, now)
        self.empty += spare


def generated_block(call_index: int, position: int) -> str:
    """A block generated tokens filled: its tokens are random, so nothing else ever has its hash."""
    return f"{call_index}:generated:{position}"
