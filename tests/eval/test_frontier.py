"""Equal-L0 comparison: interpolation in log L0 on hand-made frontiers."""

import math

import pytest

from gsae_jax.eval import frontier


def test_interpolation_is_linear_in_log_l0():
  pts = [(4.0, 0.5), (16.0, 0.9)]
  assert frontier.interpolate_at_l0(pts, 8.0) == pytest.approx(0.7)  # log2 8 is halfway
  assert frontier.interpolate_at_l0(pts, 4.0) == pytest.approx(0.5)
  assert frontier.interpolate_at_l0(list(reversed(pts)), 16.0) == pytest.approx(0.9)
  assert frontier.interpolate_at_l0(pts, 2.0) is None and frontier.interpolate_at_l0(pts, 20.0) is None
  assert frontier.interpolate_at_l0([(4.0, None), (8.0, float("nan"))], 5.0) is None


def test_shared_l0_is_the_middle_of_the_common_range():
  assert frontier.shared_l0([[2, 8, 32], [4, 64]]) == pytest.approx(math.sqrt(4 * 32))
  assert frontier.shared_l0([[2, 3], [10, 20]]) is None


def test_compare_at_equal_l0_interpolates_each_architecture_and_picks_nearest():
  runs = [{"architecture": "a", "l0": 4.0, "fvu": 0.4}, {"architecture": "a", "l0": 16.0, "fvu": 0.2},
          {"architecture": "b", "l0": 2.0, "fvu": 0.5}, {"architecture": "b", "l0": 32.0, "fvu": 0.1},
          {"architecture": "b", "l0": 0.0, "fvu": 1.0}]  # a dead SAE is left out
  out = frontier.compare_at_equal_l0(runs, ["fvu"])
  assert out["l0"] == pytest.approx(8.0) == out["anchor_l0"]
  assert out["architectures"]["a"]["fvu"] == pytest.approx(0.3)
  assert out["architectures"]["b"]["fvu"] == pytest.approx(0.5 - 0.4 * math.log(4) / math.log(16))
  assert out["architectures"]["a"]["nearest"]["l0"] in (4.0, 16.0)
  assert out["architectures"]["b"]["nearest"]["l0"] == 2.0  # log distance 2 vs 4 from 8
  with pytest.raises(ValueError, match="no SAE"):
    frontier.compare_at_equal_l0([{"architecture": "a", "l0": 0.0}], ["fvu"])
