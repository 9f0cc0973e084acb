"""Teacher-forced scoring (asura.infer.score) against the model's own training loss, and the
lm-evaluation-harness adapter on a tiny offline LAMBADA-format task (when lm-eval is installed:
the `eval` extra)."""

import dataclasses
import importlib.util
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_infer_cache import ALL_ON, random_model

from asura.infer.generate import generate
from asura.infer.score import loglikelihoods, rolling_loglikelihoods, rolling_windows

CFG = dataclasses.replace(ALL_ON, n_layers=1, extrapolation="last", z_loss=0.0)
RNG = np.random.default_rng(0)
PAIRS = [
    (RNG.integers(0, 48, a).tolist(), RNG.integers(0, 48, b).tolist()) for a, b in ((5, 3), (1, 6), (12, 1), (7, 9))
]


@nnx.jit(static_argnames="max_depth")
def _ce(model, batch, n, max_depth):
    return model.loss(batch, n=n, max_depth=max_depth)[1]["ce"]


def loss_ll(model, ctx, cont, n, T: int = 96) -> float:
    """-(CE × tokens) of the continuation from model.loss (the training path: streamed CE), in a
    row padded to T (segment 0) so that every pair shares one compiled program."""
    seq = np.asarray(ctx + cont, np.int32)
    L = len(seq) - 1
    batch = {k: np.zeros((1, T), np.int32) for k in ("inputs", "targets", "segment_ids")}
    batch["inputs"][0, :L], batch["targets"][0, :L], batch["segment_ids"][0, :L] = seq[:-1], seq[1:], 1
    batch["loss_mask"] = np.zeros((1, T), np.float32)
    batch["loss_mask"][0, len(ctx) - 1 : L] = 1
    return -float(_ce(model, jax.tree.map(jnp.asarray, batch), jnp.int32(n), 5)) * len(cont)


def test_loglikelihood_equals_the_training_loss():
    model = random_model(CFG, seed=1)
    for n in (2, 5):  # 5: past max_iterations, extrapolated
        got = loglikelihoods(model, PAIRS, n, max_len=32, batch_size=3, max_depth=5)
        for (ctx, cont), ll in zip(PAIRS, got, strict=True):
            want = loss_ll(model, ctx, cont, n)
            assert ll.logprob == pytest.approx(want, rel=1e-5), (n, len(ctx), len(cont))


def test_greedy_flag_and_truncation():
    model = random_model(CFG, seed=2)
    ctx = [3, 1, 4, 1, 5, 9, 2, 6]
    greedy = generate(model, [ctx], 3, max_new_tokens=4, max_depth=5).tokens[0]
    wrong = [*greedy[:-1], (greedy[-1] + 1) % 48]
    a, b = loglikelihoods(model, [(ctx, greedy), (ctx, wrong)], 3, max_len=32, max_depth=5)
    assert a.greedy and not b.greedy and a.logprob > b.logprob
    # a pair longer than max_len keeps its last max_len tokens: the context is cut from the left
    long_ctx = list(range(40)) + ctx  # 48 + 4 tokens; inputs hold 12, so 13 tokens: 9 of context
    (long,) = loglikelihoods(model, [(long_ctx, greedy)], 3, max_len=12, max_depth=5)
    (cut,) = loglikelihoods(model, [(long_ctx[-9:], greedy)], 3, max_len=12, max_depth=5)
    assert long.logprob == pytest.approx(cut.logprob, rel=1e-6)
    with pytest.raises(ValueError, match="no BOS"):
        loglikelihoods(model, [([], [1, 2])], 3, max_len=12)
    # inputs hold max_len tokens: a continuation of max_len tokens fits behind one context token (lm-eval's
    # rolling windows ask exactly that), one more does not
    (fits,) = loglikelihoods(model, [([1], [1, 2, 3, 4])], 3, max_len=4, max_depth=5)
    assert fits.logprob == pytest.approx(loss_ll(model, [1], [1, 2, 3, 4], 3), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit max_len=4"):
        loglikelihoods(model, [([1], [1, 2, 3, 4, 5])], 3, max_len=4)


def test_rolling_windows_score_every_token_but_the_first_once():
    tokens = list(range(100, 123))
    for max_len in (1, 2, 5, 8, 64):
        windows = rolling_windows(tokens, max_len)
        scored = [t for _, cont in windows for t in cont]
        assert scored == tokens[1:]
        for ctx, cont in windows:
            assert ctx and len(ctx) + len(cont) <= max_len + 1  # inputs = ctx + cont[:-1] <= max_len
            start = tokens.index(cont[0])
            assert ctx == tokens[start - len(ctx) : start]  # the context is what precedes the window
        last_ctx, last_cont = windows[-1]
        assert len(last_ctx) + len(last_cont) == min(max_len, len(tokens) - 1) + 1  # the last keeps a full context


def test_rolling_windows_are_lm_evals_but_for_the_first_token():
    """lm-eval's own windows (get_rolling_token_windows + make_disjoint_window, context_len=1, as
    its HF model asks), with the one difference a model without BOS/EOT needs: lm-eval's first
    window conditions token 0 on a prefix token; here token 0 is that window's context, unscored."""
    utils = pytest.importorskip("lm_eval.utils", reason="the `eval` extra (lm-eval) is not installed")
    prefix = -1  # no real token: a window that still held it after the change would show it
    for n_tokens in (0, 1, 2, 3, 7, 8, 9, 16, 17, 23, 50):
        tokens = list(range(100, 100 + n_tokens))
        for max_len in (1, 2, 3, 5, 8, 16, 64):
            ref = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(tokens, prefix, max_seq_len=max_len, context_len=1)
            ]
            if ref:
                (first_ctx, first_cont), *rest = ref
                assert first_ctx == [prefix]
                ref = ([(first_cont[:1], first_cont[1:])] if len(first_cont) > 1 else []) + rest
            assert rolling_windows(tokens, max_len) == ref, (n_tokens, max_len)


def test_rolling_loglikelihood_equals_plain_forwards():
    """The rolling total against plain full-sequence forwards of the model (no packing, no
    padding, no loglikelihoods()): token i >= 1 is scored once, by the forward over the window
    that predicts it. Windows predict tokens [b_j, b_j+1) with b_0 = 1, b_1 = min(L, N), then L
    more each; a window's inputs are the (at most) L tokens before its last prediction."""
    model = random_model(CFG, seed=3, scale=2.0)  # sharper than scale 1: context matters more
    docs = [RNG.integers(0, 48, k).tolist() for k in (1, 2, 6, 8, 9, 17, 23, 40)]
    for max_len in (8, 16):
        # one compiled forward per max_len: inputs right-padded to max_len (causal, so the padding
        # changes no logit before it)
        forward = jax.jit(lambda x: model(x, n=3, max_depth=5))
        got = rolling_loglikelihoods(model, docs, 3, max_len=max_len, batch_size=4, max_depth=5)
        for doc, total in zip(docs, got, strict=True):
            N, want = len(doc), 0.0
            lo, hi = 1, min(max_len, N)  # this window predicts doc[lo:hi]
            while lo < N:
                start = max(0, hi - 1 - max_len)
                window = doc[start : hi - 1]
                inputs = np.asarray(window + [0] * (max_len - len(window)), np.int32)[None]
                logp_TV = jax.nn.log_softmax(forward(jnp.asarray(inputs))[0], axis=-1)
                want += sum(float(logp_TV[i - 1 - start, doc[i]]) for i in range(lo, hi))
                lo, hi = hi, min(hi + max_len, N)
            # fp32: the same ops in another batch/padding shape round differently: u·|logits| ~ 6e-8·30 = 2e-6
            # per term, <= 40 terms: <= 8e-5 (seen: 1e-5). Other windows move the total by >= 1e-2 here.
            assert total == pytest.approx(want, abs=1e-4), (N, max_len)


# ---------------------------------------------------------------- lm-evaluation-harness


def bundled_docs(k: int = 8) -> list[str]:
    """k short LAMBADA-style passages (last word = target) from Python's bundled pydoc topics."""
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+", topics["assert"] + topics["assignment"])
    return [" ".join(words[i * 9 : i * 9 + 9]) for i in range(k)]


def write_task(d, docs) -> None:
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\ntest_split: test\n"
    (d / "tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n" + common + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (d / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )
    (d / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir in the train loop's format: random parameters (not the near-uniform init)."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("the `eval` extra (lm-eval) is not installed")
    from asura.config import config_to_yaml
    from asura.train.checkpoint import CheckpointStore, config_meta
    from asura.train.state import init_state

    cfg = tiny_config("data.seq_len=48", "model.max_iterations=3", "model.adapter=abba")
    wd = tmp_path_factory.mktemp("lm_wd")
    (wd / "config.yaml").write_text(config_to_yaml(cfg))
    state = init_state(cfg).state
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    noisy = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state["params"])
    store = CheckpointStore(wd / "checkpoints", keep=1, async_save=False)
    store.save(1, {**state, "params": noisy}, {}, config_meta(cfg, 1))
    store.close()
    return wd


def test_lm_eval_harness_on_a_tiny_lambada_task(workdir, tmp_path, monkeypatch):
    """lm-eval's loglikelihood / loglikelihood_rolling / generate_until through AsuraLM equal the
    model's own CE and generation, at a depth past max_iterations (extrapolation at eval time)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval  # after the HF_* variables: `datasets` reads them at import
    from lm_eval.tasks import TaskManager

    from asura.infer.harness import AsuraLM, encode_pair

    docs = bundled_docs()
    write_task(tmp_path, docs)
    lm = AsuraLM(workdir=str(workdir), depth=4, extrapolation="last", batch_size=4, max_length=96)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_lambada", "tiny_rolling", "tiny_generate"], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path)),
    )  # fmt: skip
    tok, model = lm.tok, lm.model
    by_doc = {s["doc"]["text"]: s for s in res["samples"]["tiny_lambada"]}
    for text in docs:
        head, word = text.rsplit(" ", 1)
        ctx, cont = encode_pair(tok, head, " " + word)  # the pair lm-eval asks: ("... the", " word")
        assert (ctx, cont) == tuple(tok.encode_batch([head, " " + word]))
        ll, _ = by_doc[text]["resps"][0][0]
        assert ll == pytest.approx(loss_ll(model, ctx, cont, 4), rel=1e-5)
    ids = tok.encode_batch(docs)  # rolling: every byte but the first, each doc shorter than max_length
    total = sum(loss_ll(model, d[:1], d[1:], 4) for d in ids)
    n_bytes = sum(len(t.encode()) for t in docs)
    assert res["results"]["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2))
    samples = res["samples"]["tiny_generate"]
    prompts = [tok.encode_batch([s["arguments"][0][0]])[0] for s in samples]
    gen = generate(model, prompts, 4, max_new_tokens=6, max_depth=4).tokens  # rows are independent of the batch
    for s, ids in zip(samples, gen, strict=True):
        assert s["resps"][0][0] == tok.decode(ids).split(".")[0]


def test_asura_lm_depth_must_be_a_positive_integer(workdir):
    from asura.depth import DEPTH_LIMIT
    from asura.infer.harness import AsuraLM

    for bad in (0, -1, 2.5, True, "3", DEPTH_LIMIT + 1):
        with pytest.raises(ValueError, match="depth must be an integer >= 1"):
            AsuraLM(workdir=str(workdir), depth=bad)
    assert AsuraLM(workdir=str(workdir)).depth == tiny_config().model.iterations  # None: the trained depth
    assert AsuraLM(workdir=str(workdir), depth=1).depth == 1


def test_an_empty_context_conditions_on_the_continuations_first_token(workdir):
    """lm-eval's HF model conditions an empty context on EOT; with no such token the closest honest
    score is log p(continuation[1:] | continuation[0]): the first token is given, never scored."""
    from lm_eval.api.instance import Instance

    from asura.infer.harness import AsuraLM

    lm = AsuraLM(workdir=str(workdir), depth=2, extrapolation="last")  # loss_ll runs max_depth 5
    reqs = [Instance("loglikelihood", {}, args, i) for i, args in enumerate([("", " the cat"), ("", "x"), ("a", "b")])]
    (ll, _), single, (ll_ab, _) = lm.loglikelihood(reqs)
    ids = lm.tok.encode_batch([" the cat"])[0]
    assert ll == pytest.approx(loss_ll(lm.model, ids[:1], ids[1:], 2), rel=1e-5)
    assert single == (0.0, True)  # one token and nothing before it: nothing is scored
    assert ll_ab == pytest.approx(loss_ll(lm.model, [ord("a")], [ord("b")], 2), rel=1e-5)
