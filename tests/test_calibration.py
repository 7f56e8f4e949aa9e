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
    restored.load_state([[0.0, 0.0]])  # another layout is ignored, not misread
    assert restored.served(0.42) == calibration.served(0.42)


def test_served_fraction_counts_the_blocks_the_next_prompt_read():
    assert served_fraction(("a", "b", "c", "d"), {"a", "b", "x"}) == 0.5
    assert served_fraction((), {"a"}) == 0.0
