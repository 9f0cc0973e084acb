"""Embedded tasks: every answer is checked by an independent solver that parses the generated text."""

import re
import subprocess
import sys
import threading
import warnings

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


# ------------------------------------------------------------ example_rng: cheaper, same draws


def fresh_example_rng(seed, stream, index):
    """tasks.example_rng as first written (a new Philox per example): the draws that must never change."""
    mask = (1 << 64) - 1
    return np.random.Generator(
        np.random.Philox(key=[int(seed) & mask, int(stream) & mask], counter=[0, int(index), 0, 0])
    )


def _draws(rng):
    """Draws of every kind the tasks use and more; the last one leaves half a 64-bit word buffered."""
    out = [rng.integers(0, 10, size=7), rng.permutation(26), rng.random(3), rng.integers(0, 2**40, size=2)]
    out += [rng.choice(["+", "-"], size=4), rng.standard_normal(2), rng.integers(0, 10)]
    state = rng.bit_generator.state
    return [np.asarray(x).tolist() for x in out] + [{k: np.asarray(v).tolist() for k, v in state["state"].items()}]


SEEDS = [0, 1, 7, 2**32 + 3, 2**63 - 1, 2**63 + 5, -1]  # keys >= 2**63 go through numpy's float64 conversion
STREAMS = [tasks.TRAIN_STREAM, tasks.EVAL_STREAM, 12345]
INDICES = [0, 1, 2, 1000, 2**31 - 1, 2**32 + 1, 2**53 + 1, 2**62 + 12345, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, -1]


def test_example_rng_draws_exactly_as_a_fresh_philox():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's own cast warning for indices near 2**64
        for seed in SEEDS:
            for stream in STREAMS:
                for index in INDICES + INDICES[:3]:  # revisit: a reused generator is rewound, not continued
                    want = _draws(fresh_example_rng(seed, stream, index))
                    assert _draws(tasks.example_rng(seed, stream, index)) == want, (seed, stream, index)
                    other = (seed, stream + 1, index)  # another key in between must not disturb this one
                    assert _draws(tasks.example_rng(*other)) == _draws(fresh_example_rng(*other))
    for index in (2**64, 2**70):  # out of numpy's range: refused alike
        with pytest.raises(OverflowError):
            fresh_example_rng(0, 0, index)
        with pytest.raises(OverflowError):
            tasks.example_rng(0, 0, index)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_examples_unchanged_by_the_cheaper_rng(name):
    task = tasks.get_task(name)
    for i in [*range(300), 2**40 + 7]:
        want = task.generate(fresh_example_rng(5, tasks.TRAIN_STREAM, i), 4)
        assert tasks.make_example(task, 4, 5, tasks.TRAIN_STREAM, i) == want


def test_example_rng_per_thread():
    """The prefetch thread and the main thread (eval batches) generate at once; neither may move the other's."""
    task = tasks.get_task("pointer_chase")
    want = {s: [task.generate(fresh_example_rng(0, s, i), 3).text for i in range(400)] for s in range(4)}
    got = {}

    def work(s):
        got[s] = [tasks.make_example(task, 3, 0, s % 2, i).text for i in range(400)]  # two threads per key

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert got == {s: want[s % 2] for s in range(4)}
