"""Embedded tasks: every answer is checked by an independent solver that parses the generated text."""

import re
import subprocess
import sys

import numpy as np
import pytest

from asura.data import tasks


def solve_pointer_chase(prompt: str) -> str:
    *stmts, query = prompt.split(";")
    env = dict(s.split("=") for s in stmts)
    var = query.rstrip("?")
    hops = 0
    while not var.isdigit():
        var, hops = env[var], hops + 1
    return var, hops


def solve(name: str, prompt: str) -> str:
    if name == "pointer_chase":
        return solve_pointer_chase(prompt)[0]
    if name == "addition":
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b)).zfill(len(a) + 1)
    if name == "parity":
        return str(prompt.rstrip("=").count("1") % 2)
    if name == "reverse":
        return prompt.rstrip(">")[::-1]
    if name == "modular_arith":
        terms = re.findall(r"[+-]?\d", prompt.rstrip("="))
        return str(sum(int(t) for t in terms) % 10)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
@pytest.mark.parametrize("difficulty", [1, 3, 6])
def test_answers_match_independent_solver(name, difficulty):
    task = tasks.get_task(name)
    for i in range(200):
        ex = tasks.make_example(task, difficulty, seed=7, stream=tasks.TRAIN_STREAM, index=i)
        assert ex.answer == solve(name, ex.prompt), (name, ex.text)
        tokens_L, answer_L = ex.encode()
        assert len(tokens_L) <= task.max_len(difficulty)
        assert tokens_L.max() < task.vocab_size_needed
        # Only the answer and the closing newline are scored.
        assert bytes(tokens_L[answer_L].astype(np.uint8)).decode() == ex.answer + "\n"
        assert bytes(tokens_L[~answer_L].astype(np.uint8)).decode() == ex.prompt


@pytest.mark.parametrize("k", [1, 2, 5, 13])
def test_pointer_chase_needs_exactly_k_hops(k):
    task = tasks.get_task("pointer_chase")
    for i in range(50):
        ex = tasks.make_example(task, k, seed=0, stream=0, index=i)
        assert solve_pointer_chase(ex.prompt)[1] == k
        assert ex.prompt.count(";") == 2 * k  # query chain + one distractor chain of k statements each


def test_difficulty_scales_length():
    for name in tasks.TASKS:
        task = tasks.get_task(name)
        lens = [len(tasks.make_example(task, d, 0, 0, 0).text) for d in (2, 4, 8)]
        assert lens[0] < lens[1] < lens[2], name


def test_random_access_deterministic_and_streams_disjoint():
    task = tasks.get_task("addition")
    a = [tasks.make_example(task, 8, 3, tasks.TRAIN_STREAM, i).text for i in range(100)]
    b = [tasks.make_example(task, 8, 3, tasks.TRAIN_STREAM, i).text for i in reversed(range(100))][::-1]
    ev = [tasks.make_example(task, 8, 3, tasks.EVAL_STREAM, i).text for i in range(100)]
    other_seed = [tasks.make_example(task, 8, 4, tasks.TRAIN_STREAM, i).text for i in range(100)]
    assert a == b
    assert not set(a) & set(ev)
    assert not set(a) & set(other_seed)
    assert len(set(a)) == 100


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown data.task 'nope'; valid: addition, modular_arith, parity"):
        tasks.get_task("nope")


def test_too_long_for_seq_len_names_both_lengths():
    task = tasks.get_task("pointer_chase")
    tasks.check_fits(task, 5, 44)
    with pytest.raises(ValueError, match=r"needs 52 tokens per example but data.seq_len=48"):
        tasks.check_fits(task, 6, 48)
    with pytest.raises(ValueError, match="must be <= 13"):
        tasks.check_fits(task, 14, 4096)
    with pytest.raises(ValueError, match="difficulty must be >= 1"):
        tasks.check_fits(tasks.get_task("parity"), 0, 64)


def test_tasks_and_synthetic_work_without_grain():
    code = (
        "import sys; sys.modules['grain'] = None\n"  # import grain now raises ImportError
        "from asura.config.schema import Config\n"
        "from asura.data import pipeline, tasks\n"
        "assert 'jax' not in sys.modules\n"
        "print(tasks.make_example(tasks.get_task('addition'), 3, 0, 0, 0).text.strip())\n"
        "cfg = Config()\n"
        "pipeline.check_compatible(cfg)\n"
        "print(pipeline.synthetic_batch(cfg, 3)['inputs'].shape)\n"
        "try:\n    pipeline.build_train_iterator(cfg)\nexcept ImportError as e:\n    print(e)\n"
        "import asura.data, dataclasses\n"
        "syn = cfg.replace(data=dataclasses.replace(cfg.data, source='synthetic'))\n"
        "asura.data.check_compatible(syn)\n"
        "batch, evals = next(asura.data.build_train_iterator(syn)), asura.data.build_eval_batches(syn, 2)\n"
        "print(batch['inputs'].shape, len(evals))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(r"\d{3}\+\d{3}=\d{4}", lines[0]) and lines[1] == "(32, 64)"
    assert "needs the `grain` package" in lines[2] and "data.source=synthetic" in lines[2]
    assert lines[3] == "(32, 64) 2"
