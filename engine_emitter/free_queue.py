"""A drop-in for vLLM's free block queue that evicts by score, LRU within a score level.

vLLM 0.32 takes every block to reuse from ``BlockPool.free_block_queue``
(``popleft_n`` in ``get_new_blocks``): that order *is* its eviction policy.
This queue keeps one of vLLM's own doubly linked lists per level: level 0
holds blocks with no cached content (reused first, as stock does), levels
1..N hold cached blocks by score bucket, lowest first. Every operation is
O(levels), never a scan of the free list; with no scores at all every cached
block lands in one level and the order is exactly stock LRU.
"""
from __future__ import annotations

from typing import Callable, Iterator

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock


class ScoredFreeBlockQueue:
    def __init__(self, stock: FreeKVCacheBlockQueue, levels: int,
                 level_of: Callable[[KVCacheBlock], int]) -> None:
        self._queues = [FreeKVCacheBlockQueue([]) for _ in range(levels + 1)]
        self._level: dict[int, int] = {}  # block_id -> level, for blocks in the queue
        self._level_of = level_of
        self._free = 0  # kept in step: vLLM reads num_free_blocks on every allocation check
        self.evicted_by_level = [0] * (levels + 1)  # cached blocks handed out for reuse, by level
        blocks = stock.popleft_n(stock.num_free_blocks)  # keep their current order
        self.append_n(blocks)

    @property
    def num_free_blocks(self) -> int:
        return self._free

    def level(self, block: KVCacheBlock) -> int | None:
        return self._level.get(block.block_id)

    def popleft(self) -> KVCacheBlock:
        for q in self._queues:
            if q.num_free_blocks:
                block = q.popleft()
                self._free -= 1
                level = self._level.pop(block.block_id)
                if block.block_hash is not None:
                    self.evicted_by_level[level] += 1
                return block
        raise ValueError("No free blocks available")

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        out: list[KVCacheBlock] = []
        for q in self._queues:
            if len(out) == n:
                break
            take = min(n - len(out), q.num_free_blocks)
            if take:
                out.extend(q.popleft_n(take))
        self._free -= len(out)
        if len(out) < n:
            raise AssertionError(f"asked for {n} free blocks, {len(out)} available")
        for block in out:
            level = self._level.pop(block.block_id)
            if block.block_hash is not None:
                self.evicted_by_level[level] += 1
        return out

    def remove(self, block: KVCacheBlock) -> None:
        level = self._level.pop(block.block_id)
        self._queues[level].remove(block)
        self._free -= 1

    def append(self, block: KVCacheBlock) -> None:
        level = self._level_of(block)
        self._queues[level].append(block)
        self._level[block.block_id] = level
        self._free += 1

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        for block in blocks:
            self.append(block)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        # vLLM prepends only blocks without cached content: level 0, reused first.
        self._queues[0].prepend_n(blocks)
        self._free += len(blocks)
        for block in blocks:
            self._level[block.block_id] = 0

    def relevel(self, block: KVCacheBlock) -> bool:
        """Move a free block to the level its score now says (to that level's MRU end)."""
        current = self._level.get(block.block_id)
        if current is None:
            return False
        target = self._level_of(block)
        if target != current:
            self._queues[current].remove(block)
            self._queues[target].append(block)
            self._level[block.block_id] = target
        return True

    def relevel_all(self) -> None:
        """Every free block to the level its state says now (after vLLM dropped all cached content)."""
        for q in self._queues[1:]:
            for block in q.get_all_free_blocks():
                self.relevel(block)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return [b for q in self._queues for b in q.get_all_free_blocks()]

    def iter_blocks_after(self, cursor: KVCacheBlock | None) -> Iterator[KVCacheBlock]:
        seen_cursor = cursor is None
        for block in self.get_all_free_blocks():
            if seen_cursor:
                yield block
            elif block is cursor:
                seen_cursor = True

    def check(self) -> None:
        """Consistency of the bookkeeping with the lists (tests)."""
        sizes = [q.num_free_blocks for q in self._queues]
        assert sum(sizes) == self._free == len(self._level), (sizes, self._free, len(self._level))

    def level_sizes(self) -> list[int]:
        return [q.num_free_blocks for q in self._queues]
