"""What users type into `python -m asura.generate` / `python -m asura.evaluate` that the model
cannot serve (issue #25), run as users run it: a subprocess, exit 2, ONE line on stderr naming
the problem and what is valid. A check that needs nothing from the checkpoint runs before
loading it: given a workdir that does not exist, the refusal must still be about the flag.

Checkpoints here are untrained (init parameters, no train compile): refusals need no skill.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config

from asura.data.tasks import TASKS, make_example

MISSING = "/nonexistent/asura-workdir"


def write_checkpoint(wd, *overrides):
    """A workdir in the train loop's format holding step 1 of tiny_config(*overrides) at init."""
    from asura.config import config_to_yaml
    from asura.train.checkpoint import CheckpointStore, config_meta
    from asura.train.state import init_state

    cfg = tiny_config(*overrides)
    wd.mkdir(parents=True)
    (wd / "config.yaml").write_text(config_to_yaml(cfg))
    store = CheckpointStore(wd / "checkpoints", keep=1, async_save=False)
    store.save(1, init_state(cfg).state, {}, config_meta(cfg, 1))
    store.close()
    return wd


@pytest.fixture(scope="module")
def addition_wd(tmp_path_factory):
    """Task data, 2-digit addition, trained context data.seq_len=32."""
    return write_checkpoint(tmp_path_factory.mktemp("add") / "run", "data.task=addition")


@pytest.fixture(scope="module")
def byte_wd(tmp_path_factory):
    """The byte tokenizer with all 256 byte values in the vocabulary."""
    return write_checkpoint(tmp_path_factory.mktemp("byte") / "run", "data.source=synthetic", "model.vocab_size=256")


@pytest.fixture(scope="module")
def json_wd(tmp_path_factory):
    """A Hugging Face tokenizers JSON (word level): it encodes text, not bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("json")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "ab": 1, "cd": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "words.json"))
    over = ("data.source=text", f"data.path={d}", f"data.tokenizer={d / 'words.json'}", "model.vocab_size=3")
    return write_checkpoint(d / "run", *over)


def cli(module: str, *argv, env=None) -> subprocess.CompletedProcess:
    """argv items may be bytes: what a shell passes for a byte that is not valid text."""
    # JAX_PLATFORMS=cpu unless set: where libtpu is installed without a TPU, its start-up notices go
    # to stderr at random (as in test_train_resume.py); they are not the CLI's lines
    env = {"JAX_PLATFORMS": "cpu", **(os.environ if env is None else env)}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, cwd=ROOT, env=env, timeout=600)


def gen(*argv, env=None):
    return cli("asura.generate", *argv, env=env)


def ev(*argv):
    return cli("asura.evaluate", *argv)


def refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, err)
    assert lines[0].startswith("python -m asura.") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


# ---------------------------------------------------------------- generate: lengths and memory


def test_generate_refuses_more_tokens_than_the_trained_context(addition_wd):
    """Default --max-length is data.seq_len (32 here): positions past it were never trained."""
    ok = ["--workdir", str(addition_wd), "--depth", "2"]
    for prompt, new in (("1+2=", "100"), ("1+2=", "200000000"), ("1" * 20000, "1")):
        refused(gen(*ok, "--prompt", prompt, "--max-new-tokens", new), "data.seq_len=32", "--max-length")
    # a flag-only contradiction (a prompt has >= 1 token) needs no checkpoint
    flags_only = ["--workdir", MISSING, "--depth", "2", "--prompt", "x"]
    refused(gen(*flags_only, "--max-length", "8", "--max-new-tokens", "8"), "--max-new-tokens 8", "--max-length 8")
    refused(gen(*flags_only, "--max-length", "1"), "--max-length must be >= 2")
    # raised past the trained length, a request that fits runs (positions 32..39 are extrapolated)
    r = gen(*ok, "--prompt", "1+2=", "--max-new-tokens", "36", "--max-length", "40")
    assert r.returncode == 0 and b"36 tokens" in r.stderr, r.stderr


def test_generate_refuses_what_cannot_fit_in_device_memory(addition_wd):
    """Raised --max-length: the KV cache alone of 4e9 positions is ~2 TB (2 slots x 2 kv heads x 16 x 2 x 4 B),
    past any device; refused up front with the estimate, for every cache policy."""
    ok = ["--workdir", str(addition_wd), "--depth", "2", "--prompt", "1+2="]
    big = ["--max-length", "4000000000", "--max-new-tokens", "3999999000"]
    for cache in ("per_iteration", "recompute"):
        line = refused(gen(*ok, *big, "--cache", cache), "GiB", "device")
        assert "--max-length" in line


def test_generate_length_checks_run_before_compiling(addition_wd, monkeypatch, capsys):
    """In process, with generation replaced by a tripwire: the refusal comes before any compile."""
    import asura.infer.generate as infer_generate
    from asura import generate as generate_cli

    def tripwire(*a, **k):
        raise AssertionError("generation started (a compile) before the length check")

    monkeypatch.setattr(infer_generate, "generate", tripwire)
    for extra in (["--max-new-tokens", "100"], ["--max-length", "4000000000", "--max-new-tokens", "3999999000"]):
        argv = ["--workdir", str(addition_wd), "--depth", "2", "--prompt", "1+2=", *extra]
        with pytest.raises(SystemExit) as e:
            generate_cli.main(argv)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------- depth limit


def test_depths_past_the_limit_are_refused_before_loading():
    from asura.depth import DEPTH_LIMIT

    want = (f"{DEPTH_LIMIT}", "DEPTH_LIMIT")
    for depth in (str(DEPTH_LIMIT + 1), "100000000"):
        refused(gen("--workdir", MISSING, "--depth", depth, "--extrapolation", "last", "--prompt", "x"), *want)
    for depths in ("1-2000", "2,1025", "1-100000000", "1-1000000000000000000"):  # no list of 1e18 depths is built
        refused(ev("--workdir", MISSING, "--depths", depths, "--extrapolation", "last"), *want)


# ---------------------------------------------------------------- bytes in, bytes out


def test_prompt_bytes_reach_a_byte_model_and_any_output_prints(byte_wd):
    """An argv byte that is not UTF-8 (0xff) is the byte the model sees; output bytes that are not
    UTF-8 print as \\xNN escapes, even on an ASCII-only stdout."""
    from asura.infer.generate import generate
    from asura.infer.sample import Sampling
    from asura.io.load import load

    flags = ["--depth", "2", "--max-new-tokens", "16", "--temperature", "1", "--seed", "5"]
    r = gen("--workdir", str(byte_wd), "--prompt", b"ab\xff", *flags, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr.decode()
    model = load(byte_wd).model
    ids = generate(model, [[0x61, 0x62, 0xFF]], 2, max_new_tokens=16, sampling=Sampling(1.0), seed=5).tokens[0]
    raw = bytes(ids)
    with pytest.raises(UnicodeDecodeError):  # precondition: this output is not valid UTF-8
        raw.decode("utf-8")
    assert r.stdout == (raw.decode("utf-8", "backslashreplace") + "\n").encode("ascii", "backslashreplace")


def test_text_tokenizers_refuse_bytes_that_are_not_text(json_wd):
    ok = ["--workdir", str(json_wd), "--depth", "2"]
    refused(gen(*ok, "--prompt", b"ab\xff"), "--prompt", "not valid UTF-8", "byte tokenizer")
    refused(gen(*ok, "--prompt", "ab", "--stop", b"\xff"), "--stop", "not valid UTF-8")


# ---------------------------------------------------------------- sampling flags


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--temperature", "inf", "--temperature must be finite and >= 0"),
        ("--temperature", "nan", "--temperature must be finite and >= 0"),
        ("--temperature", "-1", "--temperature must be finite and >= 0"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
        ("--top-p", "nan", "--top-p must be in (0, 1]"),
        ("--top-k", "-1", "--top-k must be >= 0"),
    ],
)
def test_sampling_flags_are_refused_before_loading(flag, value, needle):
    refused(gen("--workdir", MISSING, "--depth", "2", "--prompt", "x", flag, value), needle)


# ---------------------------------------------------------------- task questions


def plain(task: str, prompt: str) -> str:
    """A task prompt as a person writes it: the closing marker dropped, addition's padding undone."""
    body = prompt[:-1]
    if task == "addition":
        a, b = body.split("+")
        return f"{int(a)}+{int(b)}"
    return body


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_question_is_formatted_as_the_task_generator_formats_it(name):
    task = TASKS[name]()
    for difficulty in (1, 2, 3, 5):
        for i in range(20):
            ex = make_example(task, difficulty, seed=3, stream=0, index=i)
            assert task.format_question(plain(name, ex.prompt), difficulty) == ex.prompt
            assert task.format_question(ex.prompt, difficulty) == ex.prompt  # the closing marker may be typed


def test_questions_a_task_cannot_parse_are_refused_in_one_line():
    assert TASKS["addition"]().format_question("5+7", 2) == "05+07="  # the docstring's zero padding
    assert TASKS["addition"]().format_question("123+4", 2) == "123+004="  # longer operands widen both
    for name, bad in (("addition", "5x7"), ("addition", "-5+7"), ("parity", "1021"), ("reverse", "ab1"),
                      ("modular_arith", "3+45"), ("pointer_chase", "a=b;a?"), ("pointer_chase", "a=1;b?"),
                      ("parity", "")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            TASKS[name]().format_question(bad, 2)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "e.g." in msg, msg


def test_generate_question_uses_the_training_prompt(addition_wd, byte_wd):
    ok = ["--workdir", str(addition_wd), "--depth", "2", "--max-new-tokens", "3"]
    r = gen(*ok, "--question", "5+7")
    assert r.returncode == 0 and b"prompt '05+07='" in r.stderr, r.stderr
    assert gen(*ok, "--prompt", "05+07=").stdout == r.stdout
    refused(gen(*ok, "--question", "5x7"), "addition", "e.g.")
    refused(gen("--workdir", str(byte_wd), "--depth", "2", "--question", "5+7"), "--question", "--prompt")
    refused(gen("--workdir", MISSING, "--depth", "2", "--question", "5+7", "--prompt", "x"), "--question", "--prompt")
    # without --max-new-tokens: at most what fits in the trained context (seq_len 32 here; a fixed
    # default of 64 new tokens refused every question), stopping at the newline that ends an answer
    plain = gen("--workdir", str(addition_wd), "--depth", "2", "--question", "5+7")
    assert plain.returncode == 0, plain.stderr
    n_new = int(re.search(rb"(\d+) tokens in", plain.stderr)[1])
    assert n_new <= 32 - len("05+07=") and b"\n" not in plain.stdout.rstrip(b"\n"), plain


# ---------------------------------------------------------------- evaluate


def test_evaluate_checks_the_json_path_before_loading(tmp_path):
    refused(ev("--workdir", MISSING, "--json", str(tmp_path)), "--json", "is a directory")
    (tmp_path / "file").write_text("")
    refused(ev("--workdir", MISSING, "--json", str(tmp_path / "file" / "x.json")), "--json", "not a directory")
    refused(ev("--workdir", MISSING, "--json", str(tmp_path / "no" / "x.json")), "--json", "does not exist")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(ev("--workdir", MISSING, "--json", str(locked / "x.json")), "--json", "not writable")


def test_evaluate_shows_the_metrics_that_fit_the_data(addition_wd, tmp_path):
    """Tasks: ce and exact match (no bits per byte: only answer tokens are scored); byte-level
    text: ce, accuracy, bits per byte (exact match of a window of running text says nothing)."""
    import json
    import math

    from asura.config import with_overrides
    from asura.data import prepare
    from asura.io.load import load
    from asura.train.evaluate import SHOWN, shown_metrics

    shards = tmp_path / "pydoc"
    assert prepare.main(["--builtin", "pydoc", "--output", str(shards)]) == 0
    cfg = load(addition_wd).cfg
    text_cfg = with_overrides(cfg, {"data.source": "text", "data.path": str(shards)})
    for extra, c in (([], cfg), (["--data", str(shards)], text_cfg)):
        out_json = tmp_path / f"{c.data.source}.json"
        r = ev("--workdir", str(addition_wd), "--depths", "1,2", "--batches", "1", "--json", str(out_json), *extra)
        assert r.returncode == 0, r.stderr.decode()
        header = r.stdout.decode().splitlines()[1].split()
        names = shown_metrics(c)
        assert header == ["depth", *(SHOWN[m].label for m in names)]
        rows = json.loads(out_json.read_text())["depths"]
        for row in rows:
            assert ("bits_per_byte" in row) == ("bits_per_byte" in names)
            assert row["perplexity"] == pytest.approx(math.exp(row["ce"]))
            if "bits_per_byte" in row:
                assert row["bits_per_byte"] == pytest.approx(row["ce"] / math.log(2))
