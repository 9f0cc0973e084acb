"""Run paths: a local directory or a gs:// prefix, through one type (etils.epath.Path, as orbax uses).

    to_path("runs/demo")                  a local path
    to_path("gs://bucket/runs/looped")    a Cloud Storage prefix (needs the `gcs` extra: gcsfs and
                                          google-cloud-storage; credentials from the environment:
                                          application default credentials or GOOGLE_APPLICATION_CREDENTIALS)

`pathlib.Path("gs://b/x")` collapses the `//` into a local directory `gs:/b/x`: run paths go through
`to_path` only (tests/test_storage_paths.py greps for the other kind). Other schemes (s3://, http://)
are refused in one line rather than taken for local names.

Object stores are not filesystems: there are no directories (a prefix exists when an object under
it does), no append, no atomic rename of a tree. What asura needs of them lives here and in
asura.storage.gcs: whole-object writes (`write_whole`, atomic on both), recursive listing
(`files_under`), moving a tree (`move_tree`: copy then delete on gs://).

The emulator: with STORAGE_EMULATOR_HOST set (Google's variable for its clients), gcsfs,
google-cloud-storage and (through TENSORSTORE_GCS_HTTP_URL, set here from it) tensorstore all talk to
it instead of storage.googleapis.com.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator

from etils import epath

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
GCS_EXTRA = "pip install 'asura[gcs]'"


class StorageError(ValueError):
    """A run path that cannot be used (unknown scheme, missing package, unreachable bucket); one line."""


def scheme(path: str | os.PathLike) -> str | None:
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def _configure_gcs() -> None:
    """Point tensorstore (orbax's array writer) at the emulator when Google's clients are."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (google, google.cloud) is missing
        return False


def require_gcs() -> None:
    """StorageError naming the extra when gs:// support is not installed."""
    missing = [pkg for pkg, mod in (("gcsfs", "gcsfs"), ("google-cloud-storage", "google.cloud.storage"))
               if not _installed(mod)]  # fmt: skip
    if missing:
        raise StorageError(f"gs:// paths need {' and '.join(missing)}: {GCS_EXTRA}")
    _configure_gcs()


def to_path(path: str | os.PathLike) -> epath.Path:
    """The one constructor for run paths (workdirs, checkpoints, data, outputs)."""
    text = os.fspath(path)
    s = scheme(text)
    if s is None:
        return epath.Path(text)
    if s != "gs":
        raise StorageError(f"{text}: the {s}:// scheme is not supported; use a local path or gs://bucket/prefix")
    if not re.match(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/|$)", text):
        raise StorageError(f"{text}: not a gs://bucket/prefix path (bucket names are lowercase, digits, . _ -)")
    require_gcs()
    return epath.Path(text.rstrip("/"))


def bucket_of(path: epath.Path) -> str:
    return os.fspath(path).split("/")[2]


def write_whole(path: epath.Path, data: bytes | str) -> None:
    """Write a file whole, so that a kill mid-write never leaves it torn: temp + rename locally; one
    upload on gs:// (an object appears only when its upload completes)."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(os.fspath(tmp), os.fspath(path))


def files_under(root: epath.Path) -> Iterator[epath.Path]:
    """Every file below root, recursively, sorted. On gs:// one paginated listing of the prefix
    (epath's rglob refuses gs://, and its walk drops the scheme from what it yields)."""
    if not is_remote(root):
        for dirpath, _dirs, files in os.walk(os.fspath(root)):
            for name in sorted(files):
                yield epath.Path(dirpath) / name
        return
    import fsspec

    for key in sorted(fsspec.filesystem("gs").find(os.fspath(root).removeprefix("gs://"))):
        yield epath.Path(f"gs://{key}")


def move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Move a directory tree: a rename locally; copy then delete on gs:// (no atomic rename there)."""
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    for f in list(files_under(src)):
        target = dst / os.fspath(f)[len(os.fspath(src)) + 1 :]
        target.write_bytes(f.read_bytes())
    src.rmtree()
