"""Tokenise text into ArrayRecord shards: ``python -m asura.data.prepare``.

One record per document (little-endian int32 token ids) in ``train-*.array_record`` and
``eval-*.array_record``; ``metadata.json`` records the tokenizer, vocab size, the eval split's
parameters and per-shard counts. Set ``data.path`` to the output directory.

The eval split (asura.data.eval_split) holds out about ``--eval-fraction`` of the tokens (default
5%) and at least ``--eval-min-tokens`` (default 2048), by whole documents where they fit; a long
document may give its tail to eval and its head to training. A corpus too small for both splits
is refused.

Sources (exactly one):
  --input GLOB [GLOB ...]   local files; a .jsonl file yields one document per line (--text-field),
                            any other file is one UTF-8 document
  --builtin pydoc           offline default corpus: Python's own help topics (pydoc_data.topics,
                            79 documents, ~0.5 MB of English prose and code)
  --hf-dataset NAME         a Hugging Face dataset, streamed (needs `datasets` and network/cache)

Example:  python -m asura.data.prepare --builtin pydoc --output data/pydoc   (or --output gs://bucket/data/pydoc)

Every bad input is answered with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from asura.data.eval_split import PIECE_TOKENS, EvalSplit
from asura.data.overlap import eval_overlap
from asura.data.text import FORMAT, METADATA, TOKEN_DTYPE
from asura.data.tokenizer import load_tokenizer
from asura.registry import Registry
from asura.storage.paths import is_remote

BUILTINS: Registry[Callable[[], Iterator[str]]] = Registry("--builtin", "offline corpora that ship with Python")


# ------------------------------------------------------------------ sources


def file_documents(patterns: list[str], text_field: str = "text") -> Iterator[str]:
    """Documents from files; globs are resolved now, so a pattern matching nothing fails before any work."""
    paths = []
    for pattern in patterns:
        matches = [p for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
        if not matches:
            raise ValueError(f"--input {pattern!r} matches no files")
        paths += matches
    return _read_files(paths, text_field)


def _read_files(paths: list[str], text_field: str) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                if not path.endswith(".jsonl"):
                    yield f.read()
                    continue
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(line, f"{path}:{line_no}", text_field)
        except UnicodeDecodeError as e:  # its message names no file
            raise ValueError(
                f"--input file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); pass text or .jsonl files"
            ) from None


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}); a .jsonl file holds one JSON object per line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object with a {text_field!r} field")
    if text_field not in row:
        raise ValueError(f"{where} has no field {text_field!r}; fields: {sorted(row)}")
    if not isinstance(row[text_field], str):
        raise ValueError(f"{where} field {text_field!r} is a {type(row[text_field]).__name__}, not a string")
    return row[text_field]


@BUILTINS.register("pydoc")
def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def builtin_documents(name: str) -> Iterator[str]:
    return BUILTINS[name]()


def _load_hf(name: str, split: str, config: str | None):
    try:
        import datasets
    except ImportError:
        raise ValueError("--hf-dataset needs the `datasets` package (pip install datasets)") from None
    return datasets.load_dataset(name, config, split=split, streaming=True)


def hf_documents(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, loader: Callable | None = None
) -> Iterator[str]:
    """Stream a Hugging Face dataset's text field; ``loader(name, split, config)`` is injectable for tests."""
    rows = (loader or _load_hf)(name, split, config)
    for i, row in enumerate(rows):
        if text_field not in row:
            raise ValueError(f"--hf-text-field {text_field!r} not in row {i} of {name}; fields: {sorted(row)}")
        yield row[text_field]


# ------------------------------------------------------------------ writing


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    def __init__(self, output: str, split: str, docs_per_shard: int):
        self.output, self.split, self.docs_per_shard = output, split, docs_per_shard
        self.stats: dict[str, dict] = {}
        self._writer, self._name = None, None

    def write(self, ids_L: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.stats[self._name]["documents"] == self.docs_per_shard:
            self.close()
            self._name = f"{self.split}-{len(self.stats):05d}.array_record"
            self.stats[self._name] = {"documents": 0, "tokens": 0, "max_doc_tokens": 0}
            self._writer = ArrayRecordWriter(os.path.join(self.output, self._name), "group_size:1")
        self._writer.write(ids_L.astype(TOKEN_DTYPE).tobytes())
        s = self.stats[self._name]
        s["documents"] += 1
        s["tokens"] += len(ids_L)
        s["max_doc_tokens"] = max(s["max_doc_tokens"], len(ids_L))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def totals(self) -> dict[str, int]:
        return {k: sum(s[k] for s in self.stats.values()) for k in ("documents", "tokens")}

    def remove(self) -> None:
        self.close()
        for name in self.stats:
            path = os.path.join(self.output, name)
            if os.path.exists(path):
                os.remove(path)


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is an existing file; --output names a directory to write shards into")
    old = glob.glob(os.path.join(output, "*.array_record")) + glob.glob(os.path.join(output, METADATA))
    if old and not overwrite:
        raise ValueError(f"--output {output!r} already holds prepared shards; pass --overwrite to replace them")


def prepare(
    documents: Iterable[str],
    output: str,
    tokenizer: str = "byte",
    *,
    docs_per_shard: int = 10_000,
    eval_fraction: float = 0.05,
    eval_min_tokens: int = 2048,
    overwrite: bool = False,
    source: str = "",
) -> dict:
    """Tokenise documents into shards under ``output``; returns the metadata written to metadata.json.

    On any failure what this call wrote is removed, so ``output`` never holds a half corpus.
    """
    tok = load_tokenizer(tokenizer)
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard must be >= 1, got {docs_per_shard}")
    split = EvalSplit(eval_fraction, eval_min_tokens)
    _check_output(output, overwrite)
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    for path in glob.glob(os.path.join(output, "*.array_record")) + glob.glob(os.path.join(output, METADATA)):
        os.remove(path)
    writers = {s: _ShardWriter(output, s, docs_per_shard) for s in ("train", "eval")}
    done = False
    try:
        for texts in _batched(documents, 256):
            for ids in tok.encode_batch(texts):
                if ids:  # an empty document has nothing to learn from
                    part = split(np.asarray(ids, dtype=np.int64))
                    for name, ids_L in part._asdict().items():
                        if ids_L is not None:
                            writers[name].write(ids_L)
        for w in writers.values():
            w.close()
        train, evals = writers["train"].totals(), writers["eval"].totals()
        if split.seen == 0:
            raise ValueError(f"the source holds no non-empty documents; nothing was written to {output!r}")
        if train["tokens"] < evals["tokens"]:
            raise ValueError(
                f"the corpus has only {split.seen} tokens: too few to hold out --eval-min-tokens={eval_min_tokens} "
                "and train on more than that; add text or lower --eval-min-tokens"
            )
        meta = {
            "format": FORMAT,
            "source": source,
            "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size,
            "dtype": TOKEN_DTYPE.str,
            "train": train,
            "eval": evals,
            "eval_split": {
                "fraction": eval_fraction,
                "min_tokens": eval_min_tokens,
                "piece_tokens": PIECE_TOKENS,
                "cut_documents": split.cut_documents,
            },
            "shards": {**writers["train"].stats, **writers["eval"].stats},
            "eval_overlap": eval_overlap(output),
        }
        with open(os.path.join(output, METADATA), "w") as f:
            json.dump(meta, f, indent=1)
        done = True
    finally:
        if not done:
            for w in writers.values():
                w.remove()
            if os.path.exists(os.path.join(output, METADATA)):
                os.remove(os.path.join(output, METADATA))
            if created and not os.listdir(output):
                os.rmdir(output)
    return meta


# ------------------------------------------------------------------ CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its whole usage block and exit; one line is enough
        raise _UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="python -m asura.data.prepare", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", help="file globs (quote them)")
    src.add_argument("--builtin", help=f"one of: {', '.join(BUILTINS.names)}")
    src.add_argument("--hf-dataset")
    p.add_argument("--output", help="directory to write the shards into")
    p.add_argument("--tokenizer", default="byte", help="byte | path/to/tokenizer.json | tiktoken:<encoding>")
    p.add_argument("--text-field", default="text", help="field of .jsonl rows")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-text-field", default="text")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--docs-per-shard", type=int, default=10_000)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of tokens held out for eval")
    p.add_argument("--eval-min-tokens", type=int, default=2048, help="the eval split holds at least this many")
    p.add_argument("--overwrite", action="store_true")
    return p


def _parse(p: _Parser, argv: list[str]) -> argparse.Namespace:
    """Arguments, or a _UsageError whose message is one line naming what is wrong."""
    args, unknown = p.parse_known_args(argv)
    if unknown:
        flags = [o for a in p._actions for o in a.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; valid flags: {' '.join(flags)}"
        raise _UsageError(f"unknown argument {unknown[0]!r}{hint}")
    if not (args.input or args.builtin or args.hf_dataset):
        raise _UsageError("no source: pass one of --input GLOB..., --builtin NAME, --hf-dataset NAME")
    if not args.output:
        raise _UsageError("no --output DIR to write the shards into")
    return args


def prepare_remote(docs, output: str, tokenizer: str, **kw) -> dict:
    """`prepare` into a local temporary directory, then upload to gs:// (metadata.json last: until it
    is there, a reader refuses the directory instead of reading half a corpus)."""
    import tempfile

    from asura.storage.paths import StorageError, files_under, to_path, write_whole

    try:
        remote = to_path(output)
        held = [f.name for f in files_under(remote) if f.name.endswith(".array_record") or f.name == METADATA]
    except StorageError as e:
        raise ValueError(str(e)) from None
    if held and not kw.get("overwrite"):
        raise ValueError(f"--output {output!r} already holds prepared shards; pass --overwrite to replace them")
    with tempfile.TemporaryDirectory(prefix="asura-prepare-") as local:
        meta = prepare(docs, local, tokenizer, **kw)
        names = sorted(os.listdir(local), key=lambda n: n == METADATA)
        try:
            if held:  # --overwrite: the old corpus goes first, its metadata before its shards
                for name in sorted(held, key=lambda n: n != METADATA):
                    (remote / name).unlink()
            for name in names:
                with open(os.path.join(local, name), "rb") as f:
                    write_whole(remote / name, f.read())
        except StorageError as e:
            raise ValueError(str(e)) from None
    return meta


def main(argv: list[str] | None = None, *, hf_loader: Callable | None = None) -> int:
    p = _parser()
    try:
        args = _parse(p, sys.argv[1:] if argv is None else argv)
    except _UsageError as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
        return 2
    try:
        if args.input:
            docs, source = file_documents(args.input, args.text_field), f"files:{' '.join(args.input)}"
        elif args.builtin:
            docs, source = builtin_documents(args.builtin), f"builtin:{args.builtin}"
        else:
            docs = hf_documents(args.hf_dataset, args.hf_split, args.hf_text_field, args.hf_config, loader=hf_loader)
            source = f"hf:{args.hf_dataset}:{args.hf_split}"
        kw = dict(docs_per_shard=args.docs_per_shard, eval_fraction=args.eval_fraction,
                  eval_min_tokens=args.eval_min_tokens, overwrite=args.overwrite, source=source)  # fmt: skip
        if is_remote(args.output):
            meta = prepare_remote(docs, args.output, args.tokenizer, **kw)
        else:
            meta = prepare(docs, args.output, args.tokenizer, **kw)
    except (ValueError, OSError) as e:  # every input problem we name is a ValueError; OSError names its path
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    train, evals = meta["train"], meta["eval"]
    share = evals["tokens"] / (train["tokens"] + evals["tokens"])
    print(
        f"wrote {train['documents']} train / {evals['documents']} eval documents "
        f"({meta['eval_split']['cut_documents']} split into a train head and an eval tail), "
        f"{train['tokens']} train / {evals['tokens']} eval tokens ({share:.1%} held out), "
        f"{len(meta['shards'])} shards, vocab {meta['vocab_size']} ({meta['tokenizer']}) to {args.output}"
    )
    o = meta["eval_overlap"]
    print(
        f"eval overlap: {o['in_train']} of {o['eval_windows']} eval windows of {o['window']} tokens "
        f"({o['fraction']:.1%}) also occur in training documents (metadata.json: eval_overlap)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
