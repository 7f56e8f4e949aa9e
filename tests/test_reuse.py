"""The reuse hazard by prompt age and block class, tested directly."""
from __future__ import annotations

from policy_workers.reuse import (AGES, POSITION_BINS, ReuseHazard, is_fresh, position_bin, reply_class,
                                  reused_class, tail_class)


def test_a_block_class_moves_once_from_fresh_to_reused_and_keeps_its_position_bin():
    head, newest = tail_class(5, newest_from=12), tail_class(20, newest_from=12)
    assert head == position_bin(5) and newest != position_bin(20)
    assert is_fresh(head) and is_fresh(newest) and is_fresh(reply_class(newest, True))
    for cls in (head, newest, reply_class(newest, True)):
        reused = reused_class(cls)
        assert not is_fresh(reused)
        assert reused % POSITION_BINS == cls % POSITION_BINS
        assert reused_class(reused) == reused
    assert reply_class(head, True) == head  # only a newest-message block is priced by its reply


def test_first_reuse_is_a_distribution_over_the_next_prompts():
    reuse = ReuseHazard()
    for _ in range(10):  # a block the latest prompt dropped comes back in the one after
        reuse.observe(0, [["a"], ["b"]], ["b"], lambda h, p: 3)
    first = reuse.first_reuse(0, 0, 3)
    assert len(first) == AGES
    assert sum(first) <= 1.0 + 1e-9
    assert first[0] < 0.2 and first[1] > 0.6


def test_a_small_reuse_rate_is_learned_not_rounded_away():
    """One block in 50, then one in 200, reused: near these rates an EWMA step is under 1/126, which a
    linear six-bit cell rounded away (it stopped at 1/63); the logit-scale cell follows them."""
    reuse = ReuseHazard(strength=0.0)  # the cell's own value, not shrunk toward other agents
    chain = [f"b{k}" for k in range(50)]
    reuse.observe(0, [chain], [], lambda h, p: 5)
    for _ in range(40):
        reuse.observe(0, [chain], chain[:1], lambda h, p: 5)
    assert 0.015 < reuse.hazard(0, 0, 5) < 0.025
    longer = [f"c{k}" for k in range(200)]
    for _ in range(40):  # and down to one in 200
        reuse.observe(0, [longer], longer[:1], lambda h, p: 5)
    assert 0.004 < reuse.hazard(0, 0, 5) < 0.007
