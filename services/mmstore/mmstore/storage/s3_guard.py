"""Blob guards: how uploads and GC on any number of replicas agree, with no coordinator.

Each blob X has a guard object ``guards/<hex>``, JSON ``{"state", "used_at", "changed_at", "by"}``:

- ``live``: X is in use; ``used_at`` is when it was last uploaded or linked (or its run deleted);
- ``condemned``: a GC found X unreferenced and unused for longer than the grace period;
- ``deleting``: a GC is deleting X (then the guard).

Every guard write is conditional: on the ETag its writer read (``If-Match``) or on there being none
(``If-None-Match: *``), and carries a random ``by``, so every write gets a new ETag. S3 (and MinIO,
R2, GCS) make these atomic and strongly consistent: of two writers that read the same ETag, one wins.

A writer linking X to run R (``put`` with the bytes, ``link_existing`` without), on any replica:

1. *claim*: read the guard. ``deleting``: wait until the GC has finished (the guard is gone), then
   go on as for a new blob. ``condemned``, or ``live`` but unused for a minute, or absent: write
   ``live`` (CAS; on conflict read again). A ``live`` guard used within the minute is left as it is,
   so concurrent uploads of one popular blob do not contend.
2. make sure X exists, *after* the claim: create it with ``If-None-Match: *``, or HEAD it.
3. write the ref ``refs/X/R``, then the link ``links/R/X...`` (a crash in between leaves a ref
   without a link: the blob is kept, never the reverse).
4. *verify*: the guard still has the ETag of step 1 (no one wrote it since), or it is ``live`` and
   X still exists. Otherwise a GC raced the writer: repeat from step 1.

A GC, for a blob X that no ref named when it listed ``refs/``:

a. read the guard; ``used_at`` within the grace period: keep X (``garbage_in_grace``).
b. CAS ``live`` -> ``condemned`` (a conflict means a writer claimed X: keep it).
c. list ``refs/X/``: a ref appeared since the listing: keep X (its writer revives the guard).
d. CAS ``condemned`` -> ``deleting`` (fails if any writer claimed X since b); delete X; delete the
   guard.

Withdrawing X (bytes that failed their upload's decode after they reached the bucket, or fsck's
quarantine) writes ``deleting`` over whatever the guard holds, lists ``refs/X/`` and removes those
refs' links and the refs, then X and the guard. A writer that verified before the guard write had
written its ref before it, so the listing finds it; one that verifies after fails and waits, as for
a GC's deletion.

Why a blob a writer has verified is never deleted. The writer wrote its ref at t3, read the guard
at t4 > t3 and knew X existed after its claim. For a GC to delete X it must win the CAS d on the
``condemned`` guard it wrote at b.

- If b came before t4: at t4 the guard was ``live`` (or still had the claim's ETag, which b would
  have changed), so a writer wrote it after b and d's CAS, expecting b's ETag, fails. Unless d came
  before that write; but writers never overwrite ``deleting``: they wait until the guard is deleted,
  which is after X is deleted, so the writer's existence check (after its claim) saw X gone and it
  uploaded X anew (``put``) or answered "missing" (``link_existing``): any later deletion of the new
  X must go through b..d again.
- If b came after t4: c came after t3 and lists the writer's ref, so the GC keeps X.

So safety does not depend on the grace period (``grace_seconds=0`` is safe while uploads run); the
grace period keeps recently used or orphaned blobs for clients that come back for them. The one
time bound: a GC that crashed after d's CAS leaves a ``deleting`` guard; after ``DELETE_STALE``
seconds writers (and the next GC) finish that deletion themselves, so a GC must not stall that long
between d's CAS and its two DELETE requests.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from ..errors import ApiError
from .s3_layout import blob_key, guard_key, verified_key

LIVE, CONDEMNED, DELETING = "live", "condemned", "deleting"
FRESH = 60.0  # a live guard used more recently than this is not rewritten by a claim
DELETE_STALE = 120.0  # a deleting guard older than this is a crashed GC's: finish its deletion
CLAIM_WAIT = 30.0  # how long a writer waits for another replica's deletion of the blob

# what a conditional write answers when its condition fails (If-Match on a missing key: 404 or 412)
CONFLICT = (AlreadyExistsError, PreconditionError, FileNotFoundError)


class StorageBusyError(ApiError):
    """503 storage_busy: a blob is being deleted by GC right now; retry (the clients do)."""

    status = 503
    code = "storage_busy"


@dataclass(frozen=True, slots=True)
class Guard:
    state: str
    used_at: float
    changed_at: float
    etag: str


def backoff(attempt: int, base: float = 0.01, cap: float = 0.5) -> None:
    """Sleep with full jitter (AWS's recommendation for optimistic-concurrency retries)."""
    time.sleep(random.uniform(0, min(cap, base * 2**attempt)))


class Guards:
    """The guard protocol over one obstore store (see the module docstring)."""

    def __init__(self, store: obstore.store.ObjectStore) -> None:
        self.store = store

    def read(self, hexd: str) -> Guard | None:
        try:
            result = obstore.get(self.store, guard_key(hexd))
        except FileNotFoundError:
            return None
        body = json.loads(bytes(result.bytes()))
        return Guard(body["state"], body["used_at"], body["changed_at"], result.meta["e_tag"])

    def write(self, hexd: str, state: str, used_at: float, expect: str | None) -> str | None:
        """CAS: write the guard if its ETag is still ``expect`` (None: if it is absent).

        Returns the new ETag, or None when another writer got there first.
        """
        try:
            return self._put(hexd, state, used_at, "create" if expect is None else {"e_tag": expect})
        except CONFLICT:
            return None

    def seize(self, hexd: str) -> None:
        """Write ``deleting`` whatever the guard holds: the blob's bytes are being withdrawn
        (``S3Storage._withdraw``), and writers treat it as a GC's deletion (they wait)."""
        self._put(hexd, DELETING, time.time(), "overwrite")

    def _put(self, hexd: str, state: str, used_at: float, mode: Any) -> str:
        body = {"state": state, "used_at": used_at, "changed_at": time.time(), "by": uuid.uuid4().hex}
        put = obstore.put(
            self.store, guard_key(hexd), json.dumps(body).encode(), mode=mode, use_multipart=False
        )
        return put["e_tag"]

    def finish_delete(self, hexd: str) -> None:
        """Complete a committed deletion (``deleting`` guard): the blob, its verified marker, then
        the guard (writers wait for the guard to go, so none marks the bytes anew meanwhile)."""
        obstore.delete(self.store, blob_key(hexd))
        obstore.delete(self.store, verified_key(hexd))
        obstore.delete(self.store, guard_key(hexd))

    def claim(self, hexd: str, *, new: bool = False, refresh: bool = False) -> str | None:
        """Step 1 of a writer: the guard's ETag once it is ``live``.

        ``new`` (an upload of bytes the store lacked a moment ago): try creating the guard before
        reading it, one request instead of two in the common case. ``refresh`` (a run was deleted):
        rewrite ``used_at`` even when fresh, and return None rather than wait when a GC is deleting
        the blob (an orphan being deleted needs no grace).
        """
        if new and (etag := self.write(hexd, LIVE, time.time(), None)) is not None:
            return etag
        deadline = time.monotonic() + CLAIM_WAIT
        attempt = 0
        while True:
            guard = self.read(hexd)
            now = time.time()
            if guard is not None and guard.state == DELETING:
                if now - guard.changed_at > DELETE_STALE:
                    self.finish_delete(hexd)
                    continue
                if refresh:
                    return None
                if time.monotonic() > deadline:
                    raise StorageBusyError(
                        f"blob blake3:{hexd} is being deleted by garbage collection; retry",
                        digest=f"blake3:{hexd}",
                    )
            elif guard is not None and guard.state == LIVE and now - guard.used_at < FRESH and not refresh:
                return guard.etag
            else:
                etag = self.write(hexd, LIVE, now, guard.etag if guard else None)
                if etag is not None:
                    return etag
            backoff(attempt, base=0.02)
            attempt += 1

    def verified(self, hexd: str, etag: str, blob_exists: Callable[[], bool]) -> bool:
        """Step 4 of a writer: no GC can delete the blob it just linked."""
        guard = self.read(hexd)
        if guard is None:
            return False
        if guard.etag == etag:
            return True
        return guard.state == LIVE and blob_exists()

    def collect(self, hexd: str, blob_mtime: float, cutoff: float, referenced: Callable[[], bool]) -> str:
        """Steps a-d of GC for an unreferenced blob: ``deleted``, ``in_grace`` or ``kept``."""
        guard = self.read(hexd)
        if guard is not None and guard.state == DELETING:
            if time.time() - guard.changed_at > DELETE_STALE:
                self.finish_delete(hexd)
                return "deleted"
            return "kept"  # another GC is deleting it
        used_at = guard.used_at if guard is not None else blob_mtime
        if used_at > cutoff:
            return "in_grace"
        if guard is not None and guard.state == CONDEMNED:
            etag = guard.etag  # an earlier pass condemned it; c and d still decide
        else:
            etag = self.write(hexd, CONDEMNED, used_at, guard.etag if guard else None)
            if etag is None:
                return "kept"
        if referenced():
            return "kept"
        if self.write(hexd, DELETING, used_at, etag) is None:
            return "kept"
        self.finish_delete(hexd)
        return "deleted"
