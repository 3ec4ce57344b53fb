"""The S3 backend: replicas sharing one bucket, races between them, streaming, fsck, GC's protocol.

Against a real S3-compatible HTTP server (moto's server mode, see conftest's ``s3_server``); the
whole store API suite also runs on it (test_store_api.py, test_store_client.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import s3_store_process
from mmstore_client import StoreClient
from mmstore_client.digest import compute_digest, digest_hex
from mmstore_client.models import BlobInfo
from PIL import Image
from support import image_bytes, noise_png

MMSTORE = str(Path(sys.executable).parent / "mmstore")


def keys(s3_server, url: str, under: str) -> list[str]:
    """The object keys under ``<prefix>/<under>`` of a storage URL's bucket."""
    bucket, prefix = url[5:].split("/", 1)
    pages = (
        s3_server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=f"{prefix}/{under}")
    )
    return [o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def replicas(s3_server, tmp_path_factory):
    """Two mmstore processes on one bucket (the second serves blobs through the documented route),
    streaming every blob (redirects off: see the redirect test)."""
    url, log_dir = s3_server.bucket(), tmp_path_factory.mktemp("replicas")
    a = s3_store_process(s3_server, url, log_dir, redirect_min_bytes="off").start()
    b = s3_store_process(s3_server, url, log_dir, fast_blob_path="false", redirect_min_bytes="off").start()
    yield url, a, b
    a.stop()
    b.stop()


@pytest.fixture
def storage(s3_server):
    """The backend in this process, on a fresh bucket (to drive GC's protocol step by step)."""
    from mmstore.storage.s3 import S3Storage

    return S3Storage(s3_server.bucket(), config=s3_server.config)


def info_of(data: bytes) -> BlobInfo:
    from mmstore_client import decode

    return BlobInfo.of(compute_digest(data), len(data), decode.verify(data, max_pixels=10**8))


def test_a_blob_uploaded_through_one_replica_is_served_by_the_other(replicas):
    _, a, b = replicas
    data = image_bytes(33, 17, seed=1)
    digest = compute_digest(data)
    assert httpx.put(f"{a.url}/v1/runs/shared/blobs/{digest}", content=data).status_code == 201
    g = httpx.get(f"{b.url}/v1/blobs/{digest}")
    assert g.status_code == 200 and g.content == data and g.headers["etag"] == f'"{digest}"'
    assert httpx.head(f"{b.url}/v1/blobs/{digest}").headers["content-length"] == str(len(data))
    assert httpx.get(f"{b.url}/v1/blobs/{digest}/info").json()["width"] == 33
    assert httpx.get(f"{b.url}/v1/runs/shared").json()["blob_count"] == 1
    assert httpx.post(f"{b.url}/v1/blobs:missing", json={"digests": [digest]}).json() == {"missing": []}
    # linking through B without bytes, and a second upload through B, are both "existing"
    r = httpx.post(f"{b.url}/v1/runs/other/blobs:link", json={"digests": [digest]})
    assert [x["digest"] for x in r.json()["linked"]] == [digest]
    assert httpx.put(f"{b.url}/v1/runs/other/blobs/{digest}", content=data).status_code == 200
    runs = {r["run"]: r["blob_count"] for r in httpx.get(f"{a.url}/v1/runs").json()["runs"]}
    assert (runs["shared"], runs["other"]) == (1, 1)


def test_large_blob_streams_with_ranges(replicas):
    _, a, b = replicas
    big = noise_png(3_000_000, seed=2)
    digest = compute_digest(big)
    assert httpx.put(f"{a.url}/v1/runs/big/blobs/{digest}", content=big, timeout=60).status_code == 201
    for server in (a, b):  # the fast path and the documented route
        with httpx.stream("GET", f"{server.url}/v1/blobs/{digest}", timeout=60) as r:
            assert r.headers["content-length"] == str(len(big))
            chunks = list(r.iter_raw())
        assert b"".join(chunks) == big
        r = httpx.get(f"{server.url}/v1/blobs/{digest}", headers={"range": "bytes=1000000-1999999"})
        assert r.status_code == 206 and r.content == big[1_000_000:2_000_000]
        r = httpx.get(f"{server.url}/v1/blobs/{digest}", headers={"range": "bytes=-10"})
        assert r.status_code == 206 and r.content == big[-10:]
        assert httpx.head(f"{server.url}/v1/blobs/{digest}").content == b""


def test_concurrent_uploads_of_one_digest_through_both_end_as_one_object(s3_server, replicas):
    url, a, b = replicas
    data = noise_png(300_000, seed=3)
    digest = compute_digest(data)
    before = set(keys(s3_server, url, ""))
    barrier = threading.Barrier(16)

    def upload(i):
        server = (a, b)[i % 2]
        barrier.wait()
        r = httpx.put(f"{server.url}/v1/runs/run-{i % 4}/blobs/{digest}", content=data, timeout=60)
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(upload, range(16)))
    assert codes.count(201) == 1 and set(codes) == {200, 201}, codes
    hexd = digest_hex(digest)
    new = sorted(set(keys(s3_server, url, "")) - before)  # one blob, its guard, one link and ref per run
    assert [k for k in new if k.startswith("blobs/")] == [f"blobs/{hexd}"]
    assert [k for k in new if k.startswith("guards/")] == [f"guards/{hexd}"]
    assert [k for k in new if k.startswith("refs/")] == [f"refs/{hexd}/run-{i}" for i in range(4)]
    assert [k.split("/")[1] for k in new if k.startswith("links/")] == [f"run-{i}" for i in range(4)]
    for i in range(4):
        assert httpx.get(f"{(a, b)[i % 2].url}/v1/runs/run-{i}").json()["blob_count"] == 1
    assert httpx.get(f"{b.url}/v1/blobs/{digest}").content == data


def test_run_delete_and_gc_through_one_replica_while_the_other_uploads(replicas):
    """GC with no grace period looping on A while B links (or re-uploads) the blobs it collects."""
    _, a, b = replicas
    gc_passes = 0
    for rnd in range(2):
        doomed = [image_bytes(20, 20, seed=1000 * rnd + i) for i in range(12)]
        live = doomed[4:] + [image_bytes(20, 20, seed=1000 * rnd + 500 + i) for i in range(4)]
        with StoreClient(a.url) as client:
            for img in doomed:
                client.put(img, f"doomed-{rnd}")
        assert httpx.delete(f"{a.url}/v1/runs/doomed-{rnd}").json()["orphaned"] == len(doomed)
        stop = threading.Event()

        def collect(stop=stop):
            nonlocal gc_passes
            while not stop.is_set():
                r = httpx.post(f"{a.url}/v1/gc", json={"grace_seconds": 0}, timeout=60)
                assert r.status_code == 200, r.text
                gc_passes += 1

        collector = threading.Thread(target=collect)
        collector.start()
        try:
            with StoreClient(b.url) as client, ThreadPoolExecutor(4) as pool:
                infos = list(pool.map(lambda img, rnd=rnd: client.put(img, f"live-{rnd}"), live))
        finally:
            stop.set()
            collector.join()
        assert httpx.post(f"{a.url}/v1/gc", json={"grace_seconds": 0}).status_code == 200
        assert [i.digest for i in infos] == [compute_digest(img) for img in live]
        for img in live:  # every blob the live run links is still there, on both replicas
            for server in (a, b):
                r = httpx.get(f"{server.url}/v1/blobs/{compute_digest(img)}")
                assert r.status_code == 200 and r.content == img
        assert httpx.get(f"{a.url}/v1/runs/live-{rnd}").json()["blob_count"] == len(live)
        for img in doomed[:4]:  # and what only the deleted run had is gone
            assert httpx.get(f"{b.url}/v1/blobs/{compute_digest(img)}/info").status_code == 404
    assert gc_passes >= 2


def test_fsck_rehashes_quarantines_and_recounts(s3_server, storage):
    good, bad = image_bytes(30, 30, seed=4), image_bytes(30, 30, seed=5)
    for data in (good, bad):
        storage.put("r", compute_digest(data), data, info_of(data))
    url = storage.url
    bucket, prefix = url[5:].split("/", 1)
    client = s3_server.client()
    key = f"{prefix}/blobs/{digest_hex(compute_digest(bad))}"
    head = client.head_object(Bucket=bucket, Key=key)
    client.put_object(  # one flipped bit, metadata kept
        Bucket=bucket,
        Key=key,
        Body=bad[:-1] + bytes([bad[-1] ^ 1]),
        Metadata=head["Metadata"],
        ContentType=head["ContentType"],
    )
    # a count gone wrong (as after a replica died between a link and its count)
    client.put_object(
        Bucket=bucket,
        Key=f"{prefix}/runs/r.json",
        Body=json.dumps({"blob_count": 7, "bytes": 1, "created_at": 1.0, "updated_at": 1.0}),
    )
    env = {**s3_server.env, "PATH": str(Path(MMSTORE).parent)}
    fsck = [MMSTORE, "fsck", "--storage", url]
    r = subprocess.run(fsck, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and compute_digest(bad) in r.stderr and "1 corrupt" in r.stderr, r.stderr
    assert "recounted run r" in r.stderr
    assert storage.run("r").blob_count == 2
    r = subprocess.run([*fsck, "--quarantine"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert keys(s3_server, url, "quarantine/") == [f"quarantine/{digest_hex(compute_digest(bad))}"]
    assert subprocess.run(fsck, capture_output=True, timeout=60, env=env).returncode == 0
    assert storage.info(compute_digest(bad)) is None
    assert storage.read(compute_digest(good), 0, len(good)) == good
    assert storage.run("r").blob_count == 1
    assert [b.digest for b in storage.run_blobs("r", limit=10, cursor=None).blobs] == [compute_digest(good)]
    # offline gc through the same configuration
    r = subprocess.run(
        [MMSTORE, "gc", "--storage", url, "--grace-seconds", "0"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and json.loads(r.stderr)["deleted"] == 0


def test_large_gets_redirect_to_the_bucket_by_default(s3_server, tmp_path):
    """MMSTORE_REDIRECT_MIN_BYTES (default 1 MB): a large blob's GET is a 307 to a presigned URL
    (auth, 304 and HEAD answered by the replica), small blobs still stream; the clients follow
    and verify."""
    import asyncio

    from mmstore_client import AsyncStoreClient
    from mmstore_client.errors import ApiError
    from mmstore_client.transport import AiohttpTransport

    url = s3_server.bucket()
    tokens = json.dumps({"reader": ["read"], "writer": ["write"]})
    server = s3_store_process(s3_server, url, tmp_path, tokens=tokens).start()
    try:
        big, small = noise_png(2_500_000, seed=20), image_bytes(seed=21)
        with StoreClient(server.url, token="writer") as writer:
            big_d, small_d = writer.put(big, "r").digest, writer.put(small, "r").digest
        auth = {"authorization": "Bearer reader"}
        r = httpx.get(f"{server.url}/v1/blobs/{big_d}", headers=auth)
        assert r.status_code == 307 and r.content == b"" and r.headers["cache-control"] == "no-store"
        location = r.headers["location"]
        assert location.startswith(s3_server.endpoint) and f"blobs/{digest_hex(big_d)}" in location
        assert "X-Amz-Signature=" in location
        assert httpx.get(location).content == big  # no credentials needed
        ranged = httpx.get(location, headers={"range": "bytes=100-199"})
        assert ranged.status_code == 206 and ranged.content == big[100:200]
        assert httpx.get(f"{server.url}/v1/blobs/{big_d}").status_code == 401  # no token: no URL
        cached = httpx.get(f"{server.url}/v1/blobs/{big_d}", headers={**auth, "if-none-match": f'"{big_d}"'})
        assert cached.status_code == 304
        head = httpx.head(f"{server.url}/v1/blobs/{big_d}", headers=auth)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(big))
        streamed = httpx.get(f"{server.url}/v1/blobs/{small_d}", headers=auth)
        assert streamed.status_code == 200 and streamed.content == small
        with StoreClient(server.url, token="reader") as reader:
            assert reader.get(big_d) == big and reader.get(small_d) == small

        async def read_async(transport) -> bytes:
            async with AsyncStoreClient(server.url, token="reader", transport=transport) as client:
                return await client.get(big_d)

        assert asyncio.run(read_async(None)) == big
        assert asyncio.run(read_async(AiohttpTransport())) == big  # the signed URL sent as signed
        # a blob GC'd after the replica cached its info: the bucket's 404 reaches the client as such
        import obstore
        from mmstore.storage.s3 import S3Storage

        obstore.delete(S3Storage(url, config=s3_server.config).store, f"blobs/{digest_hex(big_d)}")
        with StoreClient(server.url, token="reader") as reader, pytest.raises(ApiError) as gone:
            reader.get(big_d)
        assert gone.value.status == 404
    finally:
        server.stop()


def _bucket_keys_of(s3_server, url: str, hexd: str) -> list[str]:
    return [k for k in keys(s3_server, url, "") if hexd in k]


def test_an_upload_that_fails_its_decode_leaves_nothing_in_the_bucket(s3_server, replicas):
    """The decode overlaps the upload to the bucket; bytes it rejects are withdrawn before any
    link, and the decoding threads run below the server's priority."""
    url, a, _ = replicas
    whole = noise_png(400_000, seed=11)
    cut = whole[: len(whole) * 3 // 5]  # header intact (the probe accepts it), pixel data cut
    digest = compute_digest(cut)
    r = httpx.put(f"{a.url}/v1/runs/cut/blobs/{digest}", content=cut, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_image", r.text
    assert _bucket_keys_of(s3_server, url, digest_hex(digest)) == []
    assert httpx.get(f"{a.url}/v1/blobs/{digest}").status_code == 404
    assert httpx.get(f"{a.url}/v1/runs/cut").status_code == 404

    def nice(task: Path) -> int:
        return int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])

    tasks = Path(f"/proc/{a.proc.pid}/task")
    server = nice(tasks / str(a.proc.pid))  # the main thread's (the test runner may be niced)
    assert min(19, server + 10) in {nice(t) for t in tasks.iterdir()}  # MMSTORE_DECODE_NICE=10


def test_bytes_that_fail_their_check_are_withdrawn_from_a_racing_writers_run(s3_server, storage):
    """Another replica deduplicates the bytes while the uploader's decode runs (with a check of its
    own, as a re-upload's): both links go."""
    from mmstore_client import decode

    cut = noise_png(200_000, seed=12)[:-5000]
    digest, hexd = compute_digest(cut), digest_hex(compute_digest(cut))
    info = BlobInfo.of(digest, len(cut), decode.probe(cut))

    def check():
        assert storage.link_existing("racer", digest, check=lambda: None) == info  # a lax replica
        decode.check_pixels(cut)

    with pytest.raises(decode.CorruptImage):
        storage.put("uploader", digest, cut, info, check=check)
    assert _bucket_keys_of(s3_server, storage.url, hexd) == []
    assert storage.info(digest) is None
    assert storage.run_blobs("racer", limit=10, cursor=None).blobs == []
    # the racer's next link attempt finds nothing, and an upload of good bytes is unaffected
    assert storage.link_existing("racer", digest) is None
    good = image_bytes(seed=13)
    assert storage.put("racer", compute_digest(good), good, info_of(good), check=lambda: None).created


def test_a_dedup_upload_checks_bytes_a_dead_replica_left_unchecked(s3_server, replicas):
    """A replica that died during its decode left the bytes unlinked: the next upload of them is
    decoded as well (its decode overlaps its requests) and withdraws them."""
    url, a, _ = replicas
    cut = noise_png(300_000, seed=14)[:-20_000]
    digest = _left_by_a_dead_replica(s3_server, url, cut)
    hexd = digest_hex(digest)
    r = httpx.put(f"{a.url}/v1/runs/again/blobs/{digest}", content=cut, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_image", r.text
    assert _bucket_keys_of(s3_server, url, hexd) == []
    assert httpx.get(f"{a.url}/v1/runs/again").status_code == 404  # checked before any link
    assert httpx.get(f"{a.url}/v1/blobs/{digest}/info").status_code == 404


def _left_by_a_dead_replica(s3_server, url: str, data: bytes) -> str:
    """What a replica killed during an upload's decode leaves: the bytes, claimed, never marked
    verified and linked nowhere (its decode had not answered)."""
    from mmstore.storage.s3 import S3Storage
    from mmstore_client import decode

    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    dead = S3Storage(url, config=s3_server.config)
    dead.guards.claim(hexd, new=True)
    assert dead._create_blob(hexd, data, BlobInfo.of(digest, len(data), decode.probe(data)))
    return digest


def test_a_link_without_bytes_never_links_bytes_no_replica_verified(s3_server, replicas):
    """The window the README documented: corrupt bytes a dying replica stored, then a
    ``blobs:link`` of that digest through another replica (what StoreClient.put sends first).
    The link decodes them itself: "missing", and they are withdrawn; the client's upload that
    follows is refused 422."""
    url, _, b = replicas
    cut = noise_png(300_000, seed=17)[:-20_000]
    digest = _left_by_a_dead_replica(s3_server, url, cut)
    r = httpx.post(f"{b.url}/v1/runs/linker/blobs:link", json={"digests": [digest]}, timeout=60)
    assert r.status_code == 200 and r.json() == {"linked": [], "missing": [digest]}
    assert _bucket_keys_of(s3_server, url, digest_hex(digest)) == []
    assert httpx.get(f"{b.url}/v1/runs/linker").status_code == 404
    with StoreClient(b.url) as client, pytest.raises(Exception) as refused:
        client.put(cut, "linker")
    assert getattr(refused.value, "code", None) == "corrupt_image", refused.value


def test_a_replica_killed_during_its_decode_leaves_nothing_linkable(s3_server, tmp_path):
    """The same window with a real replica: kill -9 once the upload's bytes are in the bucket and
    its (slow: 90 megapixels) decode has not answered; a link through another replica refuses them."""
    url = s3_server.bucket()
    dying = s3_store_process(s3_server, url, tmp_path).start()
    other = s3_store_process(s3_server, url, tmp_path).start()
    try:
        buf = io.BytesIO()
        Image.new("L", (9500, 9500)).save(buf, format="PNG")
        cut = buf.getvalue()[: len(buf.getvalue()) * 3 // 5]  # header intact, pixel data cut
        digest, hexd = compute_digest(cut), digest_hex(compute_digest(cut))

        def upload() -> None:
            with contextlib.suppress(httpx.TransportError):  # its server dies under it
                httpx.put(f"{dying.url}/v1/runs/dying/blobs/{digest}", content=cut, timeout=60)

        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + 60
        while f"blobs/{hexd}" not in keys(s3_server, url, "blobs/"):
            assert time.monotonic() < deadline, "the upload's bytes never reached the bucket"
            time.sleep(0.005)
        dying.kill()
        uploader.join()
        assert f"blobs/{hexd}" in keys(s3_server, url, "blobs/")  # killed before its decode answered
        r = httpx.post(f"{other.url}/v1/runs/linker/blobs:link", json={"digests": [digest]}, timeout=60)
        assert r.status_code == 200 and r.json() == {"linked": [], "missing": [digest]}
        assert _bucket_keys_of(s3_server, url, hexd) == []
    finally:
        dying.stop()
        other.stop()


def test_a_link_without_bytes_verifies_good_unmarked_bytes_once(s3_server, replicas):
    """Good bytes a dying replica left unmarked are decoded by the first link, marked verified,
    and linked; later links trust the marker."""
    url, a, b = replicas
    data = image_bytes(40, 30, seed=18)
    digest = _left_by_a_dead_replica(s3_server, url, data)
    hexd = digest_hex(digest)
    assert f"verified/{hexd}" not in keys(s3_server, url, "verified/")
    r = httpx.post(f"{b.url}/v1/runs/first/blobs:link", json={"digests": [digest]}, timeout=60)
    assert [x["digest"] for x in r.json()["linked"]] == [digest]
    assert f"verified/{hexd}" in keys(s3_server, url, "verified/")
    r = httpx.post(f"{a.url}/v1/runs/second/blobs:link", json={"digests": [digest]}, timeout=60)
    assert [x["digest"] for x in r.json()["linked"]] == [digest]
    assert httpx.get(f"{a.url}/v1/blobs/{digest}").content == data


def test_uploads_mark_blobs_verified_and_gc_removes_the_marker(s3_server, storage):
    data = image_bytes(seed=19)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("r", digest, data, info_of(data), check=lambda: None)
    assert keys(s3_server, storage.url, "verified/") == [f"verified/{hexd}"]
    storage.delete_run("r")
    assert storage.gc(0).deleted == 1
    assert _bucket_keys_of(s3_server, storage.url, hexd) == []


def test_a_failed_check_never_withdraws_bytes_a_run_links(s3_server, storage):
    """Linked bytes passed a check when they were linked: a replica whose decode now refuses them
    (another Pillow, say) refuses the upload, and every run keeps them."""
    from mmstore_client import decode

    data = image_bytes(seed=16)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("kept", digest, data, info_of(data))

    def refuses() -> None:
        raise decode.CorruptImage("this replica's decoder disagrees")

    with pytest.raises(decode.CorruptImage):
        storage.link_existing("new", digest, check=refuses)
    with pytest.raises(decode.CorruptImage):
        storage.put("new", digest, data, info_of(data), check=refuses)
    assert storage.read(digest, 0, len(data)) == data
    assert [b.digest for b in storage.run_blobs("kept", limit=10, cursor=None).blobs] == [digest]
    assert storage.run("new") is None and f"refs/{hexd}/new" not in keys(s3_server, storage.url, "refs/")


def test_a_link_whose_blob_is_deleted_before_its_verify_is_taken_back(s3_server, storage):
    """A GC (or a withdrawal) deletes the blob between a writer's link and its verify: the writer
    finds it gone on its next round and removes the link, ref and count it made."""
    data = image_bytes(seed=15)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("owner", digest, data, info_of(data))
    storage.delete_run("owner")
    verified = storage.guards.verified

    def deleted_first(hexd_, etag, exists):
        storage.guards.finish_delete(hexd_)  # the blob, then its guard
        return verified(hexd_, etag, exists)

    storage.guards.verified = deleted_first
    assert storage.link_existing("late", digest) is None
    assert keys(s3_server, storage.url, "links/late/") == []
    assert f"refs/{hexd}/late" not in keys(s3_server, storage.url, "refs/")
    assert storage.run("late").blob_count == 0


def test_serve_refuses_bad_storage_naming_the_fix(s3_server, tmp_path):
    env = {**s3_server.env, "PATH": str(Path(MMSTORE).parent)}
    r = subprocess.run(
        [MMSTORE, "serve", "--storage", "gs://bucket"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 2 and "s3://bucket" in r.stderr
    r = subprocess.run(
        [MMSTORE, "serve", "--storage", "s3://no-such-bucket"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2 and "bucket exists" in r.stderr


# -- GC's protocol, step by step (s3_guard.py) ----------------------------------------------------


def test_a_writer_revives_a_condemned_blob_and_the_gc_then_keeps_it(storage):
    from mmstore.storage.s3_guard import CONDEMNED, DELETING

    data = image_bytes(seed=6)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("old", digest, data, info_of(data))
    storage.delete_run("old")
    guard = storage.guards.read(hexd)
    condemned = storage.guards.write(hexd, CONDEMNED, guard.used_at, guard.etag)  # GC step b
    assert condemned and storage.guards.read(hexd).state == CONDEMNED
    assert storage.link_existing("new", digest) is not None  # a writer on another replica
    assert storage.guards.read(hexd).state == "live"
    assert storage.guards.write(hexd, DELETING, guard.used_at, condemned) is None  # GC step d fails
    assert storage.gc(0).deleted == 0 and storage.info(digest) is not None


def test_a_gc_that_finds_a_new_ref_after_condemning_keeps_the_blob(storage):
    data = image_bytes(seed=7)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("old", digest, data, info_of(data))
    storage.delete_run("old")
    storage._link("late", info_of(data))  # a writer's ref lands between the GC's listing and step c
    assert storage.guards.collect(hexd, 0.0, time.time(), lambda: storage._has_refs(hexd)) == "kept"
    assert storage.info(digest) is not None


def test_a_writer_waits_for_a_deletion_in_progress_then_uploads_anew(storage):
    from mmstore.storage.s3_guard import DELETING

    data = image_bytes(seed=8)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("old", digest, data, info_of(data))
    storage.delete_run("old")
    guard = storage.guards.read(hexd)
    assert storage.guards.write(hexd, DELETING, guard.used_at, guard.etag)  # a GC committed to delete
    finisher = threading.Timer(0.5, storage.guards.finish_delete, args=(hexd,))
    finisher.start()
    started = time.monotonic()
    result = storage.put("new", digest, data, info_of(data))
    finisher.join()
    assert time.monotonic() - started >= 0.4, "the writer must wait for the deletion to finish"
    assert result.created and storage.guards.read(hexd).state == "live"
    assert storage.read(digest, 0, len(data)) == data
    assert storage.run("new").blob_count == 1


def test_a_crashed_gcs_deletion_is_finished_by_the_next_writer(storage):
    data = image_bytes(seed=9)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("old", digest, data, info_of(data))
    storage.delete_run("old")
    import obstore

    stale = {"state": "deleting", "used_at": 0.0, "changed_at": time.time() - 3600, "by": "crashed-gc"}
    obstore.put(storage.store, f"guards/{hexd}", json.dumps(stale).encode())
    assert storage.link_existing("new", digest) is None  # the blob was being deleted: now it is gone
    assert storage.info(digest) is None
    assert storage.put("new", digest, data, info_of(data)).created


def test_gc_grace_and_stray_guards(storage):
    data = image_bytes(seed=10)
    digest, hexd = compute_digest(data), digest_hex(compute_digest(data))
    storage.put("r", digest, data, info_of(data))
    assert storage.delete_run("r").orphaned == 1
    report = storage.gc(3600)
    assert (report.deleted, report.garbage_in_grace) == (0, 1)
    report = storage.gc(0)
    assert (report.deleted, report.bytes_freed) == (1, len(data))
    assert storage.guards.read(hexd) is None and storage.info(digest) is None
    storage.guards.claim(hexd)  # a claim whose upload never came
    storage.gc(3600)
    assert storage.guards.read(hexd) is not None
    storage.gc(0)
    assert storage.guards.read(hexd) is None


def test_link_keys_round_trip_and_page_offsets():
    from mmstore.storage.s3_layout import link_key, link_offset, parse_link

    info = BlobInfo(
        digest="blake3:" + "ab" * 32, size=12, mime="application/json", format="JSON", width=0, height=0
    )
    key = link_key("run-1.x", info)
    assert parse_link(key) == ("run-1.x", info)
    assert link_offset("r", info.digest) > f"links/r/{'ab' * 32}.999999999.99999.99999.JPEG.image%2Fjpeg"
    assert link_offset("r", info.digest) < f"links/r/{'ab' * 31}ac"
    assert link_offset("r", "a") == "links/r/" and link_offset("r", "zzz") > "links/r/" + "f" * 64
