"""Is a checkpoint step corrupt, or just different? The distinction decides what resume may do.

* Corrupt (a flipped bit, a truncated or unreadable file): the step is moved aside and the
  previous one is tried. Detected by a CRC32 per file, written next to the step once its
  save has committed (`write_checksums`) and checked before restoring (`verify`).
* Different (the code now builds another parameter tree, shape or dtype): nothing is
  moved; resume stops with one line naming the first differing leaf (`first_tree_difference`).
  Moving good checkpoints aside on a code change would silently restart training from 0.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import numpy as np

CHECKSUMS = "asura_checksums.json"
_CHUNK = 1 << 22


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """CRC32 and size of every file of a committed step (temp + rename, so never half-written)."""
    sums = {str(p.relative_to(step_dir)): [_crc(p), p.stat().st_size] for p in _files(step_dir)}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums, sort_keys=True))
    tmp.replace(step_dir / CHECKSUMS)


def verify(step_dir: Path) -> str | None:
    """None when the step is intact (or predates checksums); else one line saying what is wrong."""
    try:
        manifest = step_dir / CHECKSUMS
        if not manifest.exists():
            _files(step_dir)  # still catches a directory we cannot read
            return None
        sums = json.loads(manifest.read_text())
        for rel, (crc, size) in sums.items():
            p = step_dir / rel
            if not p.is_file():
                return f"file {rel} is missing"
            if p.stat().st_size != size or _crc(p) != crc:
                return f"file {rel} does not match its checksum"
    except PermissionError as e:
        return f"permission denied: {e.filename or step_dir}"
    except (OSError, ValueError) as e:  # unreadable file or a torn/garbled checksum manifest
        return f"{type(e).__name__}: {e}"
    return None


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def first_tree_difference(saved_tree, abstract) -> str | None:
    """The first leaf whose presence, shape or dtype differs between a saved tree's metadata
    (orbax ArrayMetadata leaves) and the restore target (ShapeDtypeStructs); None if they agree."""
    want = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            return f"{key} is new in this code (not in the checkpoint)"
        if key not in want:
            return f"{key} is in the checkpoint but not in this code"
        w, h = want[key], have[key]
        h_shape, h_dtype = tuple(getattr(h, "shape", ()) or ()), getattr(h, "dtype", None)
        if tuple(w.shape) != h_shape:
            return f"{key} has shape {h_shape} in the checkpoint but {tuple(w.shape)} in this code"
        if h_dtype is not None and np.dtype(h_dtype) != np.dtype(w.dtype):
            return f"{key} has dtype {np.dtype(h_dtype)} in the checkpoint but {np.dtype(w.dtype)} in this code"
    return None
