"""Seed statistics: against scipy on fixed inputs, against hand arithmetic, and the edge cases in words."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from asura.sweep.stats import NO_TEST, PAIRED, WELCH, compare_seeds, describe, t_quantile

# Fixed inputs (no RNG): five seeds of two groups, the second worse by about 0.1 with seed noise shared.
A5 = {0: 2.31, 1: 2.45, 2: 2.28, 3: 2.52, 4: 2.39}
B5 = {0: 2.40, 1: 2.58, 2: 2.36, 3: 2.60, 4: 2.47}
# Hand case (df = 2, where Student t has a closed form): per-seed differences -0.5, -0.4, -0.6.
HAND_A = {0: 2.0, 1: 2.3, 2: 2.1}
HAND_B = {0: 2.5, 1: 2.7, 2: 2.7}


def test_t_quantile_by_hand():
    # df = 2: F(t) = 1/2 + t / (2·sqrt(2 + t²)), so F = 0.975 gives t = q·sqrt(2 / (1 - q²)) with q = 0.95.
    assert t_quantile(2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-12)
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)  # the printed table value


def test_describe_against_scipy():
    vals = list(A5.values())
    s = describe(vals)
    lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=sps.sem(vals))
    assert (s.n, s.mean, s.std) == (5, pytest.approx(np.mean(vals)), pytest.approx(np.std(vals, ddof=1)))
    assert (s.low, s.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_describe_by_hand():
    s = describe([1.0, 2.0, 3.0])  # mean 2, sample sd 1, so the half-width is t(0.975, 2)/sqrt(3)
    assert (s.mean, s.std) == (2.0, 1.0)
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)  # 2.484138
    assert s.note == "95% CI [-0.4841, 4.484], n = 3"


def test_describe_one_value_has_no_interval():
    s = describe([2.5])
    assert (s.n, s.mean, s.std, s.half_width, s.low, s.high) == (1, 2.5, 0.0, None, None, None)
    assert s.note == "n = 1: no interval"
    assert describe([]).note == "no complete seeds" and describe([]).mean is None


def test_describe_zero_variance():
    s = describe([2.0, 2.0, 2.0])
    assert (s.std, s.half_width, s.low, s.high) == (0.0, 0.0, 2.0, 2.0)


def test_paired_by_hand():
    c = compare_seeds(HAND_A, HAND_B, direction="minimize", names=("looped", "iso_param"), metric="ce",
                      kind="iso-param")  # fmt: skip
    # mean(d) = -0.5, sd(d) = 0.1, se = 0.1/sqrt(3), t = -5·sqrt(3) = -8.660; df = 2:
    # two-sided p = 1 - |t|/sqrt(2 + t²) = 1 - sqrt(75/77); half-width = t(0.975, 2)·se.
    assert c.method == PAIRED and (c.n_a, c.n_b, c.df) == (3, 3, 2.0)
    assert c.diff == pytest.approx(-0.5) and c.t == pytest.approx(-5 * math.sqrt(3))
    assert c.p == pytest.approx(1 - math.sqrt(75 / 77), rel=1e-9)  # 0.013072
    assert c.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)  # 0.248414
    assert c.significant and c.better == "looped"
    assert c.verdict == "looped beats iso_param by 0.50 ± 0.25 ce (iso-param, paired t-test p = 0.013, n = 3 seeds)"


def test_paired_against_scipy():
    c = compare_seeds(A5, B5, direction="minimize", names=("a", "b"), metric="ce")
    res = sps.ttest_rel(list(A5.values()), list(B5.values()))
    ci = res.confidence_interval(0.95)
    assert c.method == PAIRED and c.p == pytest.approx(res.pvalue, rel=1e-12)
    assert c.t == pytest.approx(res.statistic, rel=1e-12) and c.df == res.df
    assert (c.diff - c.half_width, c.diff + c.half_width) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # Pairing matters here: the unpaired test on the same numbers does not find the difference.
    assert c.p < 0.001 < 0.05 < sps.ttest_ind(list(A5.values()), list(B5.values()), equal_var=False).pvalue
    assert c.verdict == "a beats b by 0.092 ± 0.027 ce (paired t-test p < 0.001, n = 5 seeds)"  # d̄ = -0.46/5


def test_pairs_by_seed_not_by_order():
    shuffled = {s: B5[s] for s in (3, 0, 4, 2, 1)}
    assert compare_seeds(A5, shuffled, direction="minimize").p == compare_seeds(A5, B5, direction="minimize").p


def test_direction_follows_the_metric():
    hi = compare_seeds(HAND_A, HAND_B, direction="maximize", names=("looped", "iso_param"), metric="exact_match")
    assert hi.better == "iso_param" and hi.verdict.startswith("iso_param beats looped by 0.50 ± 0.25 exact_match")
    with pytest.raises(ValueError, match="direction must be 'minimize' or 'maximize'"):
        compare_seeds(HAND_A, HAND_B, direction="lower")


def test_no_significant_difference():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.1, 1: 1.9, 2: 3.2}
    c = compare_seeds(a, b, direction="minimize", names=("x", "y"), metric="ce", kind="neither")
    assert c.p == pytest.approx(sps.ttest_rel([1, 2, 3], [1.1, 1.9, 3.2]).pvalue)
    assert not c.significant and c.better is None
    assert (
        c.verdict == "no significant difference: x − y = -0.07 ± 0.38 ce (neither, paired t-test p = 0.53, n = 3 seeds)"
    )


def test_unpaired_fallback_is_welch_and_says_so():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 4.0, 3: 6.0}  # seeds 1, 2 only in a; 3 only in b
    c = compare_seeds(a, b, direction="minimize", names=("x", "y"), metric="ce")
    res = sps.ttest_ind([1.0, 2.0, 3.0], [4.0, 6.0], equal_var=False)
    ci = res.confidence_interval(0.95)
    assert c.method == WELCH and c.why == "seeds differ: x only [1, 2]; y only [3]"
    assert c.p == pytest.approx(res.pvalue, rel=1e-12) and c.df == pytest.approx(res.df, rel=1e-12)
    assert (c.diff - c.half_width, c.diff + c.half_width) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # By hand: var 1 and 2, se² = 1/3 + 2/2; Welch–Satterthwaite df = (4/3)² / ((1/3)²/2 + 1²/1) = 1.684211.
    assert c.diff == -3.0 and c.df == pytest.approx((4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + 1), rel=1e-12)
    assert "(Welch t-test (unpaired) p = 0.14, n = 3 vs 2 seeds)" in c.verdict
    assert c.verdict.startswith("no significant difference: x − y = -3.0 ± ")


@pytest.mark.parametrize(("a", "b", "who"), [({0: 2.0}, {0: 2.5, 1: 2.6}, "x"), ({0: 2.0, 1: 2.1}, {1: 2.5}, "y")])
def test_one_seed_is_not_tested(a, b, who):
    c = compare_seeds(a, b, direction="minimize", names=("x", "y"), metric="ce", kind="iso-FLOP")
    assert c.method == NO_TEST and (c.p, c.half_width, c.significant, c.better) == (None, None, None, None)
    assert c.verdict.startswith("not tested: x − y = ") and f"{who} has n = 1: no interval, no test" in c.verdict
    none = compare_seeds({}, b, direction="minimize", names=("x", "y"))
    assert none.verdict == "not compared: x has no complete seed" and none.diff is None


def test_zero_spread_is_exact_not_a_p_value():
    # Differences equal in every seed up to float rounding: scipy would report t ≈ 1e15, p = 0.
    a = {s: 0.1 * s + 0.3 for s in range(3)}
    b = {s: 0.1 * s + 0.2 for s in range(3)}
    c = compare_seeds(a, b, direction="minimize", names=("x", "y"), metric="ce")
    assert c.method == NO_TEST and c.p is None and c.half_width == 0.0 and c.better == "y"
    assert c.verdict == "y beats x by 0.1 ce in every seed (paired, zero spread: no t-test, n = 3 seeds)"
    same = compare_seeds(a, dict(a), direction="minimize", names=("x", "y"))
    assert (
        same.verdict
        == "no difference: x and y are identical in every seed (paired, zero spread: no t-test, n = 3 seeds)"
    )
    flat = compare_seeds({0: 2.0, 1: 2.0}, {2: 2.5, 3: 2.5}, direction="minimize", names=("x", "y"), metric="ce")
    assert flat.verdict.startswith("x beats y by 0.5 ce with no spread within either group (unpaired")
