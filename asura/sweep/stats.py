"""Statistics over seeds: a group's mean and 95% interval, and a test of each comparison.

    describe(values)                          -> Summary: n, mean, std, 95% CI (Student t)
    compare_seeds(a, b, direction=..., ...)   -> SeedComparison: difference, its 95% CI, the
                                                 test, p, and the verdict in words

``a`` and ``b`` map ``train.seed`` -> metric value (complete trials only). The test:

* **paired t-test** (``scipy.stats.ttest_rel``) when both groups ran exactly the same seeds.
  The same seed gives the same data order (task examples and shuffle are functions of
  ``train.seed``) and the same init key stream (``nnx.Rngs(train.seed)``; identical initial
  weights only where shapes match), so the per-seed difference cancels the noise both runs share;
  the interval is mean(d) ± t(0.975, n-1)·sd(d)/√n over the per-seed differences d.
* **Welch t-test, unpaired** (``ttest_ind(equal_var=False)``) when the seed sets differ (a trial
  failed, or groups ran different seeds), labelled so in the verdict; ``why`` names the seeds. Interval:
  diff ± t(0.975, ν)·√(s²a/na + s²b/nb), ν by Welch–Satterthwaite.
* **no test** when a group has fewer than 2 values (no variance to test against), or when the
  spread is zero (t is ±∞ or 0/0): the verdict says which.

Significance is p < ``ALPHA`` (two-sided), which for a t-test is the same as the difference's 95%
interval excluding 0. "Beats" follows the metric's direction (``asura.sweep.metrics``): lower is
better for ``minimize``, higher for ``maximize``.

A study's protocol (``asura.sweep.protocol``) adds, per family of comparisons:

    holm(p)                  Holm-Bonferroni adjusted p-values (the family-wise error at ALPHA)
    signed_rank_p(a, b)      Wilcoxon signed-rank p over paired seeds (exact for small n): no
                             normality assumed; with n seeds it cannot go below 2 / 2**n
    learned_rates(a, b, ..)  Fisher's exact test on how many seeds "learned" (metric past a
                             threshold): the test for bimodal outcomes, where a mean says little

Pure: numbers in, numbers and words out; no files, no config.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # two-sided: p < ALPHA  <=>  the 95% interval of the difference excludes 0
# A spread below this fraction of the values' magnitude is floating-point rounding of identical
# numbers (one op rounds at ~1e-16 relative), not seed-to-seed variation: treated as zero.
ZERO_SPREAD = 1e-12

PAIRED = "paired t-test"
WELCH = "Welch t-test (unpaired)"
NO_TEST = "no test"


@dataclass(frozen=True)
class Summary:
    """One group over its seeds. ``half_width`` is None when n < 2 (no interval from one value)."""

    n: int
    mean: float | None
    std: float | None  # sample std (n-1); 0.0 for a single value, None for none
    half_width: float | None  # 95% CI half-width, Student t with n-1 degrees of freedom

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def note(self) -> str:
        """How the interval reads in a table cell."""
        if self.n == 0:
            return "no complete seeds"
        if self.half_width is None:
            return "n = 1: no interval"
        return f"95% CI [{self.low:.4g}, {self.high:.4g}], n = {self.n}"


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value: t.ppf((1 + confidence) / 2, df)."""
    return float(sps.t.ppf((1 + confidence) / 2, df))


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Summary(0, None, None, None)
    mean = statistics.fmean(vals)
    if n == 1:
        return Summary(1, mean, 0.0, None)
    std = statistics.stdev(vals)
    return Summary(n, mean, std, t_quantile(n - 1, confidence) * std / math.sqrt(n))


@dataclass(frozen=True)
class SeedComparison:
    """Group a against reference b over seeds. ``diff`` = mean(a) − mean(b) (paired: mean of per-seed
    differences, the same number when the seeds match)."""

    a: str
    b: str
    method: str  # PAIRED | WELCH | NO_TEST
    n_a: int
    n_b: int
    diff: float | None
    half_width: float | None  # 95% CI half-width of diff; None when not tested
    t: float | None
    df: float | None
    p: float | None  # two-sided; None when not tested
    significant: bool | None  # p < ALPHA; None when not tested
    better: str | None  # the name of the better group when the difference is significant or exact
    why: str  # why this method (or why no test), one clause
    verdict: str  # the comparison in words, one line


def decimals(half_width: float) -> int:
    """Decimals that show the half-width to 2 significant digits (0.0812 -> 3, 0.8 -> 2, 12 -> 0)."""
    if half_width <= 0 or not math.isfinite(half_width):
        return 4
    return max(0, 1 - math.floor(math.log10(half_width)))


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _better(diff: float, direction: str) -> bool:
    """Is a (diff = a − b) better than b under the metric's direction?"""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    return diff < 0 if direction == "minimize" else diff > 0


def _spread_is_zero(spread: float, *values: float) -> bool:
    scale = max((abs(v) for v in values), default=0.0)
    return spread <= ZERO_SPREAD * max(scale, 1.0)


def compare_seeds(
    a: Mapping[int, float],
    b: Mapping[int, float],
    *,
    direction: str,
    names: tuple[str, str] = ("a", "b"),
    metric: str = "",
    kind: str | None = None,
    confidence: float = CONFIDENCE,
) -> SeedComparison:
    """Compare group ``a`` with reference ``b`` ({seed: value} each); ``kind`` (iso-param/iso-FLOP/neither)
    is quoted in the verdict. See the module docstring for which test runs when."""
    na, nb = len(a), len(b)
    name_a, name_b = names
    unit = f" {metric}" if metric else ""
    tag = f"{kind}, " if kind else ""
    alpha = 1 - confidence
    if na == 0 or nb == 0:
        who = name_a if na == 0 else name_b
        why = f"{who} has no complete seed"
        return SeedComparison(name_a, name_b, NO_TEST, na, nb, None, None, None, None, None, None, None, why,
                              f"not compared: {why}")  # fmt: skip
    mean_a, mean_b = statistics.fmean(a.values()), statistics.fmean(b.values())
    diff = mean_a - mean_b
    if min(na, nb) < 2:
        who = ", ".join(f"{n} has n = 1" for n, k in ((name_a, na), (name_b, nb)) if k < 2)
        why = f"{who} (a test needs >= 2 seeds per group)"
        verdict = f"not tested: {name_a} − {name_b} = {diff:+.4g}{unit} ({tag}{who}: no interval, no test)"
        return SeedComparison(name_a, name_b, NO_TEST, na, nb, diff, None, None, None, None, None, None, why, verdict)

    paired = set(a) == set(b)
    if paired:
        seeds = sorted(a)
        d = [a[s] - b[s] for s in seeds]
        n_text = f"n = {na} seeds"
        spread = statistics.stdev(d)
        zero = _spread_is_zero(spread, *a.values(), *b.values())
        method, why = PAIRED, f"both ran seeds {seeds}"
    else:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        n_text = f"n = {na} vs {nb} seeds"
        va, vb = statistics.variance(a.values()), statistics.variance(b.values())
        zero = _spread_is_zero(max(va, vb) ** 0.5, *a.values(), *b.values())
        parts = [f"{name_a} only {only_a}" if only_a else "", f"{name_b} only {only_b}" if only_b else ""]
        method, why = WELCH, "seeds differ: " + "; ".join(p for p in parts if p)

    if zero:  # t is ±inf (or 0/0): report the exact difference, no p-value
        how = f"{tag}{'paired' if paired else 'unpaired'}, zero spread: no t-test, {n_text}"
        if _spread_is_zero(abs(diff), mean_a, mean_b):
            verdict = f"no difference: {name_a} and {name_b} are identical in every seed ({how})"
            better = None
        else:
            better = name_a if _better(diff, direction) else name_b
            worse = name_b if better == name_a else name_a
            every = "in every seed" if paired else "with no spread within either group"
            verdict = f"{better} beats {worse} by {abs(diff):.4g}{unit} {every} ({how})"
        return SeedComparison(name_a, name_b, NO_TEST, na, nb, diff, 0.0, None, None, None, None, better,
                              f"{why}; zero spread across seeds", verdict)  # fmt: skip

    if paired:
        res = sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        df = float(na - 1)
        se = spread / math.sqrt(na)
    else:
        res = sps.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
        ra, rb = va / na, vb / nb
        se = math.sqrt(ra + rb)
        df = (ra + rb) ** 2 / (ra**2 / (na - 1) + rb**2 / (nb - 1))  # Welch–Satterthwaite
    p, t = float(res.pvalue), float(res.statistic)
    hw = t_quantile(df, confidence) * se
    significant = p < alpha
    dec = decimals(hw)
    test = f"{tag}{method} {_p(p)}, {n_text}"
    if significant:
        better = name_a if _better(diff, direction) else name_b
        worse = name_b if better == name_a else name_a
        verdict = f"{better} beats {worse} by {abs(diff):.{dec}f} ± {hw:.{dec}f}{unit} ({test})"
    else:
        better = None
        verdict = f"no significant difference: {name_a} − {name_b} = {diff:+.{dec}f} ± {hw:.{dec}f}{unit} ({test})"
    return SeedComparison(name_a, name_b, method, na, nb, diff, hw, t, df, p, significant, better, why, verdict)


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni step-down adjusted p-values over one family; None (not tested) stays None and
    does not count in the family size. With p_(1) <= ... <= p_(m):
    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) * p_(j))."""
    tested = sorted((p, k) for k, p in pvalues.items() if p is not None)
    m, out, running = len(tested), {k: None for k in pvalues}, 0.0
    for i, (p, k) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def signed_rank_p(a: Mapping[int, float], b: Mapping[int, float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p over the seeds both ran (scipy: exact distribution for small
    n without ties, else the normal approximation); None with fewer than 2 nonzero differences."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if sum(x != 0 for x in d) < 2:
        return None
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


@dataclass(frozen=True)
class LearnedRates:
    """How many seeds of each group reached the threshold, and Fisher's exact test of the 2x2 table."""

    k_a: int
    n_a: int
    k_b: int
    n_b: int
    p: float | None  # two-sided; None when a group has no seed


def learned_rates(a: Sequence[float], b: Sequence[float], threshold: float, direction: str) -> LearnedRates:
    """A seed has learned when its value is at or past ``threshold`` in the metric's direction."""
    _better(0.0, direction)  # checks the direction
    ok = (lambda v: v >= threshold) if direction == "maximize" else (lambda v: v <= threshold)
    k_a, k_b = sum(map(ok, a)), sum(map(ok, b))
    p = None
    if a and b:
        p = float(sps.fisher_exact([[k_a, len(a) - k_a], [k_b, len(b) - k_b]]).pvalue)
    return LearnedRates(k_a, len(a), k_b, len(b), p)


def clip_interval(low: float | None, high: float | None, bounds: tuple[float | None, float | None]):
    """An interval cut to the metric's range (exact match cannot leave [0, 1])."""
    lo, hi = bounds
    if low is not None and lo is not None:
        low = max(low, lo)
    if high is not None and hi is not None:
        high = min(high, hi)
    return low, high


__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "LearnedRates",
    "SeedComparison",
    "Summary",
    "clip_interval",
    "compare_seeds",
    "decimals",
    "describe",
    "holm",
    "learned_rates",
    "signed_rank_p",
    "t_quantile",
]
