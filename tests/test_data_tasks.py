"""Embedded tasks: every answer is checked by an independent solver that parses the generated text."""

import hashlib
import itertools
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


def hop_chain(letters: str, p: int) -> list[int]:
    """The 0-indexed positions p-hop induction visits (Saunshi et al. 2025, Definition A.1), found
    by scanning back from each position for the nearest earlier copy of its letter; stops at a dead
    end (find = 0)."""
    at, chain = len(letters) - 1, []
    for _ in range(p):
        back = letters.rfind(letters[at], 0, at)  # the previous occurrence, or -1
        if back < 0:
            break
        at = back + 1
        chain.append(at)
    return chain


def solve(name: str, prompt: str) -> str:
    if name.startswith("p_hop"):
        raise AssertionError("p_hop needs p: see solve_with")
    if name == "nary_addition":
        return str(sum(int(x) for x in prompt.rstrip("=").split("+")))
    if name == "nary_addition_lsb":
        return solve("nary_addition", prompt)[::-1]
    if name == "addition_lsb":
        a, b = prompt.rstrip("=").split("+")
        return str(int(a[::-1]) + int(b[::-1]))[::-1]
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


def solve_with(name: str, prompt: str, difficulty: int) -> str:
    if name.endswith("_dense"):  # every prefix's hop, "." where it has none
        letters = prompt.rstrip("?")
        chains = [hop_chain(letters[:i], difficulty) for i in range(1, len(letters) + 1)]
        return "".join(letters[c[-1]] if len(c) == difficulty else "." for c in chains)
    if name.startswith("p_hop"):
        letters = prompt.rstrip("?")
        chain = hop_chain(letters, difficulty)
        assert len(chain) == difficulty, "the answer must exist"
        return letters[chain[-1]]
    return solve(name, prompt)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
@pytest.mark.parametrize("difficulty", [1, 3, 6])
def test_answers_match_independent_solver(name, difficulty):
    task = tasks.get_task(name)
    for i in range(200):
        ex = tasks.make_example(task, difficulty, seed=7, stream=tasks.TRAIN_STREAM, index=i)
        assert ex.answer == solve_with(name, ex.prompt, difficulty), (name, ex.text)
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


@pytest.mark.parametrize(
    ("letters", "p", "answer"),
    [
        ("abcb", 1, "c"),  # b's previous copy is at 2: land on 3, a c
        ("abcb", 2, None),  # no c before position 3
        ("abab", 2, "b"),  # b -> 3 (a) -> 2 (b)
        ("abab", 3, None),
        ("abb", 5, "b"),  # v_2 = v_3: find_1(v, 3) = 3, a fixed point the definition allows
        ("cdbcabda", 3, "d"),  # a at 8 -> 6 (b) -> 4 (c) -> 2 (d)
        ("cdbcabda", 4, None),  # no d before position 2
    ],
)
def test_p_hop_follows_definition_a1_on_hand_worked_sequences(letters, p, answer):
    assert tasks.hop(letters, p) == answer
    chain = hop_chain(letters, p)
    assert (letters[chain[-1]] if len(chain) == p else None) == answer


@pytest.mark.parametrize("p", [1, 4, 16, 32])
def test_p_hop_takes_exactly_p_distinct_hops(p):
    """The generator's chain never stalls on a fixed point (v_{i-1} = v_i), so the answer is p
    hops away, not fewer; and the hop after the last lands somewhere else or nowhere."""
    task = tasks.get_task("p_hop")
    for i in range(40):
        letters = tasks.make_example(task, p, seed=3, stream=0, index=i).prompt.rstrip("?")
        assert len(letters) == 256 and set(letters) <= set("abcd")
        chain = [len(letters) - 1, *hop_chain(letters, p)]
        assert len(chain) == p + 1 and all(a > b for a, b in itertools.pairwise(chain)), chain
        further = hop_chain(letters, p + 1)  # one hop more: nowhere, or somewhere new
        assert len(further) == p or further[-1] < chain[-1]


@pytest.mark.parametrize(("letters", "p", "answer"), [("abab", 1, "..ba"), ("abab", 2, "...b"), ("abb", 1, "..b")])
def test_p_hop_dense_answers_every_prefix(letters, p, answer):
    # abab, p = 1: aba -> a's copy at 1, land on 2 (b); abab -> b's copy at 2, land on 3 (a).
    # p = 2: aba -> 2 (b), no b before it; abab -> 3 (a) -> 2 (b). abb: the fixed point b -> 3.
    assert tasks.every_prefix_hops(letters, p) == answer


def test_p_hop_dense_is_p_hop_16_with_every_prefix_scored():
    """Same sequences as p_hop_16 (same draw), the answer ending in p_hop_16's answer."""
    dense, plain = tasks.get_task("p_hop_16_dense"), tasks.get_task("p_hop_16")
    for i in range(50):
        d, s = (tasks.make_example(t, 3, seed=1, stream=0, index=i, held_out=0.0) for t in (dense, plain))
        assert d.prompt == s.prompt and len(d.answer) == 16 and d.answer[-1] == s.answer
        assert len(d.text) <= dense.max_len(3)


def test_paper_examples_format_as_the_papers_write_them():
    nary = tasks.get_task("nary_addition")  # Saunshi et al. 2025, section 2.1
    prompt = nary.format_question("315+120+45+824", 4)
    assert prompt == "315+120+045+824=" and solve("nary_addition", prompt) == "1304"
    nary_lsb = tasks.get_task("nary_addition_lsb")  # the same problems, the sum least significant digit first
    assert nary_lsb.format_question("315+120+45+824", 4) == prompt and solve("nary_addition_lsb", prompt) == "4031"
    lsb = tasks.get_task("addition_lsb")  # McLeish et al. 2024: 98282+3859172=2787472, all reversed
    prompt = lsb.format_question("98282+3859172", 5)
    assert prompt == "98282+3859172=" and solve("addition_lsb", prompt) == "2787472"
    with pytest.raises(ValueError, match="is not of the form"):
        nary.format_question("1000+1", 2)  # a 4-digit operand was never trained on
    with pytest.raises(ValueError, match="is not of the form"):
        tasks.get_task("p_hop_64").format_question("abce", 1)  # not in the alphabet


def test_addition_lsb_operands_have_exactly_n_digits():
    task = tasks.get_task("addition_lsb")
    for d in (1, 2, 5):
        for i in range(200):
            a, b = tasks.make_example(task, d, 0, 0, i).prompt.rstrip("=").split("+")
            assert len(a) == len(b) == d and (d == 1 or (a[-1] != "0" and b[-1] != "0"))


def test_difficulty_scales_length():
    for name in {n for n in tasks.TASKS if not n.startswith("p_hop")}:  # p-hop: n is fixed, p is the difficulty
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
    with pytest.raises(
        ValueError,
        match=r"unknown data.task 'nope'; valid: addition, addition_lsb, modular_arith, nary_addition, "
        r"nary_addition_lsb, p_hop",
    ):
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


def held_out_by_spec(name: str, prompt: str, fraction: float = 0.125) -> bool:
    """The split as specified: the first 8 bytes of blake2b(task NUL prompt), little endian, below
    the fraction of 2**64."""
    digest = hashlib.blake2b(f"{name}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def reference_example(task, difficulty, seed, stream, index):
    """Example `index` as first written: a fresh Philox, drawn until the problem is on its stream's side."""
    rng = fresh_example_rng(seed, stream, index)
    while True:
        ex = task.generate(rng, difficulty)
        if held_out_by_spec(task.name, ex.prompt) == (stream == tasks.EVAL_STREAM):
            return ex


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_examples_unchanged_by_the_cheaper_rng(name):
    task = tasks.get_task(name)
    for stream in (tasks.TRAIN_STREAM, tasks.EVAL_STREAM):
        for i in [*range(150), 2**40 + 7]:
            assert tasks.make_example(task, 4, 5, stream, i) == reference_example(task, 4, 5, stream, i)


def test_example_rng_per_thread():
    """The prefetch thread and the main thread (eval batches) generate at once; neither may move the other's."""
    task = tasks.get_task("pointer_chase")
    want = {s: [reference_example(task, 3, 0, s, i).text for i in range(400)] for s in range(2)}
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


# ------------------------------------------------------------ held-out problems

# Small problem spaces, so that a run's training draws cover most of them: a leak would show.
SMALL = {
    "addition": 2, "parity": 10, "reverse": 3, "modular_arith": 3, "pointer_chase": 1, "p_hop": 4, "p_hop_64": 4,
    "p_hop_32": 4, "p_hop_16": 4, "p_hop_16_dense": 4, "nary_addition": 1, "nary_addition_lsb": 1,
    "addition_lsb": 2,
}  # fmt: skip
# p-hop has 4**64 problems or more: a chance collision is impossible and generation is slower, so
# fewer documents check that the train stream draws only training problems.
N_TRAIN = {"p_hop": 4_000, "p_hop_64": 8_000, "p_hop_16": 20_000}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_no_eval_problem_is_ever_trained_on(name):
    """The documents a 10,000-step run at batch 8 trains on (the pipeline's own index -> document
    map), under two seeds, share no problem with the eval stream, and every eval document is a
    held-out problem: zero overlap, by construction."""
    from asura.config.load import with_overrides
    from asura.config.schema import Config
    from asura.data import host

    d = SMALL[name]
    seen: dict[int, set[str]] = {}
    for seed in (0, 1):
        seq_len = max(64, tasks.get_task(name).max_len(d))
        cfg = with_overrides(
            Config(), {"data.task": name, "data.difficulty": d, "train.seed": seed, "data.seq_len": seq_len}
        )
        n = N_TRAIN.get(name, 80_000)
        train = host.task_documents(cfg, stream=tasks.TRAIN_STREAM, difficulty=d, n_examples=n)
        seen[seed] = {_prompt(train.to_doc(i)) for i in range(n)}
        assert not any(held_out_by_spec(name, p) for p in seen[seed])
        ev = host.task_documents(cfg, stream=tasks.EVAL_STREAM, difficulty=d, n_examples=2_000)
        eval_prompts = {_prompt(ev.to_doc(i)) for i in range(2_000)}
        assert all(held_out_by_spec(name, p) for p in eval_prompts)
        assert not seen[seed] & eval_prompts
        for other in seen.values():  # nor with another seed's training problems
            assert not other & eval_prompts
    if name in ("addition", "parity"):  # the training draws saturate the space: a leak could not hide
        n = tasks.get_task(name).n_problems(d)
        assert len(seen[0] | seen[1]) > 0.8 * n


def _prompt(doc: dict) -> str:
    tokens, scored = doc["tokens"], doc["scored"].astype(bool)
    return bytes(tokens[~scored].astype(np.uint8)).decode()


def test_the_held_out_fraction_is_as_configured():
    task = tasks.get_task("addition")
    prompts = [task._prompt(a, b, 2) for a in range(100) for b in range(100)]
    for fraction in (0.125, 0.3):
        got = sum(tasks.is_held_out(task, p, fraction) for p in prompts)
        assert got == sum(held_out_by_spec("addition", p, fraction) for p in prompts)
        sd = (len(prompts) * fraction * (1 - fraction)) ** 0.5
        assert abs(got - len(prompts) * fraction) < 5 * sd  # a binomial count: 5 sigma
    ev = {tasks.make_example(task, 2, 0, tasks.EVAL_STREAM, i, held_out=0.3).prompt for i in range(3000)}
    assert all(tasks.is_held_out(task, p, 0.3) for p in ev)  # drawn only from the split
    assert any(not tasks.is_held_out(task, p, 0.125) for p in ev)  # a larger split holds more problems


@pytest.mark.parametrize(
    ("name", "difficulty", "held_out", "needle"),
    [
        (
            "parity",
            8,
            0.125,
            r"parity at data.difficulty=8 has 256 distinct problems: data.held_out=0.125 keeps about 32",
        ),
        ("addition", 1, 0.5, r"addition at data.difficulty=1 has 100 distinct problems"),
        ("addition", 2, 0.0, r"data.held_out must be in \(0, 0.5\]"),
        ("addition", 2, 0.75, r"data.held_out must be in \(0, 0.5\]"),
    ],
)
def test_a_split_too_small_to_measure_is_refused(name, difficulty, held_out, needle):
    with pytest.raises(ValueError, match=needle):
        tasks.check_held_out(tasks.get_task(name), difficulty, held_out)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_n_problems_bounds_what_the_generator_draws(name):
    task = tasks.get_task(name)
    d = SMALL[name]
    drawn = {task.generate(fresh_example_rng(0, 0, i), d).prompt for i in range(20_000)}
    assert len(drawn) <= task.n_problems(d)
    if name in ("addition", "parity", "reverse"):  # small enough for 20,000 draws to find (almost) all
        assert len(drawn) >= 0.6 * task.n_problems(d)


# ------------------------------------------------------------ a user's own task (data.task=module:Class)


class NoGenerate(tasks.Task):  # a Task subclass that forgot generate()
    def max_len(self, difficulty):
        return 4


@pytest.fixture
def examples_on_path(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))


def test_a_users_task_is_imported_checked_and_split(examples_on_path):
    task = tasks.get_task("my_task:SortDigits")
    assert task.name == "sort_digits"
    for stream in (tasks.TRAIN_STREAM, tasks.EVAL_STREAM):
        for i in range(200):
            ex = tasks.make_example(task, 4, 0, stream, i)
            assert ex.answer == "".join(sorted(ex.prompt.rstrip("="))) and len(ex.text) <= task.max_len(4)
            assert tasks.is_held_out(task, ex.prompt, tasks.HELD_OUT) == (stream == tasks.EVAL_STREAM)
    tasks.check_held_out(task, 4, tasks.HELD_OUT)
    with pytest.raises(ValueError, match=r"sort_digits at data.difficulty=2 has 100 distinct problems"):
        tasks.check_held_out(task, 2, tasks.HELD_OUT)
    assert task.format_question("3817", 4) == "3817="


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("no_such_module_xyz:Task", r"cannot import module 'no_such_module_xyz'"),
        ("my_task:Missing", r"module 'my_task' has no attribute 'Missing'"),
        ("my_task:re", r"has an attribute that is not a Task subclass: 're'"),
        ("test_data_tasks:NoGenerate", r"NoGenerate does not define generate\(\)"),
    ],
)
def test_a_users_task_that_cannot_serve_is_one_line(examples_on_path, name, needle):
    with pytest.raises(ValueError, match=needle):
        tasks.get_task(name)


# ------------------------------------------------------------ a range of training difficulties


def test_a_training_range_draws_every_difficulty_and_keeps_the_split():
    """data.min_difficulty: each training example's difficulty is drawn from the range (uniformly),
    the held-out split still holds at every length, and the documents vary in length."""
    from asura.config.load import with_overrides
    from asura.config.schema import Config
    from asura.data import host

    cfg = with_overrides(Config(), {"data.task": "addition", "data.difficulty": 4, "data.min_difficulty": 2})
    docs = host.task_documents(cfg, stream=tasks.TRAIN_STREAM, difficulty=4, n_examples=3000, min_difficulty=2)
    prompts = [_prompt(docs.to_doc(i)) for i in range(3000)]
    widths = [len(p.split("+")[0]) for p in prompts]
    counts = {w: widths.count(w) for w in set(widths)}
    sd = (3000 * (1 / 3) * (2 / 3)) ** 0.5  # a binomial count per difficulty: 5 sigma
    assert set(counts) == {2, 3, 4} and all(abs(c - 1000) < 5 * sd for c in counts.values())
    assert not any(tasks.is_held_out(tasks.get_task("addition"), p, tasks.HELD_OUT) for p in prompts)
    assert not docs.fixed_len and docs.max_doc_tokens == tasks.get_task("addition").max_len(4)
    fixed = host.task_documents(cfg, stream=tasks.TRAIN_STREAM, difficulty=4, n_examples=50)
    assert fixed.fixed_len and all(len(_prompt(fixed.to_doc(i)).split("+")[0]) == 4 for i in range(50))


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (["data.min_difficulty=5", "data.difficulty=4"], "data.min_difficulty=5 exceeds data.difficulty=4"),
        (["data.task=parity", "data.difficulty=10", "data.min_difficulty=3"], "parity at data.min_difficulty=3 has 8"),
    ],
)
def test_a_training_range_that_cannot_serve_is_one_line(over, needle):
    from asura.config.load import ConfigError, load_config
    from asura.data import pipeline

    with pytest.raises((ConfigError, ValueError), match=re.escape(needle)):
        pipeline.check_compatible(load_config(None, over))


def test_eval_examples_are_the_eval_stream_and_held_out():
    got = tasks.eval_examples("addition", 2, 7, 20)
    task = tasks.get_task("addition")
    assert got == [tasks.make_example(task, 2, 7, tasks.EVAL_STREAM, i) for i in range(20)]
    assert all(tasks.is_held_out(task, ex.prompt, tasks.HELD_OUT) for ex in got)
