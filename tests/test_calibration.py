"""What prefetches of a given confidence serve (pure)."""
from __future__ import annotations

import json

import pytest

from policy_workers.calibration import PrefetchCalibration, served_fraction


def test_with_no_outcomes_a_prediction_is_taken_at_its_word():
    calibration = PrefetchCalibration()
    assert calibration.served(0.3) == pytest.approx(0.3)
    assert calibration.served(0.8) == pytest.approx(0.8)


def test_outcomes_move_their_own_bin_only():
    calibration = PrefetchCalibration(bins=10, strength=2.0)
    for _ in range(50):
        calibration.observe(0.35, 0.9)  # predictions at 0.3-0.4 served most of what they would compute
        calibration.observe(0.85, 0.1)  # confident ones served little
    assert calibration.served(0.31) > 0.8 and calibration.served(0.89) < 0.2
    assert calibration.served(0.55) == pytest.approx(0.55)


def test_old_outcomes_fade():
    calibration = PrefetchCalibration(decay=0.9)
    for served in [0.0] * 50 + [1.0] * 50:
        calibration.observe(0.6, served)
    assert calibration.served(0.6) > 0.9


def test_state_round_trips_through_json():
    calibration = PrefetchCalibration()
    calibration.observe(0.42, 0.5)
    restored = PrefetchCalibration()
    restored.load_state(json.loads(json.dumps(calibration.to_state())))
    assert restored.served(0.42) == calibration.served(0.42)
    for other in ([[0.0, 0.0]], {"read": [[0.0, 0.0]], "kept": [1.0, 2.0]}):  # another layout: ignored
        restored.load_state(other)
        assert restored.served(0.42) == calibration.served(0.42)


def test_prefetches_evicted_before_their_call_scale_every_bin_down():
    calibration = PrefetchCalibration(strength=2.0)
    calibration.observe(0.9, 1.0)
    before = calibration.served(0.9)
    for _ in range(20):
        calibration.observe_kept(resident=2, read=4)  # half of what the next prompts read was evicted again
    assert 0.5 < calibration.kept_share() < 0.55
    assert calibration.served(0.9) == before * calibration.kept_share()
    calibration.observe_kept(resident=0, read=0)  # nothing read: nothing learned
    assert 0.5 < calibration.kept_share() < 0.55


def test_served_fraction_counts_the_blocks_the_next_prompt_read():
    assert served_fraction(("a", "b", "c", "d"), {"a", "b", "x"}) == 0.5
    assert served_fraction((), {"a"}) == 0.0
