"""A Cloud Storage server on loopback for the tests: gcp-storage-emulator (the GCS JSON API in pure
Python), plus the two parts of the protocol it leaves out that asura and orbax rely on.

`python tests/gcs_emulator.py PORT` serves in memory on 127.0.0.1:PORT. Filled in here, as GCS
documents them:

* the `ifGenerationMatch` precondition (https://cloud.google.com/storage/docs/request-preconditions),
  which the emulator ignores (it would let two trainers create the same lock object, and breaks the
  conditional manifest writes of orbax's OCDBT format): uploads and deletes answer 412
  Precondition Failed unless the object's current generation equals the parameter, 0 meaning "does
  not exist"; the check and the write are one step, as on GCS;
* the `x-goog-generation` / `x-goog-metageneration` headers of a media download
  (https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration), which
  tensorstore reads to know which version it got ("Malformed StorageGeneration" without them).

Everything else (uploads, listing, downloads, what gcsfs, google-cloud-storage and tensorstore
send) is the emulator's own. One more bucket, FORBIDDEN, answers every object request with 403, as
GCS does for credentials without access to a bucket.

`start()` runs it in a subprocess and returns its URL once it answers; the `gcs` fixture in
conftest.py sets STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL for the test process and its
children and gives each test its own bucket prefix.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http import HTTPStatus
from pathlib import Path

BUCKET = "asura-test"
FORBIDDEN = "asura-forbidden"


def _patch_preconditions() -> None:
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    lock = threading.Lock()

    def current_generation(storage, bucket: str, name: str) -> int:
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return 0

    def guarded(handler, name_of):
        def wrapped(request, response, storage, *args, **kwargs):
            want = request.query.get("ifGenerationMatch")
            with lock:
                if want is not None:
                    name = name_of(request)
                    if name is not None and current_generation(storage, request.params["bucket_name"], name) != int(
                        want[0]
                    ):
                        response.status = HTTPStatus.PRECONDITION_FAILED
                        response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                        return None
                return handler(request, response, storage, *args, **kwargs)

        return wrapped

    def upload_name(request):
        if "name" in request.query:
            return request.query["name"][0]
        data = request.data
        if isinstance(data, dict):
            return (data.get("meta") or data).get("name")
        return None

    objects.insert = guarded(objects.insert, upload_name)
    objects.delete = guarded(objects.delete, lambda r: r.params.get("object_id"))

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:  # headers are buffered until the response is sent
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation

    def forbid(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            if request.params.get("bucket_name") == FORBIDDEN:
                response.status = HTTPStatus.FORBIDDEN
                response.json({"error": {"code": 403, "message": "caller does not have storage.objects access"}})
                return None
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    for name in ("insert", "ls", "get", "download", "delete", "upload_partial"):
        setattr(objects, name, forbid(getattr(objects, name)))


def serve(port: int) -> None:
    _patch_preconditions()
    from gcp_storage_emulator.server import create_server  # after the patch: it captures the handlers

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    from gcp_storage_emulator.handlers import buckets

    buckets.create_bucket(FORBIDDEN, server._storage)
    server.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log_path, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """The server in a subprocess, its log in `log_path` (a pipe would fill and stall it)."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited: {Path(log_path).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the GCS emulator did not answer on {url} in {timeout:.0f}s")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
