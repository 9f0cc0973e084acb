"""`python -m asura.generate` and `python -m asura.evaluate` on a workdir written by train.py on
configs/demo.yaml (what `make demo` runs, a few steps), and their refusals: one line, exit 2."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, train_demo

from asura import evaluate as evaluate_cli
from asura import generate as generate_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return train_demo(tmp_path_factory.mktemp("demo") / "run")


def run(main, argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(main, argv, capsys, match: str) -> None:
    rc, _, err = run(main, argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and match in lines[0], (rc, err)
    assert lines[0].startswith(f"{main.__module__.replace('asura.', 'python -m asura.')}: error: ")


def test_generate_every_cache_past_max_iterations(demo, capsys):
    """demo: max_iterations 4, extrapolation none; depth 6 chosen with --extrapolation at generation time."""
    texts = {}
    for cache in ("per_iteration", "recompute", "shared_last"):
        argv = ["--workdir", str(demo), "--depth", "6", "--extrapolation", "last", "--prompt", "12+34=",
                "--max-new-tokens", "5", "--cache", cache]  # fmt: skip
        rc, out, err = run(generate_cli.main, argv, capsys)
        assert rc == 0, err
        assert f"step 2, depth 6, cache {cache}: 5 tokens" in err
        texts[cache] = out
    assert texts["per_iteration"] == texts["recompute"]  # exact policies agree (greedy)


def test_generate_sampling_and_stop(demo, capsys):
    argv = ["--workdir", str(demo), "--depth", "3", "--prompt", "1+2=", "--max-new-tokens", "12"]
    sampled = [*argv, "--temperature", "2", "--top-k", "20", "--top-p", "0.95", "--seed", "3", "--step", "latest"]
    a, b = run(generate_cli.main, sampled, capsys), run(generate_cli.main, sampled, capsys)
    assert a[0] == 0 and a[1] == b[1]  # seeded: the same completion twice
    rc, greedy, _ = run(generate_cli.main, argv, capsys)
    first = greedy[0]
    assert rc == 0 and ord(first) < 128  # a task model speaks ASCII, one byte per character
    stop = first.encode("unicode_escape").decode()  # e.g. "\\n": --stop reads Python escapes
    rc, out, err = run(generate_cli.main, [*argv, "--stop", stop], capsys)
    assert rc == 0 and out == "\n" and "1 tokens" in err and "stopped" in err  # the stop token is cut from the text


def test_generate_refusals(demo, tmp_path, capsys):
    ok = ["--workdir", str(demo), "--depth", "3", "--prompt", "1+2="]
    for argv, match in (
        (["--workdir", str(tmp_path / "missing"), "--depth", "3", "--prompt", "x"], "does not exist"),
        ([*ok[:2], "--depth", "6", "--prompt", "x"], "exceeds model.max_iterations=4"),
        ([*ok, "--cache", "lru"], "cache='lru' is not valid; choose one of per_iteration, shared_last, recompute"),
        ([*ok, "--step", "7"], "step 7 not found"),
        ([*ok, "--step", "first"], "--step must be an integer, latest or best"),
        ([*ok, "--depth", "0"], "--depth must be >= 1"),
        ([*ok, "--top-p", "0"], "--top-p must be in (0, 1]"),
        ([*ok, "--temperature", "-1"], "--temperature must be finite and >= 0"),
        ([*ok, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([*ok, "--stop", "ab"], "encodes to 2 tokens"),
        ([*ok, "--extrapolation", "wrap"], "invalid choice: 'wrap'"),
        ([*ok[:4]], "one of the arguments --prompt --question is required"),
        ([*ok[:4], "--prompt", ""], "--prompt is empty"),
    ):
        refused(generate_cli.main, argv, capsys, match)


def test_evaluate_depths_with_extrapolation_and_json(demo, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    argv = ["--workdir", str(demo), "--depths", "1-6", "--extrapolation", "last", "--batches", "1", "--json",
            str(out_json)]  # fmt: skip
    rc, out, err = run(evaluate_cli.main, argv, capsys)
    assert rc == 0, err
    assert out.splitlines()[1].split() == ["depth", "ce", "em"]  # a task: ce and exact match
    assert out.count("(extrapolated)") == 2
    res = json.loads(out_json.read_text())
    assert res["step"] == 2 and res["extrapolation"] == "last" and res["data"]["source"] == "task"
    rows = res["depths"]
    assert [r["depth"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"ce", "accuracy", "exact_match", "objective", "perplexity"} <= set(r)
        assert "bits_per_byte" not in r  # only the answer tokens are scored: not per byte of anything
        assert r["perplexity"] == pytest.approx(math.exp(r["ce"]))
        assert r["extrapolated"] == (r["depth"] > 4)
    # the training run's own eval at its depth 3 (metrics.jsonl) is what evaluate reports: the same code path
    train_eval = [json.loads(line) for line in (demo / "metrics.jsonl").read_text().splitlines()]
    ce3 = [m["eval/d3/ce"] for m in train_eval if "eval/d3/ce" in m][-1]
    assert rows[2]["ce"] == pytest.approx(ce3, rel=1e-5)


def test_evaluate_other_data(demo, tmp_path, capsys):
    """--step best, --task-difficulty (length generalisation) and --data text shards (bits per byte)."""
    rc, out, err = run(evaluate_cli.main, ["--workdir", str(demo), "--task-difficulty", "3", "--batches", "1",
                                           "--depths", "2,3", "--step", "best"], capsys)  # fmt: skip
    assert rc == 0 and "step 2," in out, err
    from asura.data import prepare

    shards = tmp_path / "pydoc"
    assert prepare.main(["--builtin", "pydoc", "--output", str(shards)]) == 0
    out_json = tmp_path / "text.json"
    argv = ["--workdir", str(demo), "--data", str(shards), "--batches", "1", "--depths", "3", "--json", str(out_json)]
    rc, out, err = run(evaluate_cli.main, argv, capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert res["data"]["source"] == "text" and res["depths"][0]["bits_per_byte"] > 0


def test_evaluate_exit_rules(demo, tmp_path, capsys):
    """--exit: per rule and threshold the exit depths, executed FLOPs and metrics; steps:k is depth k."""
    out_json = tmp_path / "exits.json"
    argv = ["--workdir", str(demo), "--batches", "1", "--depths", "1,2,3", "--exit", "steps:1,2", "--exit",
            "latent:0.5", "--exit", "kl", "--exit", "never", "--json", str(out_json)]  # fmt: skip
    rc, out, err = run(evaluate_cli.main, argv, capsys)
    assert rc == 0, err
    assert "per-token halting to depth 3 (kv=copy)" in out
    res = json.loads(out_json.read_text())
    fixed, exits = {r["depth"]: r for r in res["depths"]}, res["exits"]
    want = [("steps", 1), ("steps", 2), ("latent", 0.5), ("kl", 1e-3), ("never", None)]
    assert [(r["rule"], r["threshold"]) for r in exits] == want  # never: no threshold (strict JSON, no Infinity)
    assert exits[-1]["mean_depth"] == 3 and exits[-1]["flops_ratio"] == 1.0
    for r in exits[:2]:  # exit after k iterations = depth k: the same metrics, depth k everywhere
        k = int(r["threshold"])
        assert r["depth_pmf"] == {str(k): 1.0} and r["mean_depth"] == k and r["mean_depth_scored"] == k
        for m in ("ce", "accuracy", "exact_match"):
            assert r[m] == pytest.approx(fixed[k][m], rel=1e-6, abs=1e-7), m
    assert exits[0]["flops_ratio"] < exits[1]["flops_ratio"] < 1
    for r in exits:
        assert sum(r["depth_pmf"].values()) == pytest.approx(1.0)
        assert 1 <= r["mean_depth"] <= 3
    # kv=full: each token's output is picked at its exit, but every token runs all 3 iterations
    argv = ["--workdir", str(demo), "--batches", "1", "--depths", "1", "--exit", "steps:1", "--exit-kv", "full",
            "--json", str(out_json)]  # fmt: skip
    rc, out, err = run(evaluate_cli.main, argv, capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    (full,), fixed1 = res["exits"], res["depths"][0]
    assert full["kv"] == "full" and full["mean_depth"] == 1 and full["flops_ratio"] == 1.0
    assert full["exact_match"] == pytest.approx(fixed1["exact_match"]) and full["ce"] == pytest.approx(
        fixed1["ce"], rel=1e-6
    )


def test_evaluate_refusals(demo, tmp_path, capsys):
    ok = ["--workdir", str(demo)]
    for argv, match in (
        (["--workdir", str(tmp_path / "missing")], "does not exist"),
        ([*ok, "--depths", "1-8"], "depth 8 exceeds model.max_iterations=4"),
        ([*ok, "--depths", "3-1"], "a range must be a-b with 1 <= a <= b"),
        ([*ok, "--depths", "two"], "is not a list of depths"),
        ([*ok, "--step", "99"], "step 99 not found"),
        ([*ok, "--batches", "0"], "--batches must be >= 1"),
        ([*ok, "--task-difficulty", "40"], "needs 124 tokens per example but data.seq_len=64"),
        ([*ok, "--data", str(tmp_path / "none")], "matches no train shards"),
        ([*ok, "--data", str(tmp_path), "--task-difficulty", "3"], "choose one"),
        ([*ok, "--json", str(tmp_path / "no" / "x.json")], "its directory does not exist"),
        ([*ok, "--bogus"], "unrecognized arguments: --bogus"),
        ([*ok, "--exit", "nope"], "exit rule='nope' is not valid; choose one of never, steps"),
        ([*ok, "--exit", "latent:x"], "thresholds must be numbers"),
        ([*ok, "--exit", "steps"], "rule 'steps' has no default threshold"),
        ([*ok, "--exit", "kl", "--exit-kv", "swap"], "--exit-kv='swap' is not valid; choose one of copy, full"),
        ([*ok, "--exit", "kl", "--exit-depth", "9"], "depth 9 exceeds model.max_iterations=4"),
        ([*ok, "--exit", "gate:0.5"], "this checkpoint trained without one (model.exit_gate)"),
    ):
        refused(evaluate_cli.main, argv, capsys, match)


@pytest.mark.parametrize("module", ["asura.generate", "asura.evaluate"])
def test_python_dash_m_entry_points(module, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", module, "--workdir", str(tmp_path / "missing"), "--depth", "2", "--prompt", "x"]
        if module == "asura.generate" else [sys.executable, "-m", module, "--workdir", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
