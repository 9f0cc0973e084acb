"""Run paths and object operations against the GCS protocol on loopback (tests/gcs_emulator.py)."""

from __future__ import annotations

import threading

import pytest

from asura.storage import gcs as objects
from asura.storage.paths import StorageError, files_under, move_tree, to_path, write_whole


def test_paths_refuse_what_they_cannot_serve():
    with pytest.raises(StorageError, match="s3:// scheme is not supported"):
        to_path("s3://bucket/run")
    with pytest.raises(StorageError, match="not a gs://bucket/prefix path"):
        to_path("gs://Bad_Bucket/run")
    assert str(to_path("runs/demo")) == "runs/demo"


def test_create_if_absent_is_won_by_exactly_one_of_many_writers(gcs):
    lock = f"{gcs}/.lock"
    results: list[int | None] = []

    def race(i: int) -> None:
        results.append(objects.create_if_absent(lock, f"writer {i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [g for g in results if g is not None]
    assert len(won) == 1
    obj = objects.read(lock)
    assert obj.generation == won[0] and obj.data.startswith(b"writer ")


def test_replace_and_delete_only_at_the_generation_seen(gcs):
    path = f"{gcs}/obj"
    g1 = objects.create_if_absent(path, b"a")
    g2 = objects.replace_if(path, b"b", g1)
    assert g2 is not None and g2 != g1
    assert objects.replace_if(path, b"c", g1) is None  # someone else wrote since g1
    assert not objects.delete_if(path, g1)
    assert objects.read(path).data == b"b"
    assert objects.delete_if(path, g2) and objects.read(path) is None
    assert objects.replace_if(path, b"d", g2) is None  # gone


def test_a_missing_bucket_is_one_line(gcs_server):
    with pytest.raises(StorageError, match=r"gs://no-such-bucket-x/run: bucket not found \(404\)"):
        objects.check_readable("gs://no-such-bucket-x/run")
    with pytest.raises(StorageError, match="bucket not found"):
        objects.read("gs://no-such-bucket-x/run/.lock")


def test_whole_writes_listing_and_moving_a_tree(gcs):
    root = to_path(gcs)
    write_whole(root / "a" / "config.yaml", "x: 1\n")
    write_whole(root / "a" / "b" / "c.bin", b"\0\1")
    assert sorted(str(p)[len(gcs) :] for p in files_under(root)) == ["/a/b/c.bin", "/a/config.yaml"]
    move_tree(root / "a", root / "moved")
    assert sorted(str(p)[len(gcs) :] for p in files_under(root)) == ["/moved/b/c.bin", "/moved/config.yaml"]
    assert (root / "moved" / "b" / "c.bin").read_bytes() == b"\0\1"


def test_an_unreachable_endpoint_is_one_line_in_bounded_time(gcs_server, monkeypatch):
    import time

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens on the discard port
    objects.client.cache_clear()
    try:
        t0 = time.time()
        with pytest.raises(StorageError, match=r"cannot reach Cloud Storage at http://127\.0\.0\.1:9"):
            objects.check_readable("gs://asura-test/run")
        assert time.time() - t0 < objects.REACH_S + 15  # retries are bounded, not the client's 120 s default
    finally:
        objects.client.cache_clear()  # the next test's client talks to the emulator again
