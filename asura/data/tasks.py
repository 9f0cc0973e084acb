"""Embedded reasoning tasks: offline, deterministic, random-access by (seed, stream, index).

Every example is ASCII text ``prompt + answer + "\\n"`` tokenised byte-for-byte
(token id = byte value), so a model vocabulary of 128 covers every task. The
answer tokens (including the closing newline, so the model learns to stop) are
the only ones scored. Pure numpy; no grain, no JAX.

Difficulty knobs (``data.difficulty``):
  pointer_chase  k hops: follow k assignments ``a=b;b=c;c=7;`` from the query variable to a digit
  addition       n digits per operand (fixed width, zero padded); answer has n+1 digits
  parity         n bits; answer is the XOR of all bits
  reverse        n letters; answer is the string reversed
  modular_arith  n terms of ``+``/``-`` digits mod 10 (sequential state tracking)
  p_hop          p hops of induction over 256 letters from {a,b,c,d} (Saunshi et al. 2025); ``p_hop_64``,
                 ``_32``, ``_16``: shorter; ``p_hop_16_dense``: every prefix's hop is the answer (Sanford et al. 2024)
  nary_addition  n operands of 3 digits, ``315+120+045+824=1304`` (Saunshi et al. 2025);
                 ``nary_addition_lsb``: the same sum written least significant digit first (``4031``)
  addition_lsb   n digits per operand, least significant digit first (length generalisation:
                 McLeish et al. 2024, Fan et al. 2024)

Held-out problems, by construction: a problem's identity is its prompt (which fixes the answer),
and a hash of (task, prompt) puts a fixed fraction ``data.held_out`` of all problems in the eval
split. The train stream skips eval-split problems and the eval stream draws only them (the next
draw of the same example generator), so no eval problem is ever trained on, at any seed or step
count. A harder ``data.eval_difficulty`` is a second, generalisation split (lengths never trained);
``data.min_difficulty`` trains on a range of difficulties (each example's drawn from it), so a
model can see short problems of every length up to ``data.difficulty`` and be tested past it.

Your own task: ``data.task=my_pkg.my_module:MyTask`` names a ``Task`` subclass (imported when the
config is checked); it gets the same split.

A question in plain form (``python -m asura.generate --question``) becomes a prompt through
``Task.format_question``, the same formatting the generator uses (e.g. addition ``5+7`` at
difficulty 2 is ``05+07=``): one rule, so a model is asked in the format it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import re
import string
import threading
from dataclasses import dataclass

import numpy as np

TRAIN_STREAM = 0
EVAL_STREAM = 1
HELD_OUT = 0.125  # data.held_out's default: the fraction of problems reserved for evaluation
MIN_HELD_OUT = 64  # fewer held-out problems than this would make exact match too coarse to compare
MAX_DRAWS = 1000  # redraws for an example in its split: (1 - 1/8) ** 1000 ~ 1e-58 to fail by chance
_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # without the trailing newline

    @property
    def text(self) -> str:
        return self.prompt + self.answer + "\n"

    def encode(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_L int32, answer_L bool): bytes, and which of them are scored."""
        tokens_L = np.frombuffer(self.text.encode("ascii"), dtype=np.uint8).astype(np.int32)
        answer_L = np.zeros(len(tokens_L), dtype=bool)
        answer_L[len(self.prompt) :] = True
        return tokens_L, answer_L


class Task:
    """A task is a pure generator: (rng, difficulty) -> Example, with a known maximum length."""

    name: str = ""
    vocab_size_needed: int = 128  # ASCII
    marker: str = "="  # closes every prompt
    question_form: str = ""  # the plain question `format_question` reads, and an example

    def format_question(self, question: str, difficulty: int) -> str:
        """The prompt training shows for `question` in plain form (the closing marker optional);
        a one-line ValueError naming the form when the question does not parse."""
        body = question.strip().removesuffix(self.marker)
        prompt = self._parse(body, difficulty)
        if prompt is None:
            raise ValueError(f"task {self.name}: question {question!r} is not of the form {self.question_form}")
        return prompt

    def _parse(self, body: str, difficulty: int) -> str | None:
        """The prompt for a question without its marker, or None when it does not parse."""
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        raise NotImplementedError

    def max_len(self, difficulty: int) -> int:
        """Upper bound on the example length in tokens (all tasks here are fixed length)."""
        raise NotImplementedError

    def n_problems(self, difficulty: int) -> int | None:
        """How many distinct prompts `generate` can produce (an upper bound), or None if unknown;
        the held-out split is checked against it up front."""
        return None

    def check_difficulty(self, difficulty: int) -> None:
        if difficulty < 1:
            raise ValueError(f"task {self.name}: difficulty must be >= 1, got {difficulty}")


class PointerChase(Task):
    """Shuffled assignments; the query's chain has k hops, a distractor chain has k too."""

    name = "pointer_chase"
    marker = "?"
    question_form = "assignments NAME=NAME|DIGIT; then the query NAME whose chain ends in a digit, e.g. a=b;b=7;a"

    def check_difficulty(self, difficulty: int) -> None:
        super().check_difficulty(difficulty)
        if 2 * difficulty > len(_LETTERS):
            raise ValueError(f"task pointer_chase: difficulty (hops) must be <= 13 (26 names), got {difficulty}")

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        k = difficulty
        names = [_LETTERS[i] for i in rng.permutation(len(_LETTERS))[: 2 * k]]
        value, other = rng.permutation(10)[:2]  # distinct values: the distractor never agrees
        stmts = []
        for chain, val in ((names[:k], value), (names[k:], other)):
            stmts += [f"{a}={b};" for a, b in itertools.pairwise(chain)] + [f"{chain[-1]}={val};"]
        order = rng.permutation(len(stmts))
        return Example(self._prompt([stmts[i] for i in order], names[0]), str(value))

    def _prompt(self, stmts: list[str], query: str) -> str:
        return "".join(stmts) + query + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        *stmts, query = body.split(";")
        if not stmts or not re.fullmatch("[a-z]", query) or not all(re.fullmatch("[a-z]=[a-z0-9]", a) for a in stmts):
            return None
        value = dict(a.split("=") for a in stmts)
        at = query
        for _ in range(len(value) + 1):  # follow the chain; a loop or a dead end has no answer
            at = value.get(at, "")
            if at.isdigit():
                return self._prompt([a + ";" for a in stmts], query)
        return None

    def max_len(self, difficulty: int) -> int:
        return 8 * difficulty + 4

    def n_problems(self, difficulty: int) -> int:
        k = difficulty  # ordered names, the two values, the statements' order
        return math.perm(len(_LETTERS), 2 * k) * 90 * math.factorial(2 * k)


class Addition(Task):
    name = "addition"
    question_form = "A+B with non-negative integers A and B, e.g. 5+7 (zero-padded to data.difficulty digits)"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        n = difficulty
        a, b = (int("".join(map(str, rng.integers(0, 10, size=n)))) for _ in range(2))
        return Example(self._prompt(a, b, n), f"{a + b:0{n + 1}d}")

    def _prompt(self, a: int, b: int, width: int) -> str:
        return f"{a:0{width}d}+{b:0{width}d}{self.marker}"

    def _parse(self, body: str, difficulty: int) -> str | None:
        m = re.fullmatch(r"([0-9]+)\+([0-9]+)", body)
        if m is None:
            return None
        a, b = int(m[1]), int(m[2])
        return self._prompt(a, b, max(difficulty, len(str(a)), len(str(b))))  # longer operands: a harder question

    def max_len(self, difficulty: int) -> int:
        return 3 * difficulty + 4

    def n_problems(self, difficulty: int) -> int:
        return 10 ** (2 * difficulty)


class Parity(Task):
    name = "parity"
    question_form = "a string of bits, e.g. 1011"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        bits = rng.integers(0, 2, size=difficulty)
        return Example(self._prompt("".join(map(str, bits))), str(int(bits.sum()) % 2))

    def _prompt(self, bits: str) -> str:
        return bits + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        return self._prompt(body) if re.fullmatch("[01]+", body) else None

    def max_len(self, difficulty: int) -> int:
        return difficulty + 3

    def n_problems(self, difficulty: int) -> int:
        return 2**difficulty


class Reverse(Task):
    name = "reverse"
    marker = ">"
    question_form = "lowercase letters a-z, e.g. abc"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        s = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), size=difficulty))
        return Example(self._prompt(s), s[::-1])

    def _prompt(self, letters: str) -> str:
        return letters + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        return self._prompt(body) if re.fullmatch("[a-z]+", body) else None

    def max_len(self, difficulty: int) -> int:
        return 2 * difficulty + 2

    def n_problems(self, difficulty: int) -> int:
        return len(_LETTERS) ** difficulty


class ModularArith(Task):
    """``3+4-8+1=`` evaluated mod 10: n operations applied left to right to a start digit."""

    name = "modular_arith"
    question_form = "a digit, then one or more +DIGIT or -DIGIT, e.g. 3+4-8"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        digits = rng.integers(0, 10, size=difficulty + 1)
        ops = rng.choice(["+", "-"], size=difficulty)
        acc = int(digits[0])
        for op, d in zip(ops, digits[1:]):
            acc = (acc + int(d)) % 10 if op == "+" else (acc - int(d)) % 10
        body = str(digits[0]) + "".join(f"{op}{d}" for op, d in zip(ops, digits[1:]))
        return Example(self._prompt(body), str(acc))

    def _prompt(self, body: str) -> str:
        return body + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        return self._prompt(body) if re.fullmatch("[0-9]([+-][0-9])+", body) else None

    def max_len(self, difficulty: int) -> int:
        return 2 * difficulty + 4

    def n_problems(self, difficulty: int) -> int:
        return 10 ** (difficulty + 1) * 2**difficulty


class PHop(Task):
    """p-hop induction (Saunshi et al. 2025, "Reasoning with latent thoughts", arXiv 2502.17416,
    Definition A.1, after Sanford et al. 2024): over a sequence v_1..v_n of letters,

        find_1(v, i) = max({0} ∪ {j <= i : v_{j-1} = v_i})      (1-indexed)
        find_p(v, i) = find_1(v, find_{p-1}(v, i)),    hop_p(v) = v_{find_p(v, n)}

    i.e. from the last letter, jump to the letter just after its previous occurrence, p times; the
    answer is the letter reached. The paper: alphabet 4, n = 256, p in {16, 32} (``p_hop``;
    ``p_hop_64``, ``p_hop_32`` and ``p_hop_16`` are n = 64, 32, 16 for CPU-sized models). ``data.difficulty`` is p.

    Instances are built as the paper's appendix A.1 says ("first picking the sequence of p-hops
    randomly and then shuffling them around in a sequence with filler tokens ... sample the
    remaining characters ... while respecting the p-hop order"): the chain's landing positions
    i_1 > ... > i_p are a random p-subset of 2..n-1, each i_k preceded by the letter it is reached
    from, consecutive chain letters distinct, and every filler between i_k and i_{k-1} avoids the
    letter being searched for there, so the answer exists and takes exactly p hops (no fixed
    point v_{i-1} = v_i shortens the chain). Prompt: the n letters then ``?``; answer: one letter.
    """

    name = "p_hop"
    marker = "?"
    alphabet = "abcd"
    length = 256
    every_prefix = False  # True: the answer is hop_p of every prefix (see PHop16Dense)
    question_form = "letters a-d (the last one is the query), e.g. abcabdcb"

    def check_difficulty(self, difficulty: int) -> None:
        super().check_difficulty(difficulty)
        if difficulty > self.length - 2:
            raise ValueError(
                f"task {self.name}: difficulty (hops) must be <= {self.length - 2} (n={self.length}), got {difficulty}"
            )

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        n, p, a = self.length, difficulty, len(self.alphabet)
        v = np.full(n + 1, -1, dtype=np.int64)  # 1-indexed; -1 = a filler, drawn last
        avoid = np.full(n + 1, -1, dtype=np.int64)  # the letter a filler must not be: the one searched for there
        lands = np.sort(rng.choice(np.arange(2, n), size=p, replace=False))[::-1]  # i_1 > ... > i_p
        shift = rng.integers(1, a, size=p)  # non-zero: a landing letter differs from the one it was reached by
        v[n] = rng.integers(a)  # the query, t_0
        prev_i, prev_t = n, int(v[n])
        for i, s in zip(lands, shift):
            v[i - 1] = prev_t  # the occurrence the hop finds; always free: every earlier write is at >= i
            if v[i] < 0:  # i_k is taken only when it is the previous hop's occurrence (then its letter differs)
                v[i] = (prev_t + s) % a
            avoid[i + 1 : prev_i] = prev_t  # nothing between the occurrence and the hop's start matches
            prev_i, prev_t = int(i), int(v[i])
        uniform, off = rng.integers(a, size=n + 1), rng.integers(1, a, size=n + 1)
        fill = np.where(avoid >= 0, (avoid + off) % a, uniform)  # before the chain: anything
        v = np.where(v >= 0, v, fill)[1:]
        letters = "".join(self.alphabet[t] for t in v)
        if self.every_prefix:
            return Example(self._prompt(letters), every_prefix_hops(letters, p))
        return Example(self._prompt(letters), letters[lands[-1] - 1])

    def _prompt(self, letters: str) -> str:
        return letters + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        if not re.fullmatch(f"[{self.alphabet}]{{2,}}", body) or hop(body, difficulty) is None:
            return None
        return self._prompt(body)

    def max_len(self, difficulty: int) -> int:
        return 2 * self.length + 2 if self.every_prefix else self.length + 3

    def n_problems(self, difficulty: int) -> int:
        return len(self.alphabet) ** self.length


class PHop64(PHop):
    name = "p_hop_64"
    length = 64


class PHop32(PHop):
    name = "p_hop_32"
    length = 32


class PHop16(PHop):
    name = "p_hop_16"
    length = 16


class PHop16Dense(PHop16):
    """p-hop with a target at every position, as Sanford et al. 2024 ("Transformers, parallel
    computation, and logarithmic depth", ICML 2024) state the task: hop_p(X)_i for every prefix
    X_1..X_i, ``.`` where no p-hop exists. The same sequences as ``p_hop_16``; the answer is the
    16 per-prefix hops, the last of them ``p_hop_16``'s answer. One example then scores 16 tokens
    instead of 1, which is what makes the task learnable at a CPU budget (issue #28): a change of
    supervision, not of the sequences."""

    name = "p_hop_16_dense"
    every_prefix = True


def every_prefix_hops(letters: str, p: int) -> str:
    """hop_p of each prefix letters[:i], i = 1..n, ``.`` where find_p is 0 (no p-hop)."""
    return "".join(hop(letters[:i], p) or "." for i in range(1, len(letters) + 1))


def hop(letters: str, p: int) -> str | None:
    """hop_p of Definition A.1 (Saunshi et al. 2025), literally; None where find_p is 0."""
    i = len(letters)  # 1-indexed position of the query
    for _ in range(p):
        i = max([0] + [j for j in range(2, i + 1) if letters[j - 2] == letters[i - 1]])
        if i == 0:
            return None
    return letters[i - 1]


class NaryAddition(Task):
    """n-ary addition (Saunshi et al. 2025, section 2.1 and appendix A.1): "adding n numbers with 3
    digits each", each operand uniform in [0, 999] and zero padded, no chain of thought; their
    example input ``315 + 120 + 045 + 824 =``, output ``1304``. Here without the spaces (one byte
    per token). ``data.difficulty`` is n; the paper trains on a mixture of n in {2, 4, 8, 16, 32}
    (``data.min_difficulty`` draws n uniformly from a range instead) and evaluates n = 8..32."""

    name = "nary_addition"
    digits = 3
    question_form = "NUMBER+NUMBER+... with numbers of at most 3 digits, e.g. 315+120+45"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        operands = [int(x) for x in rng.integers(0, 10**self.digits, size=difficulty)]
        return Example(self._prompt(operands), str(sum(operands)))

    def _prompt(self, operands: list[int]) -> str:
        return "+".join(f"{x:0{self.digits}d}" for x in operands) + self.marker

    def _parse(self, body: str, difficulty: int) -> str | None:
        if not re.fullmatch(f"[0-9]{{1,{self.digits}}}(\\+[0-9]{{1,{self.digits}}})*", body):
            return None
        return self._prompt([int(x) for x in body.split("+")])

    def max_len(self, difficulty: int) -> int:
        return (self.digits + 1) * difficulty + len(str((10**self.digits - 1) * difficulty)) + 1

    def n_problems(self, difficulty: int) -> int:
        return 10 ** (self.digits * difficulty)


class NaryAdditionLSB(NaryAddition):
    """``nary_addition`` with the sum written least significant digit first (the operands as the
    paper writes them): ``315+120+045+824=`` -> ``4031``. The CPU-sized form of Saunshi et al.'s
    task (issue #28): with the usual order the first answer digit needs every carry at once, and no
    model learned the usual order in the pilots' budget (docs/papers.md); in this order each digit
    needs one column and the carry into it, the order the length-generalisation papers use. A
    change of output order, not of the problems."""

    name = "nary_addition_lsb"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        usual = super().generate(rng, difficulty)
        return Example(usual.prompt, usual.answer[::-1])


class AdditionLSB(Task):
    """Addition written least significant digit first, the format of the length-generalisation
    papers (McLeish et al. 2024, arXiv 2405.17399: ``98282+3859172=2787472``, every number
    reversed, no padding; Fan et al. 2024, arXiv 2409.15647). ``data.difficulty`` n: both operands
    have exactly n digits (leading digit non-zero for n > 1, so the length is real); the answer has
    n or n + 1. Train on a range (``data.min_difficulty``) and evaluate longer operands
    (``data.eval_difficulty``): the length split."""

    name = "addition_lsb"
    question_form = "A+B written least significant digit first, as the prompt is, e.g. 321+989 (123 + 989)"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        lo = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        a, b = (int(x) for x in rng.integers(lo, 10**difficulty, size=2))
        return Example(self._prompt(a, b), str(a + b)[::-1])

    def _prompt(self, a: int, b: int) -> str:
        return f"{str(a)[::-1]}+{str(b)[::-1]}{self.marker}"

    def _parse(self, body: str, difficulty: int) -> str | None:
        return body + self.marker if re.fullmatch(r"[0-9]+\+[0-9]+", body) else None  # already in the task's order

    def max_len(self, difficulty: int) -> int:
        return 3 * difficulty + 4

    def n_problems(self, difficulty: int) -> int:
        return 100 if difficulty == 1 else (9 * 10 ** (difficulty - 1)) ** 2


TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        PointerChase,
        Addition,
        Parity,
        Reverse,
        ModularArith,
        PHop,
        PHop64,
        PHop32,
        PHop16,
        PHop16Dense,
        NaryAddition,
        NaryAdditionLSB,
        AdditionLSB,
    )
}


def get_task(name: str) -> Task:
    """A registered task by name, or a user's Task subclass named `module.path:ClassName`."""
    if ":" in name:
        return _import_task(name)
    if name not in TASKS:
        raise ValueError(
            f"unknown data.task {name!r}; valid: {', '.join(sorted(TASKS))}, or module.path:ClassName (a Task subclass)"
        )
    return TASKS[name]()


def _import_task(name: str) -> Task:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"data.task={name!r}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        what = "has no attribute" if cls is None else "has an attribute that is not a Task subclass:"
        raise ValueError(f"data.task={name!r}: module {module_name!r} {what} {attr!r} (asura.data.tasks.Task)")
    for method in ("generate", "max_len"):
        if getattr(cls, method) is getattr(Task, method):
            raise ValueError(f"data.task={name!r}: {attr} does not define {method}() (see asura.data.tasks.Task)")
    task = cls()
    if not task.name:
        task.name = name
    return task


_MASK64 = (1 << 64) - 1
_INT64_END = 1 << 63  # numpy reads [0, index, 0, 0] as int64 below this, exactly; above it, as float64
_RNG_CACHE = threading.local()  # per thread: {(seed, stream): Generator}; a thread never shares its generators


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (seed, stream, index): examples are random-access and streams disjoint.

    Counter-based Philox: (seed, stream) is the key and the index sits in the second counter word, so
    streams never overlap (each example draws far fewer than 2**64 blocks). The draws are exactly those of
    ``Generator(Philox(key=[seed, stream], counter=[0, index, 0, 0]))``, but building a Philox makes an
    OS-entropy SeedSequence first, so one generator per (seed, stream) and thread is kept and rewound to the
    example's counter instead. The returned generator is therefore reused by the next call in the same
    thread with the same (seed, stream): draw from it before asking for another example's.
    """
    key = (int(seed) & _MASK64, int(stream) & _MASK64)
    try:
        cache = _RNG_CACHE.by_key
    except AttributeError:  # first call in this thread
        cache = _RNG_CACHE.by_key = {}
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= 64:  # a few (seed, stream) pairs per run; never grow without bound
            cache.clear()
        gen = np.random.Generator(np.random.Philox(key=list(key)))  # numpy converts the key, once
        entry = cache[key] = (gen, gen.bit_generator.state)  # the state just after construction
    gen, fresh = entry
    index = int(index)
    if 0 <= index < _INT64_END:
        counter = np.zeros(4, np.uint64)
        counter[1] = index
    else:  # numpy's own conversion, float64 rounding and all, so that even these indices draw as before
        counter = np.asarray([0, index, 0, 0]).astype(np.uint64)
    fresh["state"]["counter"] = counter  # the setter copies the arrays in; `fresh` stays as built otherwise
    gen.bit_generator.state = fresh
    return gen


def is_held_out(task: Task, prompt: str, held_out: float) -> bool:
    """Is this problem in the eval split? A pure function of the task and the prompt: not of the
    seed, the stream, the step or the difficulty setting, so a problem is on one side for every run."""
    digest = hashlib.blake2b(f"{task.name}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < held_out * 2.0**64


def make_example(
    task: Task, difficulty: int, seed: int, stream: int, index: int, held_out: float = HELD_OUT, min_difficulty: int = 0
) -> Example:
    """Example `index` of a stream: the first draw of its generator that lies in the stream's split
    (held-out problems for EVAL_STREAM, the rest for every other stream). With 0 < min_difficulty <
    difficulty the example's difficulty is drawn first, uniformly from min_difficulty..difficulty."""
    want = stream == EVAL_STREAM
    rng = example_rng(seed, stream, index)
    if 0 < min_difficulty < difficulty:
        difficulty = int(rng.integers(min_difficulty, difficulty + 1))
    for _ in range(MAX_DRAWS):
        ex = task.generate(rng, difficulty)
        if is_held_out(task, ex.prompt, held_out) == want:
            return ex
    side = "held-out" if want else "training"
    raise ValueError(
        f"task {task.name} at difficulty {difficulty}: no {side} problem in {MAX_DRAWS} draws; it has too few "
        f"distinct problems for data.held_out={held_out}"
    )


def eval_examples(task_name: str, difficulty: int, seed: int, count: int) -> list[Example]:
    """The first `count` held-out eval problems of a run (its EVAL_STREAM at one difficulty): what
    generation benchmarks prompt with."""
    task = get_task(task_name)
    return [make_example(task, difficulty, seed, EVAL_STREAM, i) for i in range(count)]


def check_min_difficulty(task: Task, min_difficulty: int) -> None:
    """A training range must not start where so few problems exist that the held-out split could
    take them all (the train stream would find none)."""
    if min_difficulty <= 0:
        return
    task.check_difficulty(min_difficulty)
    n = task.n_problems(min_difficulty)
    if n is not None and n < MIN_HELD_OUT:
        raise ValueError(
            f"task {task.name} at data.min_difficulty={min_difficulty} has {n} distinct problems, fewer than "
            f"{MIN_HELD_OUT}: the held-out split could leave none to train on; raise data.min_difficulty"
        )


def check_held_out(task: Task, difficulty: int, held_out: float, what: str = "data.difficulty") -> None:
    """Raise if the split leaves too few problems on either side (one line naming the fix)."""
    if not 0 < held_out <= 0.5:
        raise ValueError(f"data.held_out must be in (0, 0.5] (the fraction of problems kept for eval), got {held_out}")
    n = task.n_problems(difficulty)
    if n is not None and n * held_out < MIN_HELD_OUT:
        raise ValueError(
            f"task {task.name} at {what}={difficulty} has {n} distinct problems: data.held_out={held_out} keeps about "
            f"{n * held_out:.0f} for evaluation, fewer than {MIN_HELD_OUT}; raise the difficulty or data.held_out"
        )


def check_fits(task: Task, difficulty: int, seq_len: int, what: str = "data.difficulty") -> None:
    """Raise if an example of this difficulty cannot fit a row of seq_len tokens."""
    task.check_difficulty(difficulty)
    need = task.max_len(difficulty)
    if need > seq_len:
        raise ValueError(
            f"task {task.name} at {what}={difficulty} needs {need} tokens per example "
            f"but data.seq_len={seq_len}; raise data.seq_len to >= {need} or lower the difficulty"
        )
