"""Tokenise text into ArrayRecord shards: ``python -m asura.data.prepare``.

One record per document (little-endian int32 token ids). Every ``--eval-every``-th
document (N-1, 2N-1, ...) goes to ``eval-*.array_record``, the rest to
``train-*.array_record``; ``metadata.json`` records the tokenizer, vocab size and
per-shard counts. Set ``data.path`` to the output directory.

Sources (exactly one):
  --input GLOB [GLOB ...]   local files; a .jsonl file yields one document per line (--text-field),
                            any other file is one UTF-8 document
  --builtin pydoc           offline default corpus: Python's own help topics (pydoc_data.topics,
                            79 documents, ~0.5 MB of English prose and code)
  --hf-dataset NAME         a Hugging Face dataset, streamed (needs `datasets` and network/cache)

Example:  python -m asura.data.prepare --builtin pydoc --output data/pydoc
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from asura.data.text import FORMAT, METADATA, TOKEN_DTYPE
from asura.data.tokenizer import load_tokenizer

BUILTINS = ("pydoc",)


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
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                yield f.read()
                continue
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ValueError(f"{path}:{line_no} has no field {text_field!r}; fields: {sorted(row)}")
                    yield row[text_field]


def builtin_documents(name: str) -> Iterator[str]:
    if name != "pydoc":
        raise ValueError(f"unknown --builtin {name!r}; valid: {', '.join(BUILTINS)}")
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


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
            self._writer = ArrayRecordWriter(os.path.join(self.output, self._name), "group_size:1")
            self.stats[self._name] = {"documents": 0, "tokens": 0, "max_doc_tokens": 0}
        self._writer.write(ids_L.astype(TOKEN_DTYPE).tobytes())
        s = self.stats[self._name]
        s["documents"] += 1
        s["tokens"] += len(ids_L)
        s["max_doc_tokens"] = max(s["max_doc_tokens"], len(ids_L))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def prepare(
    documents: Iterable[str],
    output: str,
    tokenizer: str = "byte",
    *,
    docs_per_shard: int = 10_000,
    eval_every: int = 50,
    overwrite: bool = False,
    source: str = "",
) -> dict:
    """Tokenise documents into shards under ``output``; returns the metadata written to metadata.json."""
    tok = load_tokenizer(tokenizer)
    if docs_per_shard < 1 or eval_every < 0:
        raise ValueError(f"--docs-per-shard must be >= 1 and --eval-every >= 0, got {docs_per_shard}, {eval_every}")
    os.makedirs(output, exist_ok=True)
    old = glob.glob(os.path.join(output, "*.array_record")) + glob.glob(os.path.join(output, METADATA))
    if old and not overwrite:
        raise ValueError(f"--output {output!r} already holds prepared shards; pass --overwrite to replace them")
    for path in old:
        os.remove(path)
    writers = {s: _ShardWriter(output, s, docs_per_shard) for s in ("train", "eval")}
    index = 0
    for texts in _batched(documents, 256):
        for ids in tok.encode_batch(texts):
            if ids:  # an empty document has nothing to learn from
                split = "eval" if eval_every and index % eval_every == eval_every - 1 else "train"
                writers[split].write(np.asarray(ids, dtype=np.int64))
                index += 1
    for w in writers.values():
        w.close()
    train = writers["train"].stats
    if not train:
        raise ValueError(f"no training documents were written to {output!r} (the source held {index} non-empty)")
    meta = {
        "format": FORMAT,
        "source": source,
        "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size,
        "dtype": TOKEN_DTYPE.str,
        "train": {k: sum(s[k] for s in train.values()) for k in ("documents", "tokens")},
        "eval": {k: sum(s[k] for s in writers["eval"].stats.values()) for k in ("documents", "tokens")},
        "shards": {**train, **writers["eval"].stats},
    }
    with open(os.path.join(output, METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv: list[str] | None = None, *, hf_loader: Callable | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asura.data.prepare", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="file globs (quote them)")
    src.add_argument("--builtin", choices=BUILTINS)
    src.add_argument("--hf-dataset")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", default="byte", help="byte | path/to/tokenizer.json | tiktoken:<encoding>")
    p.add_argument("--text-field", default="text", help="field of .jsonl rows")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-text-field", default="text")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--docs-per-shard", type=int, default=10_000)
    p.add_argument("--eval-every", type=int, default=50, help="every N-th document goes to eval; 0 = none")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.input:
            docs, source = file_documents(args.input, args.text_field), f"files:{' '.join(args.input)}"
        elif args.builtin:
            docs, source = builtin_documents(args.builtin), f"builtin:{args.builtin}"
        else:
            docs = hf_documents(args.hf_dataset, args.hf_split, args.hf_text_field, args.hf_config, loader=hf_loader)
            source = f"hf:{args.hf_dataset}:{args.hf_split}"
        meta = prepare(
            docs,
            args.output,
            args.tokenizer,
            docs_per_shard=args.docs_per_shard,
            eval_every=args.eval_every,
            overwrite=args.overwrite,
            source=source,
        )
    except (ValueError, OSError, UnicodeDecodeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['train']['documents']} train / {meta['eval']['documents']} eval documents, "
        f"{meta['train']['tokens']} train tokens, {len(meta['shards'])} shards, vocab {meta['vocab_size']} "
        f"({meta['tokenizer']}) to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
