"""What only a real process shows: crashes, restarts, concurrency, fsck."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from mmstore_client.digest import compute_digest, digest_hex
from support import VENV_BIN, image_bytes, noise_png, store_process


def blob_files(root):
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def test_killed_mid_upload_leaves_no_partial_blob_and_restart_keeps_data(tmp_path):
    root = tmp_path / "data"
    server = store_process(root).start()
    kept = image_bytes(40, 40, seed=1)
    assert httpx.put(f"{server.url}/v1/runs/r/blobs/{compute_digest(kept)}", content=kept).status_code == 201
    big = noise_png(3_000_000, seed=2)
    digest = compute_digest(big)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"PUT /v1/runs/r/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n".encode()
        + big[: len(big) // 2]
    )
    time.sleep(0.3)
    server.kill()
    sock.close()
    assert [p.name for p in blob_files(root)] == [digest_hex(compute_digest(kept))]

    restarted = store_process(root, port=server.port).start()
    try:
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").status_code == 404
        assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(kept)}").content == kept
        assert httpx.get(f"{server.url}/v1/runs/r").json()["blob_count"] == 1
        assert list((root / "tmp").iterdir()) == []
        r = httpx.put(f"{server.url}/v1/runs/r/blobs/{digest}", content=big)
        assert r.status_code == 201
    finally:
        restarted.stop()


def test_16_concurrent_uploads_of_same_bytes_end_as_one_blob(tmp_path):
    root = tmp_path / "data"
    server = store_process(root, workers="2").start()
    try:
        data = noise_png(500_000, seed=3)
        digest = compute_digest(data)

        def upload(i):
            return httpx.put(
                f"{server.url}/v1/runs/run-{i % 4}/blobs/{digest}", content=data, timeout=60
            ).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(upload, range(16)))
        assert sorted(set(codes)) in ([200, 201], [201]) and codes.count(201) >= 1
        assert set(codes) <= {200, 201}
        assert [p.name for p in blob_files(root)] == [digest_hex(digest)]
        for i in range(4):
            assert httpx.get(f"{server.url}/v1/runs/run-{i}").json()["blob_count"] == 1
        assert httpx.get(f"{server.url}/v1/blobs/{digest}").content == data
    finally:
        server.stop()


def test_fsck_finds_and_quarantines_rotten_blob(tmp_path):
    root = tmp_path / "data"
    server = store_process(root).start()
    good, bad = image_bytes(30, 30, seed=4), image_bytes(30, 30, seed=5)
    for data in (good, bad):
        httpx.put(f"{server.url}/v1/runs/r/blobs/{compute_digest(data)}", content=data)
    server.stop()
    path = next(p for p in blob_files(root) if p.name == digest_hex(compute_digest(bad)))
    os.chmod(path, 0o644)
    path.write_bytes(bad[:-1] + bytes([bad[-1] ^ 1]))  # one flipped bit
    fsck = [str(VENV_BIN / "mmstore"), "fsck", "--root", str(root)]
    r = subprocess.run(fsck, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and compute_digest(bad) in r.stderr and "1 corrupt" in r.stderr
    r = subprocess.run([*fsck, "--quarantine"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and (root / "quarantine" / digest_hex(compute_digest(bad))).exists()
    assert subprocess.run(fsck, capture_output=True, timeout=60).returncode == 0
    server = store_process(root).start()
    try:
        assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(bad)}").status_code == 404
        assert httpx.get(f"{server.url}/v1/blobs/{compute_digest(good)}").content == good
        assert httpx.get(f"{server.url}/v1/runs/r").json()["blob_count"] == 1
    finally:
        server.stop()


def _connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on ``port`` each process holds (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED, server side
                    inodes.add(fields[9])
    counts = {}
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held += 1
        counts[pid] = held
    return counts


def test_workers_share_keepalive_connections(tmp_path):
    """With 2 workers, 16 long-lived client connections are spread over both processes (each
    worker listens on its own SO_REUSEPORT socket), not all accepted by the first one awake."""
    server = store_process(tmp_path / "data", workers="2").start()
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(16)]
    try:
        data = image_bytes(64, 48)
        digest = compute_digest(data)
        assert clients[0].put(f"/v1/runs/r/blobs/{digest}", content=data).status_code == 201
        for client in clients:  # each its own connection, kept open
            assert client.get(f"/v1/blobs/{digest}").content == data
        children = subprocess.run(
            ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        workers = []
        for pid in map(int, children):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():  # not the resource tracker
                    workers.append(pid)
        assert len(workers) == 2, children
        counts = _connections_by_pid(workers, server.port)
        assert sum(counts.values()) == 16, counts
        assert all(n > 0 for n in counts.values()), counts  # all on one: p = 2 * 2**-16
    finally:
        for client in clients:
            client.close()
        server.stop()
