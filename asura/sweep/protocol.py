"""A study's protocol: what will count as evidence, fixed in the spec before the first trial.

    protocol:
      seeds: [0, 1, 2, 3, 4, 5, 6, 7]   # the confirmatory seeds (a subset of the spec's seeds)
      family: [iso_param, iso_flop_width]   # rows tested against their reference and corrected
                                         # together (default: every row but the reference)
      min_seeds: 8                       # a row with fewer complete protocol seeds gets no verdict
      learned: 0.9                       # optional: a seed "learned" at this metric value (Fisher's
                                         # exact test on learned rates, for bimodal outcomes)

The primary metric is the spec's ``metric`` (its direction from the registry). Each row of the
family is tested with the paired t-test and the Wilcoxon signed-rank test over the protocol seeds
(``asura.sweep.stats``); p-values are Holm-corrected over the family, per test, and a verdict needs
the corrected paired-t p below ALPHA. Everything else a report shows (rows outside the family,
seeds outside the protocol, another metric, a sweep without a protocol) is labelled exploratory.

The runner records the protocol in sweep.json the first time a sweep dir is prepared, with the
commit, the time and how many trials were already complete; a later run with a different protocol
is refused (a changed protocol is a new study), and a protocol first recorded after trials had run
is reported as registered late.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from asura.sweep.keys import SpecError, check_keys

PROTOCOL_KEYS = ("seeds", "family", "min_seeds", "learned")
MIN_SEEDS = 5  # without a protocol too: below this no verdict is given ("too few seeds")


@dataclass(frozen=True)
class Protocol:
    seeds: tuple[int, ...]
    family: tuple[str, ...] | None = None  # None: every row but the reference
    min_seeds: int = MIN_SEEDS
    learned: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["family"] = None if self.family is None else list(self.family)
        return d

    @staticmethod
    def from_json(d: dict | None) -> Protocol | None:
        if not d:
            return None
        fam = d.get("family")
        return Protocol(tuple(d["seeds"]), None if fam is None else tuple(fam), int(d["min_seeds"]), d.get("learned"))


def parse_protocol(raw, spec_seeds: tuple[int, ...], bounds: tuple[float | None, float | None]) -> Protocol | None:
    """The spec's ``protocol:`` block, checked against its seeds and the metric's range; None when absent.
    Groups in ``family`` are checked by the spec once its grid exists (``check_family``)."""
    if raw is None:
        return None
    check_keys("protocol", raw, PROTOCOL_KEYS)
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpecError(f"protocol.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"protocol.seeds has duplicates: {seeds}")
    missing = sorted(set(seeds) - set(spec_seeds))
    if missing:
        raise SpecError(f"protocol.seeds {missing} are not in the spec's seeds {list(spec_seeds)}: they never run")
    family = raw.get("family")
    if family is not None and not (isinstance(family, list) and family and all(isinstance(g, str) for g in family)):
        raise SpecError(f"protocol.family must be a non-empty list of group names, got {family!r}")
    min_seeds = raw.get("min_seeds", MIN_SEEDS)
    if not isinstance(min_seeds, int) or not 2 <= min_seeds <= len(seeds):
        raise SpecError(f"protocol.min_seeds must be an integer in [2, {len(seeds)}] (its seeds), got {min_seeds!r}")
    learned = raw.get("learned")
    if learned is not None:
        lo, hi = bounds
        number = isinstance(learned, int | float) and not isinstance(learned, bool)
        if not number or (lo is not None and learned < lo) or (hi is not None and learned > hi):
            raise SpecError(f"protocol.learned must be a number in the metric's range [{lo}, {hi}], got {learned!r}")
        learned = float(learned)
    return Protocol(tuple(seeds), None if family is None else tuple(family), min_seeds, learned)


def check_family(protocol: Protocol | None, groups, reference: str | None) -> None:
    if protocol is None or protocol.family is None:
        return
    unknown = [g for g in protocol.family if g not in groups]
    if unknown:
        raise SpecError(f"protocol.family names {unknown}, not groups of this sweep ({', '.join(groups)})")
    if reference is not None and reference in protocol.family:
        raise SpecError(f"protocol.family includes the reference {reference!r}: the others are tested against it")
