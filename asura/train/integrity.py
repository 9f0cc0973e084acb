"""Is a checkpoint step corrupt, or just different? The distinction decides what resume may do.

* Corrupt (a flipped bit, a truncated or unreadable file): the step is moved aside and the
  previous one is tried. Detected two ways:
  - what was saved, committed WITH the step: the step's `meta` item carries a fingerprint of
    every state leaf (`fingerprints`, computed on device from the arrays being saved), a
    SHA-256 of the data-iterator state and a SHA-256 of meta itself (`seal` / `check_seal`).
    A restore recomputes them from what it read, so a step is verified even when a kill
    came before its file checksums were written.
  - the files: a CRC32 per file (`write_checksums`), written as soon as the async save has
    committed (and filled in by the first verified resume when a kill came first), checked
    before restoring (`verify`): a damaged file is caught before any array is read.
* Different (the code now builds another parameter tree, shape or dtype): nothing is
  moved; resume stops with one line naming the first differing leaf (`first_tree_difference`).
  Moving good checkpoints aside on a code change would silently restart training from 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asura.storage.paths import files_under, is_remote, to_path, write_whole

CHECKSUMS = "asura_checksums.json"
_CHUNK = 1 << 22


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(step_dir) -> list:
    return [p for p in files_under(step_dir) if p.name != CHECKSUMS]


def write_checksums(step_dir) -> None:
    """CRC32 and size of every file of a committed local step (written whole, so never half-written).
    Not on gs://: computing them would download the step again, and the seal verifies it anyway."""
    step_dir = Path(os.fspath(step_dir))
    sums = {
        str(p.relative_to(step_dir)): [_crc(p), p.stat().st_size] for p in map(Path, map(os.fspath, _files(step_dir)))
    }
    write_whole(to_path(step_dir) / CHECKSUMS, json.dumps(sums, sort_keys=True))


def verify(step_dir) -> str | None:
    """None when the step is intact (or predates checksums, or lives on gs://, where the seal and the
    object store's own checksums cover it); else one line saying what is wrong."""
    if is_remote(step_dir):
        return None
    step_dir = Path(os.fspath(step_dir))
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


# ---------------------------------------------------------------- what was saved


class CorruptStep(ValueError):
    """What a step holds is not what was saved (fingerprint or digest mismatch); one line."""


SEAL = "asura_seal"  # meta key holding the fingerprints and digests of a step


def _words(x: jax.Array) -> jax.Array:
    """The bits of any leaf as uint32 words (same shape; 64-bit leaves get a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = np.dtype(x.dtype).itemsize * 8
    if bits == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if bits in (8, 16):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: [..., 2] words


def _fingerprint(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of a leaf's words, mod 2^32: [2] uint32.

    Any single changed word changes the first sum (its weight 2i+1 is odd, so no change of a
    word is 0 mod 2^32); the second, with multiplicative-hash weights, catches what cancels in
    the first. Sums are exact in modular arithmetic, so the result does not depend on the
    sharding or the reduction order; the index comes from iotas, so nothing is reshaped (a
    reshape of a sharded array could move data between devices)."""
    w = _words(x)
    i = jnp.zeros(w.shape, jnp.uint32)
    for d in range(w.ndim):
        stride = int(np.prod(w.shape[d + 1 :], dtype=np.int64)) & 0xFFFFFFFF
        i = i + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
    a = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum((w ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x01000193), dtype=jnp.uint32)
    return jnp.stack([a, b])


_fingerprints = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(tree) -> dict[str, list[int]]:
    """{leaf path: [two uint32]} of a state pytree, computed where the arrays live."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    outs = _fingerprints([x for _, x in paths_leaves])
    # every process holds the (replicated) result; read this process's copy
    host = [np.asarray(o.addressable_data(0)) for o in outs]
    return {_path_str(p): [int(v) for v in h] for (p, _), h in zip(paths_leaves, host, strict=True)}


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _meta_digest(meta: dict, sealed: dict) -> str:
    """Digest of meta with its seal, minus the digest itself."""
    return _sha256(
        {**{k: v for k, v in meta.items() if k != SEAL}, SEAL: {k: v for k, v in sealed.items() if k != "meta_sha256"}}
    )


def seal(meta: dict, state, data_state: Any) -> dict:
    """meta with SEAL added: the state's fingerprints and the digests of the data state and of meta.
    `data_state` is the JSON form that is saved (what a restore reads back)."""
    sealed = {"state": fingerprints(state), "data_sha256": _sha256(data_state)}
    sealed["meta_sha256"] = _meta_digest(meta, sealed)
    return {**meta, SEAL: sealed}


def check_seal(meta: dict) -> None:
    """CorruptStep when meta was changed after it was sealed (a step without a seal predates it)."""
    sealed = meta.get(SEAL)
    if sealed is None:
        return
    if not isinstance(sealed, dict) or "meta_sha256" not in sealed:
        raise CorruptStep("its meta seal is damaged")
    if _meta_digest(meta, sealed) != sealed["meta_sha256"]:
        raise CorruptStep("its meta item does not match the digest saved with it")


def check_restored(meta: dict, state, data_state: Any) -> None:
    """CorruptStep naming the first leaf (or the data state) that differs from what was saved."""
    sealed = meta.get(SEAL)
    if sealed is None:
        return
    if _sha256(data_state) != sealed.get("data_sha256"):
        raise CorruptStep("its data-iterator state does not match the digest saved with it")
    want = sealed.get("state", {})
    have = fingerprints(state)
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise CorruptStep(f"state leaf {key} does not match the fingerprint saved with it")
