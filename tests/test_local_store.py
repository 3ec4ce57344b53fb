"""The local backend under deletion, GC, crashes and a full disk, in real server processes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mmstore_client.digest import compute_digest, digest_hex
from mmstore_client.rollouts import RolloutDoc, RolloutTurn
from support import VENV_BIN, image_bytes, noise_png, store_process


def put(server, run: str, data: bytes) -> httpx.Response:
    return httpx.put(f"{server.url}/v1/runs/{run}/blobs/{compute_digest(data)}", content=data, timeout=60)


def indexed(root, digest: str) -> bool:
    with sqlite3.connect(root / "index.sqlite3") as db:
        return db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone() is not None


def test_head_and_if_none_match_answer_404_once_gc_collected_the_blob(store):
    data = image_bytes(20, 20, seed=900)
    digest = compute_digest(data)
    url = f"{store.url}/v1/blobs/{digest}"
    assert put(store, "cached-then-collected", data).status_code == 201
    assert httpx.get(url).content == data  # the worker now caches the blob's info
    assert httpx.head(url).status_code == 200
    assert httpx.get(url, headers={"if-none-match": f'"{digest}"'}).status_code == 304
    assert httpx.delete(f"{store.url}/v1/runs/cached-then-collected").status_code == 200
    assert httpx.post(f"{store.url}/v1/gc", json={"grace_seconds": 0}).json()["deleted"] >= 1
    assert httpx.head(url).status_code == 404
    r = httpx.get(url, headers={"if-none-match": f'"{digest}"'})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(url).status_code == 404


def test_blobs_link_refuses_a_rollout_document_and_links_nothing(store):
    image = image_bytes(24, 24, seed=901)
    assert put(store, "link-src", image).status_code == 201
    doc = RolloutDoc(rollout_id="r1", turns=[RolloutTurn(prompt="hi", completion="ok", completion_tokens=1)])
    doc_digest, body = doc.encode()
    assert httpx.put(f"{store.url}/v1/runs/link-src/rollouts/{doc_digest}", content=body).status_code == 201
    r = httpx.post(
        f"{store.url}/v1/runs/link-images/blobs:link", json={"digests": [compute_digest(image), doc_digest]}
    )
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type" and r.json()["error"]["digest"] == doc_digest
    assert httpx.get(f"{store.url}/v1/runs/link-images").status_code == 404  # nothing linked
    r = httpx.post(f"{store.url}/v1/runs/link-images/blobs:link", json={"digests": [compute_digest(image)]})
    assert r.status_code == 200 and [b["digest"] for b in r.json()["linked"]] == [compute_digest(image)]


_KILLED_BETWEEN_PLACE_AND_COMMIT = """
import os, signal, sys
from pathlib import Path
from mmstore.storage.local import LocalStorage
from mmstore_client import decode
from mmstore_client.digest import compute_digest
from mmstore_client.models import BlobInfo

storage = LocalStorage(Path(sys.argv[1]))
def crash(path):  # the first thing put does once the blob's file is in blobs/: die right here
    os.kill(os.getpid(), signal.SIGKILL)
storage._fsync_dir = crash
data = Path(sys.argv[2]).read_bytes()
digest = compute_digest(data)
storage.put("r", digest, data, BlobInfo.of(digest, len(data), decode.probe(data)))
"""


def kill_between_place_and_commit(root, data: bytes) -> None:
    """A real process SIGKILLed right after the blob's file went into blobs/, before the index
    commit (the crash point is chosen by replacing the directory fsync that follows the link)."""
    src = root.parent / "upload.png"
    src.write_bytes(data)
    r = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_PLACE_AND_COMMIT, str(root), str(src)])
    assert r.returncode == -9


def test_upload_killed_before_its_index_commit_leaves_an_orphan_that_restart_removes(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    data = image_bytes(33, 33, seed=902)
    digest = compute_digest(data)
    kill_between_place_and_commit(root, data)
    orphan = root / "blobs" / digest_hex(digest)[:2] / digest_hex(digest)[2:4] / digest_hex(digest)
    assert orphan.exists() and not indexed(root, digest)

    server = store_process(root).start()
    try:
        assert not orphan.exists() and list((root / "tmp").iterdir()) == []
        assert not (root / "blobs" / digest_hex(digest)[:2]).exists()  # its fan-out folders too
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").status_code == 404
        assert put(server, "r", data).status_code == 201
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").content == data
    finally:
        server.stop()


_KILLED_IN_GC_BEFORE_COMMIT = """
import os, signal, sys
from pathlib import Path
from mmstore.storage import local

storage = local.LocalStorage(Path(sys.argv[1]))
def crash(src, dst):  # GC moved the blob's file into trash/, its batch has not committed: die here
    os.replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
local.os.rename = crash
storage.gc(0)
"""


def test_gc_killed_before_its_commit_leaves_no_file_and_the_next_gc_finishes(tmp_path):
    """A GC batch moves its files into trash/ under the lock and unlinks them after the commit: a
    kill in between leaves the garbage row without its file, which the next start's trash emptying,
    the next GC and a re-upload all handle."""
    root = tmp_path / "data"
    server = store_process(root).start()
    kept, doomed = image_bytes(34, 34, seed=905), image_bytes(35, 35, seed=906)
    try:
        assert put(server, "keep", kept).status_code == 201
        assert put(server, "doomed", doomed).status_code == 201
        assert httpx.delete(f"{server.url}/v1/runs/doomed").status_code == 200
    finally:
        server.stop()
    r = subprocess.run([sys.executable, "-c", _KILLED_IN_GC_BEFORE_COMMIT, str(root)])
    assert r.returncode == -9
    digest = compute_digest(doomed)
    assert indexed(root, digest) and [p.name for p in (root / "trash").iterdir()] == [digest_hex(digest)]

    server = store_process(root).start()
    try:
        assert list((root / "trash").iterdir()) == []
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").status_code == 404
        assert httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0}).json()["deleted"] == 1
        assert not indexed(root, digest)
        assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(kept)}").content == kept
        assert put(server, "again", doomed).status_code == 201
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").content == doomed
    finally:
        server.stop()


def test_fsck_reports_orphans_and_repair_removes_them(tmp_path):
    root = tmp_path / "data"
    server = store_process(root).start()
    kept = image_bytes(30, 30, seed=903)
    assert put(server, "r", kept).status_code == 201
    server.stop()
    data = image_bytes(31, 31, seed=904)
    kill_between_place_and_commit(root, data)
    for f in (root / "tmp").iterdir():  # no trace of the upload: as a rename-based upload left it
        f.unlink()
    fsck = [str(VENV_BIN / "mmstore"), "fsck", "--root", str(root)]
    r = subprocess.run(fsck, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "1 orphans" in r.stderr and f"orphan: {compute_digest(data)}" in r.stderr
    r = subprocess.run([*fsck, "--repair"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"orphan (removed): {compute_digest(data)}" in r.stderr
    r = subprocess.run(fsck, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "checked 1 blobs: 0 corrupt, 0 missing, 0 orphans" in r.stderr
    assert [p.name for p in (root / "blobs").rglob("*") if p.is_file()] == [digest_hex(compute_digest(kept))]


def test_batched_delete_and_gc_keep_every_blob_uploaded_meanwhile(tmp_path):
    """Run deletion and GC in batches of 7 (the lock released between them) while two workers take
    uploads: new blobs, and the very blobs being collected re-uploaded into another run. Every blob
    an upload was acknowledged for stays readable; only the deleted run's blobs go, and the fan-out
    folders they leave empty with them."""
    root = tmp_path / "data"
    server = store_process(root, workers="2", gc_batch_size="7").start()
    try:
        doomed = [image_bytes(16, 16, seed=1000 + i) for i in range(120)]
        shared = doomed[:10]
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda d: put(server, "doomed", d).status_code, doomed)) == {201}
            assert set(pool.map(lambda d: put(server, "keeper", d).status_code, shared)) == {200}
        fresh = [image_bytes(17, 17, seed=2000 + i) for i in range(60)]
        revived = doomed[60:90]
        acknowledged: dict[str, bytes] = {}
        stop = threading.Event()

        def upload(run: str, images: list[bytes]) -> None:
            for data in images:
                r = put(server, run, data)
                assert r.status_code in (200, 201), r.text
                acknowledged[compute_digest(data)] = data
            stop.set()

        uploaders = [
            threading.Thread(target=upload, args=("fresh", fresh)),
            threading.Thread(target=upload, args=("revived", revived)),
        ]
        for t in uploaders:
            t.start()
        r = httpx.delete(f"{server.url}/v1/runs/doomed", timeout=60)
        assert r.status_code == 200 and r.json()["unlinked"] == 120
        collected = 0
        while not stop.is_set() or collected == 0:
            collected += httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0}, timeout=60).json()[
                "deleted"
            ]
        for t in uploaders:
            t.join()
        collected += httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0}, timeout=60).json()[
            "deleted"
        ]

        for digest, data in acknowledged.items():
            assert httpx.get(f"{server.url}/v1/blobs/{digest}").content == data
        for data in shared:
            assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(data)}").content == data
        gone = [d for d in doomed[10:] if compute_digest(d) not in acknowledged]
        assert collected >= len(gone)
        for data in gone:
            assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(data)}").status_code == 404
        assert httpx.get(f"{server.url}/v1/runs/doomed").status_code == 404
        runs = {r["run"]: r["blob_count"] for r in httpx.get(f"{server.url}/v1/runs").json()["runs"]}
        assert runs == {"keeper": 10, "fresh": 60, "revived": 30}
        files = {p.name for p in (root / "blobs").rglob("*") if p.is_file()}
        assert files == {digest_hex(compute_digest(d)) for d in [*shared, *fresh, *revived]}
        assert [d for d in (root / "blobs").rglob("*") if d.is_dir() and not any(d.iterdir())] == []
    finally:
        server.stop()


@pytest.fixture
def small_volume(tmp_path):
    """An 8 MB tmpfs (needs root: mount), unmounted afterwards."""
    vol = tmp_path / "vol"
    vol.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(vol)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield vol
    subprocess.run(["umount", "-l", str(vol)], check=False)


def test_full_volume_answers_507_and_delete_then_gc_free_it(small_volume):
    root = small_volume / "data"
    server = store_process(root, min_free_bytes=str(2 << 20)).start()
    try:
        stored, refused = 0, None
        for i in range(40):
            r = put(server, "filler", noise_png(400_000, seed=i))
            if r.status_code != 201:
                refused = r
                break
            stored += 1
        assert refused is not None and refused.status_code == 507, "the volume never filled"
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "insufficient_storage"
        assert list((root / "tmp").iterdir()) == []
        assert len([p for p in (root / "blobs").rglob("*") if p.is_file()]) == stored
        r = httpx.delete(f"{server.url}/v1/runs/filler")
        assert r.status_code == 200 and r.json()["unlinked"] == stored
        r = httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0})
        assert r.status_code == 200 and r.json()["deleted"] == stored
        assert put(server, "after", noise_png(400_000, seed=99)).status_code == 201
    finally:
        server.stop()


def test_write_that_runs_out_of_space_answers_507_and_leaves_no_temp_file(small_volume):
    """No reserve: the upload's own write meets ENOSPC."""
    root = small_volume / "data"
    server = store_process(root, min_free_bytes="0").start()
    try:
        assert put(server, "r", image_bytes(20, 20, seed=905)).status_code == 201
        with open(small_volume / "filler", "wb") as f:  # the rest of the volume, but ~100 KB
            free = os.statvfs(small_volume).f_bavail * os.statvfs(small_volume).f_frsize
            f.write(b"\0" * max(0, free - 100_000))
        r = put(server, "r", noise_png(400_000, seed=906))
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
        assert list((root / "tmp").iterdir()) == []
        (small_volume / "filler").unlink()
        assert put(server, "r", noise_png(400_000, seed=906)).status_code == 201
    finally:
        server.stop()


def test_delete_and_gc_free_a_volume_that_something_else_filled(small_volume):
    """The volume filled to the last byte by another writer: the store gives up its reserve file
    for the deletion and GC, and makes it again once GC freed space."""
    root = small_volume / "data"
    server = store_process(root, min_free_bytes=str(1 << 20)).start()
    try:
        images = [noise_png(400_000, seed=910 + i) for i in range(4)]
        assert {put(server, "r", data).status_code for data in images} == {201}
        assert (root / "reserve").stat().st_size == 1 << 20
        with open(small_volume / "filler", "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 512)
        r = put(server, "r", noise_png(400_000, seed=920))
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
        r = httpx.delete(f"{server.url}/v1/runs/r")
        assert r.status_code == 200, r.text
        assert r.json()["unlinked"] == 4
        r = httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0})
        assert r.status_code == 200 and r.json()["deleted"] == 4, r.text
        assert (root / "reserve").exists()  # made again from the freed space
        assert put(server, "r", image_bytes(20, 20, seed=921)).status_code == 201
    finally:
        server.stop()


# The index tables as stores made before session 5 have them: rows in upload (rowid) order.
_ROWID_TABLES = {
    "blobs": "(digest TEXT PRIMARY KEY, size INTEGER NOT NULL, mime TEXT NOT NULL, format TEXT NOT NULL, "
    "width INTEGER NOT NULL, height INTEGER NOT NULL, created_at REAL NOT NULL, "
    "refcount INTEGER NOT NULL DEFAULT 0, orphaned_at REAL)",
    "links": "(run TEXT NOT NULL, digest TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (run, digest))",
}


def test_a_store_with_rowid_index_tables_is_clustered_at_start_and_keeps_everything(tmp_path):
    """blobs and links are clustered by key (WITHOUT ROWID) so GC and deletion batches touch few
    pages; a store whose tables predate that is rewritten at start, every row kept: its blobs
    read back, its runs list them, and deletion and GC still work on them."""
    root = tmp_path / "data"
    images = [image_bytes(20 + i, 20, seed=950 + i) for i in range(6)]
    server = store_process(root).start()
    try:
        for i, data in enumerate(images):
            assert put(server, f"run-{i % 2}", data).status_code == 201
    finally:
        server.stop()
    db = sqlite3.connect(root / "index.sqlite3")
    for name, ddl in _ROWID_TABLES.items():  # back to the old layout, rows and all
        db.execute(f"CREATE TABLE {name}_old {ddl}")
        db.execute(f"INSERT INTO {name}_old SELECT * FROM {name}")
        db.execute(f"DROP TABLE {name}")
        db.execute(f"ALTER TABLE {name}_old RENAME TO {name}")
    db.commit()
    db.close()

    def schema(name: str) -> str:
        with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db:
            return db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]

    assert all("WITHOUT ROWID" not in schema(name) for name in _ROWID_TABLES)
    server = store_process(root).start()
    try:
        assert all("WITHOUT ROWID" in schema(name) for name in _ROWID_TABLES)
        assert schema("blobs_orphaned") is not None  # the partial index, rebuilt with its table
        for data in images:
            assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(data)}").content == data
        runs = {r["run"]: r["blob_count"] for r in httpx.get(f"{server.url}/v1/runs").json()["runs"]}
        assert runs == {"run-0": 3, "run-1": 3}
        assert httpx.delete(f"{server.url}/v1/runs/run-0").json()["unlinked"] == 3
        assert httpx.post(f"{server.url}/v1/gc", json={"grace_seconds": 0}).json()["deleted"] == 3
        for i, data in enumerate(images):
            expected = 404 if i % 2 == 0 else 200
            assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(data)}").status_code == expected
    finally:
        server.stop()
