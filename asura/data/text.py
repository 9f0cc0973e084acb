"""Reading prepared token shards (written by ``python -m asura.data.prepare``).

A prepared directory holds ``train-*.array_record`` and ``eval-*.array_record``
(one record per document: little-endian int32 token ids) and ``metadata.json``
with the tokenizer, its vocab size and per-shard statistics. ``data.path`` may
be that directory (meaning its train shards) or a glob of shard files.

On gs:// (``data.path=gs://bucket/data/pydoc``) the directory is copied to a local cache first
(`stage`): the ArrayRecord reader reads local files only. Files already there with the same size
are not copied again, so a resumed run costs one listing. The cache is ``$ASURA_DATA_CACHE``, else
``~/.cache/asura/data``; every host keeps its own copy. For datasets too large to copy, mount the
bucket (gcsfuse, as MaxText does) and give the mounted path.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np

METADATA = "metadata.json"
FORMAT = "asura-tokens-v1"
TOKEN_DTYPE = np.dtype("<i4")


@dataclass(frozen=True)
class Shards:
    paths: tuple[str, ...]
    tokenizer: str
    vocab_size: int
    documents: int
    tokens: int
    max_doc_tokens: int
    shard_documents: tuple[int, ...]  # per path, as metadata.json lists them


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=TOKEN_DTYPE).astype(np.int32)


_META_KEYS = ("tokenizer", "vocab_size", "shards")


def _read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise ValueError(f"no {METADATA} next to the shards in {directory!r}; write them with asura.data.prepare")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text, so not asura.data.prepare metadata; re-run asura.data.prepare") from None
    except json.JSONDecodeError as e:  # its message names no file
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); re-run asura.data.prepare") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{path} has format {fmt!r}, expected {FORMAT!r}; re-run asura.data.prepare")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; re-run asura.data.prepare")
    return meta


def _cache_root() -> str:
    if os.environ.get("ASURA_DATA_CACHE"):
        return os.environ["ASURA_DATA_CACHE"]
    try:
        return os.path.join(os.path.expanduser("~"), ".cache", "asura", "data")
    except (KeyError, RuntimeError):  # no home directory
        import tempfile

        return os.path.join(tempfile.gettempdir(), "asura-data")


def stage(path: str) -> str:
    """The local path that stands for a gs:// data.path: its directory copied into the cache."""
    import hashlib
    import shutil

    from asura.storage.paths import StorageError, files_under, to_path

    has_glob = any(c in path for c in "*?[")
    remote_dir = path.rsplit("/", 1)[0] if has_glob else path.rstrip("/")
    local_dir = os.path.join(_cache_root(), hashlib.sha1(remote_dir.encode()).hexdigest()[:16])
    try:
        files = [f for f in files_under(to_path(remote_dir)) if f.parent == to_path(remote_dir)]
        if not files:
            raise ValueError(f"data.path {path!r} matches no files; expected shards from asura.data.prepare")
        os.makedirs(local_dir, exist_ok=True)
        for f in files:
            dst = os.path.join(local_dir, f.name)
            if os.path.exists(dst) and os.path.getsize(dst) == f.stat().length:
                continue
            tmp = f"{dst}.{os.getpid()}.tmp"
            with f.open("rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
            os.replace(tmp, dst)
    except (StorageError, OSError) as e:
        why = str(e).splitlines()[0][:160]
        raise ValueError(f"data.path {path!r} cannot be copied to {local_dir}: {why}") from None
    return os.path.join(local_dir, path.rsplit("/", 1)[1]) if has_glob else local_dir


def resolve_shards(path: str, split: str = "train") -> Shards:
    """Shard files for ``split`` plus merged metadata; raises one-line ValueErrors on bad paths."""
    if not path:
        raise ValueError("data.path is empty; point it at a directory or glob from `python -m asura.data.prepare`")
    from asura.storage.paths import is_remote

    if is_remote(path):
        path = stage(path)
    if os.path.isdir(path):
        pattern = os.path.join(path, f"{split}-*.array_record")
    elif split == "train":
        pattern = path
    else:  # eval shards live next to the train shards the glob names
        train_dirs = {os.path.dirname(p) for p in glob.glob(path)}
        if not train_dirs:
            raise ValueError(f"data.path {path!r} matches no files; expected shards from asura.data.prepare")
        pattern = os.path.join(sorted(train_dirs)[0], f"{split}-*.array_record")
    paths = sorted(glob.glob(pattern))
    if not paths and split == "eval":  # a one-line reason now beats a failure after the model compiled
        raise ValueError(
            f"data.path {path!r} has no eval split (nothing matches {pattern!r}); training evaluates on it, "
            "so re-run asura.data.prepare, which writes one"
        )
    if not paths:
        raise ValueError(f"data.path {path!r} matches no {split} shards (looked for {pattern!r})")
    metas = {d: _read_metadata(d) for d in sorted({os.path.dirname(p) for p in paths})}
    tokenizers = {m["tokenizer"] for m in metas.values()}
    if len(tokenizers) > 1:
        raise ValueError(f"data.path {path!r} mixes shards from different tokenizers: {sorted(tokenizers)}")
    stats = []
    for p in paths:
        shard_stats = metas[os.path.dirname(p)]["shards"].get(os.path.basename(p))
        if shard_stats is None:
            raise ValueError(f"shard {p!r} is not listed in its {METADATA}; re-run asura.data.prepare")
        if os.path.getsize(p) == 0 or shard_stats["documents"] == 0:
            raise ValueError(f"shard {p!r} is empty")
        stats.append(shard_stats)
    return Shards(
        paths=tuple(paths),
        tokenizer=tokenizers.pop(),
        vocab_size=max(int(m["vocab_size"]) for m in metas.values()),
        documents=sum(s["documents"] for s in stats),
        tokens=sum(s["tokens"] for s in stats),
        max_doc_tokens=max(s["max_doc_tokens"] for s in stats),
        shard_documents=tuple(s["documents"] for s in stats),
    )


def _reader_class():
    try:
        from array_record.python.array_record_module import ArrayRecordReader
    except ImportError:
        raise ImportError(
            "data.source=text needs the `array_record` package (it comes with grain: pip install grain)"
        ) from None
    return ArrayRecordReader


def probe_shards(shards: Shards, vocab_size: int) -> None:
    """Open every shard and read its first record: a file that is not what metadata.json says fails now, by name.

    Cost: one footer and one record per shard. Without it a corrupt shard surfaces as a Riegeli
    traceback from a grain thread, after the model has compiled.
    """
    reader_class = _reader_class()
    for path, documents in zip(shards.paths, shards.shard_documents):
        reader = reader_class(path, "readahead_buffer_size:0,max_parallelism:0")  # random access: read one record
        try:
            found = reader.num_records() if reader.ok() else documents  # not ok: read() below says why
            if found != documents:
                raise ValueError(
                    f"shard {path!r} holds {found} records but its {METADATA} lists {documents}; "
                    "re-run asura.data.prepare"
                )
            (record,) = reader.read([0])
        except RuntimeError as e:  # array_record's error for a file that is not ArrayRecord (or is truncated)
            detail = str(e).splitlines()[0].split(";")[0].split(" (")[0]  # the reason, without offsets and hashes
            raise ValueError(
                f"shard {path!r} is not a readable ArrayRecord file ({detail}); re-run asura.data.prepare"
            ) from None
        finally:
            if reader.ok():  # closing a failed reader raises its error again
                reader.close()
        ok = len(record) % TOKEN_DTYPE.itemsize == 0
        if ok and record:
            tokens_L = decode_record(record)
            ok = tokens_L.min() >= 0 and tokens_L.max() < vocab_size
        if not ok:
            raise ValueError(
                f"shard {path!r} holds records that are not {TOKEN_DTYPE.str} token ids in [0, {vocab_size}); "
                "re-run asura.data.prepare"
            )


def chunk(tokens_L: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Split a document into pieces of at most seq_len tokens (no overlap, no token lost)."""
    return [tokens_L[i : i + seq_len] for i in range(0, len(tokens_L), seq_len)]
