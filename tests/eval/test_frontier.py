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
  # within a search's tolerance beyond an end: the end's value; farther: still None
  assert frontier.interpolate_at_l0(pts, 17.5, tolerance=0.1) == pytest.approx(0.9)
  assert frontier.interpolate_at_l0(pts, 3.7, tolerance=0.1) == pytest.approx(0.5)
  assert frontier.interpolate_at_l0(pts, 17.7, tolerance=0.1) is None


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


# A hand-made frontier: loss recovered 0.6, 0.8, 0.9 at L0 4, 16, 64 (equal steps in log L0).
GATED = [(4.0, 0.7), (16.0, 0.9)]
BASELINE = [(4.0, 0.6), (16.0, 0.8), (64.0, 0.9)]


def _runs():
  return ([{"architecture": "gated", "l0": l0, "ce_loss_score": v, "fvu": 1 - v} for l0, v in GATED]
          + [{"architecture": "baseline", "l0": l0, "ce_loss_score": v, "fvu": 1 - v}
             for l0, v in BASELINE]
          + [{"architecture": "baseline", "l0": 0.0, "ce_loss_score": 0.0}])  # dead: left out


def test_l0_for_metric_inverts_the_interpolation():
  assert frontier.l0_for_metric(BASELINE, 0.7) == pytest.approx(8.0)  # halfway in log L0 4..16
  assert frontier.l0_for_metric(BASELINE, 0.85) == pytest.approx(32.0)
  assert frontier.l0_for_metric(BASELINE, 0.6) == pytest.approx(4.0)
  for l0 in (5.0, 20.0, 50.0):  # inverse of interpolate_at_l0 on a monotone frontier
    v = frontier.interpolate_at_l0(BASELINE, l0)
    assert frontier.l0_for_metric(BASELINE, v) == pytest.approx(l0)
  assert frontier.l0_for_metric(BASELINE, 0.95) is None  # outside: no extrapolation
  assert frontier.l0_for_metric(BASELINE, 0.5) is None
  # not monotone: the smallest L0 that reaches the value
  assert frontier.l0_for_metric([(2.0, 0.5), (8.0, 0.9), (32.0, 0.7)], 0.8) == pytest.approx(
      math.exp(math.log(2) + 0.75 * math.log(4)))


def test_compare_at_targets_interpolates_and_gives_the_headline_ratio():
  out = frontier.compare_at_targets(_runs(), [8.0, 16.0, 32.0], ["ce_loss_score", "fvu"],
                                    ratio=("gated", "baseline"))
  at8, at16, at32 = out
  assert at8["architectures"]["gated"]["ce_loss_score"] == pytest.approx(0.8)
  assert at8["architectures"]["gated"]["fvu"] == pytest.approx(0.2)
  assert at8["architectures"]["baseline"]["ce_loss_score"] == pytest.approx(0.7)
  # the baseline reaches Gated's 0.8 at L0 16 (2x) and Gated's 0.9 at 64 (4x)
  assert (at8["baseline_l0"], at8["baseline_l0_ratio"]) == pytest.approx((16.0, 2.0))
  assert (at16["baseline_l0"], at16["baseline_l0_ratio"]) == pytest.approx((64.0, 4.0))
  # 32 is past Gated's frontier: no value, no ratio; the baseline's own value is still given
  assert at32["architectures"]["gated"]["ce_loss_score"] is None and at32["baseline_l0"] is None
  assert at32["architectures"]["baseline"]["ce_loss_score"] == pytest.approx(0.85)
  assert frontier.compare_at_targets(_runs(), [8.0], ["fvu"])[0]["baseline_l0"] is None  # no ratio


def test_next_coefficients_secant_in_log_log():
  truth = lambda c: 40.0 * c ** -0.5  # L0 falls as the coefficient grows
  pts = [(c, truth(c)) for c in (0.1, 1.0, 10.0)]  # L0 126, 40, 12.6
  # on a power law the secant in log-log is exact, inside the points and outside them
  for got, t in zip(frontier.next_coefficients(pts, [20.0, 100.0, 8.0]), [20.0, 100.0, 8.0]):
    assert truth(got) == pytest.approx(t)
  # extrapolation is capped at max_step past the end point
  assert frontier.next_coefficients(pts, [0.4])[0] == pytest.approx(80.0)
  assert frontier.next_coefficients(pts, [1e5], max_step=4.0)[0] == pytest.approx(0.025)
  # a flat end (every feature dead at both ends) still moves the right way
  assert frontier.next_coefficients([(1.0, 0.0), (2.0, 0.0)], [8.0])[0] == pytest.approx(1 / 8)
  with pytest.raises(ValueError, match="no measured point"):
    frontier.next_coefficients([(0.0, 3.0)], [8.0])


def test_report_section_at_target_l0s():
  from gsae_jax.eval import report
  text = report.target_l0_section(_runs(), [8.0, 32.0], ("gated", "baseline"))
  assert "| 8 | gated | 0.8000 | 0.2000 |" in text and "| 32 | gated | - | - |" in text
  assert "at L0 8: 16.0 (2.00x); at L0 32: outside the frontiers" in text
