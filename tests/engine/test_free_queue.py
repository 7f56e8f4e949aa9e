"""The score-ordered free block queue on vLLM's own block objects (no engine)."""
from __future__ import annotations

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

from engine_emitter.free_queue import ScoredFreeBlockQueue


def _queue(levels_by_id: dict[int, int], n: int = 10):
    blocks = [KVCacheBlock(i) for i in range(n)]
    queue = ScoredFreeBlockQueue(FreeKVCacheBlockQueue([]), 3, lambda b: levels_by_id.get(b.block_id, 2))
    return blocks, queue


def test_lowest_level_first_and_lru_within_a_level():
    levels = {0: 3, 1: 1, 2: 2, 3: 1, 4: 3, 5: 0}
    blocks, queue = _queue(levels, 6)
    queue.append_n(blocks)  # appended in id order: that is the LRU order inside each level
    assert [b.block_id for b in queue.popleft_n(6)] == [5, 1, 3, 2, 0, 4]
    queue.check()
    assert queue.num_free_blocks == 0


def test_remove_relevel_and_prepend_keep_the_bookkeeping_exact():
    levels = {i: 2 for i in range(8)}
    blocks, queue = _queue(levels, 8)
    queue.append_n(blocks[:6])
    queue.remove(blocks[2])  # a prefix hit takes a free block back
    levels[4] = 1
    assert queue.relevel(blocks[4]) and not queue.relevel(blocks[2])
    queue.prepend_n([blocks[6], blocks[7]])  # uncached blocks: reused first
    queue.check()
    assert queue.num_free_blocks == 7
    assert [b.block_id for b in queue.popleft_n(4)] == [6, 7, 4, 0]
    assert queue.popleft().block_id == 1
    queue.check()
