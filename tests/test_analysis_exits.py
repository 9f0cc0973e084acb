"""The early-exit oracle is an upper bound: on hand-built telemetry whose best exits are known, no rule
beats it over the same candidate depths, in token accuracy or in example exact match."""

import numpy as np
import pytest

from asura.analysis import exits

# Per token, is the prediction right at depths 1, 2, 3? Two tokens "overthink" (right early, wrong at
# depth 3), which is where an oracle that waits for a prediction to stay right loses them.
CORRECT = {
    "a": [1, 0, 0],  # right at depth 1 only
    "a2": [1, 1, 0],  # right at depths 1-2
    "b": [0, 0, 1],  # right at depth 3 only (past max_iterations when n = 2)
    "c": [0, 1, 0],
    "d": [0, 0, 0],  # never right
    "e": [1, 1, 1],
}
# Three examples of two answer tokens each, packed in one row: (a, b), (c, e), (a2, d).
ORDER = ["a", "b", "c", "e", "a2", "d"]
SEGMENTS = [1, 1, 2, 2, 3, 3]


def _telemetry(seed: int = 0):
    correct_BTN = np.array([[CORRECT[k] for k in ORDER]], bool)
    targets_BT = np.arange(1, len(ORDER) + 1)[None]
    pred_BTN = np.where(correct_BTN, targets_BT[..., None], 0)  # 0 is never a target: a wrong prediction
    rng = np.random.default_rng(seed)
    shape = correct_BTN.shape
    tel = {"correct": correct_BTN, "pred": pred_BTN, "entropy": rng.random(shape), "rel_change": rng.random(shape),
           "kl_prev": np.concatenate([np.full((*shape[:2], 1), np.nan), rng.random((*shape[:2], 2))], -1)}  # fmt: skip
    batch = {"targets": targets_BT, "loss_mask": np.ones((1, len(ORDER))), "segment_ids": np.array([SEGMENTS])}
    return tel, batch


def _best_rule(curves, metric: str) -> float:
    return max(float(np.max(getattr(c, metric))) for c in curves if c.name != "oracle")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_beats_every_rule_and_is_the_known_best(seed):
    tel, batch = _telemetry(seed)
    thresholds = {c: np.geomspace(1e-3, 2.0, 25) for c in ("kl", "entropy", "latent")}
    curves = exits.pareto(tel, batch["loss_mask"], thresholds=thresholds, batch=batch)
    (oracle,) = [c for c in curves if c.name == "oracle"]
    # Known by hand: every token but d is right somewhere (5 of 6), at depths a1 b3 c2 e1 a2:1 d:n=3;
    # examples (a, b) and (c, e) can be answered exactly, (a2, d) cannot.
    assert oracle.accuracy[0] == pytest.approx(5 / 6)
    assert oracle.mean_depth[0] == pytest.approx((1 + 3 + 2 + 1 + 1 + 3) / 6)
    assert oracle.exact_match[0] == pytest.approx(2 / 3)
    # ... and no rule over the same depths does better (fixed depth 1 gets a, a2 and e: 3 of 6).
    assert oracle.accuracy[0] >= _best_rule(curves, "accuracy")
    assert oracle.exact_match[0] >= _best_rule(curves, "exact_match")


def test_candidate_depths_are_the_same_for_every_curve():
    """n = 2 (e.g. the trained slots): depth 3 is no candidate, so token b is lost to every rule and the oracle."""
    tel, batch = _telemetry()
    curves = exits.pareto(tel, batch["loss_mask"], batch=batch, n=2)
    (oracle,) = [c for c in curves if c.name == "oracle"]
    assert oracle.accuracy[0] == pytest.approx(4 / 6)  # a, a2, c, e
    assert oracle.mean_depth[0] == pytest.approx((1 + 2 + 2 + 1 + 1 + 2) / 6)  # b and d run to n = 2
    assert oracle.exact_match[0] == pytest.approx(1 / 3)  # only (c, e)
    assert all(np.max(c.mean_depth) <= 2 for c in curves)
    assert oracle.accuracy[0] >= _best_rule(curves, "accuracy")
    with pytest.raises(ValueError, match=r"n=4: the telemetry holds depths 1\.\.3"):
        exits.pareto(tel, batch["loss_mask"], n=4)
