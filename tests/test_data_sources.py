"""One data API for every data.source: the calls the train loop makes, and the synthetic source's batches."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_data_pipeline import assert_batches_equal, check_row_invariants, make_cfg, take

import asura.data
from asura.data import prepare, sources
from asura.data.packing import FIELDS
from asura.data.synthetic import EVAL_STEP_OFFSET


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for i in range(30):
        (root / f"d{i:02d}.txt").write_text(f"document {i} " * (5 + i))
    out = root / "shards"
    argv = ["--input", str(root / "*.txt"), "--output", str(out), "--eval-fraction", "0.1", "--eval-min-tokens", "300"]
    assert prepare.main(argv) == 0
    return out


def source_cfg(name, text_dir):
    extra = {"task": [], "text": [f"data.path={text_dir}", "data.seq_len=32"], "synthetic": ["model.vocab_size=256"]}
    return make_cfg(f"data.source={name}", *extra[name])


def test_registry_lists_every_source():
    assert sources.SOURCES.names == ("task", "text", "synthetic")
    assert [n for n, s in sources.SOURCES.items() if s.uses_tokenizer] == ["text"]


@pytest.mark.parametrize("name", ["task", "text", "synthetic"])
def test_the_loops_calls_work_for_every_source(name, text_dir):
    cfg = source_cfg(name, text_dir)
    asura.data.check_compatible(cfg)
    assert asura.data.data_vocab_size(cfg) <= cfg.model.vocab_size
    it = asura.data.build_train_iterator(cfg)
    head = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores it as JSON
    want = take(it, 2)
    it.close()
    fresh = asura.data.build_train_iterator(cfg)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), want)
    fresh.close()
    evals = asura.data.build_eval_batches(cfg, 2)
    assert 1 <= len(evals) <= 2
    for batch in head + evals:
        assert set(batch) == set(FIELDS) and all(isinstance(v, np.ndarray) for v in batch.values())
        assert batch["inputs"].shape == (cfg.train.batch_size, cfg.data.seq_len)
        check_row_invariants(batch)
    assert_batches_equal(evals, asura.data.build_eval_batches(cfg, 2))


def test_synthetic_batches_are_the_global_batch_split_by_process():
    cfg = make_cfg("data.source=synthetic", "model.vocab_size=256")
    want = [{k: np.asarray(v) for k, v in asura.data.synthetic_batch(cfg, s).items()} for s in range(3)]
    assert_batches_equal(take(asura.data.build_train_iterator(cfg), 3), want)
    halves = [take(asura.data.build_train_iterator(cfg, process_index=i, process_count=2), 3) for i in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
    assert_batches_equal(joined, want)
    held_out = [asura.data.synthetic_batch(cfg, EVAL_STEP_OFFSET + i) for i in range(2)]  # the loop's old eval set
    assert_batches_equal(
        asura.data.build_eval_batches(cfg, 2), [{k: np.asarray(v) for k, v in b.items()} for b in held_out]
    )


def test_sources_registry_imports_no_numpy():
    code = "import sys, asura.data.sources as s; print(s.SOURCES.names, 'numpy' in sys.modules, 'grain' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('task', 'text', 'synthetic') False False"
