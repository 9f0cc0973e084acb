"""Cloud Storage objects with generation preconditions: the compare-and-swap an object-store lock needs.

GCS gives every write of an object a new generation number; a request may carry
`ifGenerationMatch=G` and then succeeds only if the object's generation is still G (G = 0: only if
it does not exist), else fails with 412 Precondition Failed. That makes

    create_if_absent(path, data)      exactly one of several writers creates the object
    replace_if(path, data, gen)       a heartbeat or a takeover that loses to a concurrent one fails
    delete_if(path, gen)              a release that cannot delete someone else's lock

google-cloud-storage does the requests (credentials from the environment: application default
credentials, GOOGLE_APPLICATION_CREDENTIALS; with STORAGE_EMULATOR_HOST, anonymous against the
emulator). Every failure other than a lost precondition is a StorageError with one line.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from asura.storage.paths import StorageError, require_gcs


class Object(NamedTuple):
    data: bytes
    generation: int
    updated: float  # server-side time of the last write, seconds since the epoch


@functools.cache
def client():
    require_gcs()
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="asura-emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except Exception as e:  # google.auth.exceptions.DefaultCredentialsError, or a project lookup failure
        raise StorageError(
            f"no Google Cloud credentials ({type(e).__name__}): set GOOGLE_APPLICATION_CREDENTIALS or run "
            "`gcloud auth application-default login`"
        ) from None


def _blob(path):
    text = os.fspath(path)
    bucket, _, name = text.removeprefix("gs://").partition("/")
    return client().bucket(bucket).blob(name)


REACH_S = 20.0  # the up-front check gives up on an unreachable endpoint after this long (retries included)


def _fail(path, e: Exception) -> StorageError:
    from google.api_core import exceptions as gexc

    code = getattr(e, "code", None)
    if isinstance(e, gexc.RetryError):
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
        cause = str(getattr(e, "cause", "") or e).splitlines()[0][:120]
        why = f"cannot reach Cloud Storage at {endpoint} (gave up after {REACH_S:.0f}s: {cause})"
    elif isinstance(e, gexc.Forbidden):
        why = "permission denied (403): the credentials may not read or write this bucket"
    elif isinstance(e, gexc.NotFound):
        why = "bucket not found (404)"
    else:
        why = f"{type(e).__name__}{f' ({code})' if code else ''}: {str(e).splitlines()[0][:160]}"
    return StorageError(f"{os.fspath(path)}: {why}")


def _errors():
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as aexc

    return gexc.GoogleAPIError, aexc.GoogleAuthError, OSError


def create_if_absent(path, data: bytes) -> int | None:
    """Create the object; its generation, or None when it already exists."""
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        blob.upload_from_string(data, if_generation_match=0)
    except gexc.PreconditionFailed:
        return None
    except _errors() as e:
        raise _fail(path, e) from None
    return int(blob.generation)


def read(path) -> Object | None:
    """The object's bytes, generation and update time; None when it does not exist."""
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        blob.reload()
        generation, updated = int(blob.generation), blob.updated.timestamp()
        data = blob.download_as_bytes(if_generation_match=generation)
    except gexc.NotFound:
        if not blob.bucket.exists():
            raise _fail(path, gexc.NotFound("bucket")) from None
        return None
    except gexc.PreconditionFailed:  # rewritten between the two requests: read again
        return read(path)
    except _errors() as e:
        raise _fail(path, e) from None
    return Object(data, generation, updated)


def replace_if(path, data: bytes, generation: int) -> int | None:
    """Overwrite the object if it is still at `generation`; the new generation, or None if it changed."""
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        blob.upload_from_string(data, if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        return None
    except _errors() as e:
        raise _fail(path, e) from None
    return int(blob.generation)


def delete_if(path, generation: int) -> bool:
    """Delete the object if it is still at `generation`; False if it changed or is gone."""
    from google.api_core import exceptions as gexc

    try:
        _blob(path).delete(if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        return False
    except _errors() as e:
        raise _fail(path, e) from None
    return True


def check_readable(path) -> None:
    """StorageError (one line) when the bucket does not exist, may not be listed or cannot be reached.
    Lists one object under the prefix (storage.objects.list, which object readers have; bucket
    metadata needs storage.buckets.get, which many object-level roles lack). Writing is checked by
    the first write, the workdir lock, which comes before any compilation."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket, _, prefix = os.fspath(path).removeprefix("gs://").partition("/")
    retry = (
        DEFAULT_RETRY.with_timeout(REACH_S)
        if hasattr(DEFAULT_RETRY, "with_timeout")
        else DEFAULT_RETRY.with_deadline(REACH_S)
    )
    try:
        for _ in client().list_blobs(bucket, prefix=prefix, max_results=1, retry=retry, timeout=REACH_S / 2):
            break
    except _errors() as e:
        raise _fail(path, e) from None
