"""What a user is shown fits the data: exact match for tasks, bits/byte for byte-level text.

A text run used to end with "answer exact-match 0.000" and show em=nan in its progress bar; the
summary line, the bar, the eval lines and `asura.evaluate` now read `Source.shown` through
asura.train.evaluate.SHOWN, so one table decides for all of them.
"""

from __future__ import annotations

import math

import pytest
from conftest import DEMO, ROOT

from asura.config import load_config
from asura.train.evaluate import shown_metrics
from asura.train.metrics import bar_fields, eval_line, final_line

TASK = load_config(DEMO)
TEXT = load_config(ROOT / "configs" / "pydoc.yaml")
SYNTHETIC = load_config(DEMO, ["data.source=synthetic"])
BPE_TEXT = load_config(ROOT / "configs" / "pydoc.yaml", ["data.tokenizer=tiktoken:gpt2", "model.vocab_size=50304"])

ONE_DEPTH = {"ce": 0.6931471805599453, "accuracy": 0.5, "exact_match": 0.25, "objective": 0.7, "z_loss": 0.01}


def eval_record(depths=(1, 2, 3)) -> dict[str, float]:
    rec = {f"eval/{k}": v for k, v in ONE_DEPTH.items()}
    rec.update({f"eval/d{n}/{k}": v for n in depths for k, v in ONE_DEPTH.items()})
    return rec


@pytest.mark.parametrize(
    ("cfg", "want"),
    [
        (TASK, ("ce", "exact_match")),
        (TEXT, ("ce", "accuracy", "bits_per_byte")),
        (BPE_TEXT, ("ce", "accuracy", "perplexity")),
        (SYNTHETIC, ("ce",)),
    ],
)
def test_each_data_source_shows_its_metrics(cfg, want):
    assert shown_metrics(cfg) == want


def test_a_text_run_never_shows_exact_match():
    train = {"train/ce": 1.0, "train/accuracy": 0.5, "train/lr": 1e-3}
    bar = bar_fields(TEXT, train, eval_record())
    assert "em" not in bar and bar["bpb"] == pytest.approx(1.0)  # ln 2 nats = 1 bit per byte
    line = eval_line(TEXT, 150, eval_record(), [1, 2, 3])
    assert "em" not in line and "bpb 1.0000" in line and "d2:0.693/0.500/1.000" in line
    final = final_line(TEXT, "done", 600, 12.0, eval_record())
    assert "exact" not in final and "bits_per_byte 1.0000" in final and "text data" in final


def test_a_task_run_shows_exact_match_and_no_bits_per_byte():
    bar = bar_fields(TASK, {"train/ce": 1.0}, eval_record())
    assert bar["em"] == 0.25 and "bpb" not in bar
    line = eval_line(TASK, 150, eval_record(), [1, 2, 3])
    assert "em 0.250" in line and "bpb" not in line
    assert "exact_match 0.250" in final_line(TASK, "done", 600, 12.0, eval_record())


def test_other_tokenizers_get_perplexity_and_nothing_before_the_first_eval():
    bar = bar_fields(BPE_TEXT, {"train/ce": 1.0}, eval_record())
    assert bar["ppl"] == pytest.approx(math.exp(ONE_DEPTH["ce"]))
    assert set(bar_fields(BPE_TEXT, {"train/ce": 1.0}, {})) == {"ce", "acc", "lr"}  # no eval yet: no nan fields
    assert final_line(TASK, "preempted", 0, 1.0, {}) == "preempted at step 0 in 1.0s"
