"""S3-compatible backend (AWS S3, MinIO, R2, GCS's S3 API): stateless replicas over one bucket.

Everything lives in the bucket (layout in :mod:`.s3_layout`): blobs with their BlobInfo as object
metadata, run links as empty marker objects (``links/<run>/...`` per run, ``refs/<hex>/<run>`` per
blob), per-run counters, and per-blob guards. No replica keeps state that another needs, so any
number of them serve one bucket with no shared disk and no coordination:

- blobs are created with ``If-None-Match: *``: concurrent uploads of one digest, through any
  replicas, end as one object, and exactly one of them answers 201;
- links are created with ``If-None-Match: *`` too, so only the request that created a link counts
  it; run counters (``runs/<run>.json``) are then updated by compare-and-swap on their ETag
  (``If-Match``) with jittered retries, the links a replica makes into one run at the same time
  counted in one update (:mod:`.batching`). GET /v1/runs/{run} is one small GET, whatever the run's
  size; GET /v1/runs is one LIST plus one GET per run. A replica that dies between a link and its
  count leaves the count short by one: ``mmstore fsck`` recounts (also after a run was deleted
  while uploads into that same run were still arriving);
- an upload's full decode runs while its requests are in flight (the blob's PUT included) and
  answers before the blob is linked; bytes it rejects are withdrawn from the bucket and from every
  run, unless a run linked them after an earlier check (:meth:`S3Storage._checked`); bytes it
  accepts get a marker ``verified/<hex>``, and a link without bytes (``blobs:link``) of a blob
  that has none decodes the blob first (:meth:`S3Storage._verify_stored`): bytes a replica stored
  and died before its decode answered are never linked unchecked;
- GC and uploads agree through each blob's guard (:mod:`.s3_guard`, where the reasoning is), so a
  blob linked by any live run is never deleted, also while another replica is linking it.

Costs, in requests: a new blob about 8 (HEAD, guard, PUT, marker, ref, link, counter, verify);
linking a stored blob about 8 (HEAD twice, marker HEAD, guard read, ref, link, counter, verify);
a GET or HEAD one, streamed from the bucket (a GET of a large blob: none, redirected to the
bucket); a page of a run's blobs one GET and one LIST (the BlobInfo is in the link's key);
deleting a run with n links about 3n; GC one LIST per 1000 refs, blobs, guards and markers, plus
7 per blob it deletes. A counter update is one conditional PUT against the counter this replica
last saw, two more requests per conflict.

Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL,
AWS_VIRTUAL_HOSTED_STYLE_REQUEST, web identity and instance credentials), read by obstore; an
``http://`` endpoint (MinIO, tests) is allowed without more configuration.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, ClassVar

import obstore
from mmstore_client import decode
from mmstore_client.cache import LRUCache
from mmstore_client.digest import DigestHasher, digest_hex
from mmstore_client.models import BlobInfo, GcReport, RunBlobPage, RunDeleted, RunInfo
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from .base import Check, FsckReport, PutResult, Storage
from .batching import GroupCommit
from .s3_guard import CONFLICT, Guards, StorageBusyError, backoff
from .s3_layout import (
    BLOBS,
    LINKS,
    QUARANTINE,
    REFS,
    RUNS,
    VERIFIED,
    RunCounter,
    blob_attributes,
    blob_info,
    blob_key,
    guard_key,
    link_key,
    link_offset,
    link_prefix,
    parse_link,
    parse_url,
    ref_key,
    run_key,
    verified_key,
)

log = logging.getLogger(__name__)

_ROUNDS = 8  # claim / verify rounds of one write; each is lost only to a GC deleting that blob
_CAS_ATTEMPTS = 64  # compare-and-swap attempts on one run counter
_CHUNK = 1 << 20  # bytes per chunk streamed to a client (a 2 MB image: 2 chunks)
_FANOUT = 16  # concurrent requests of one call (missing, runs, delete_run, gc, fsck)
_REFS_BY_LISTING = 1000  # deleting more links than this: list all refs once rather than per blob
_COUNTERS_CACHED = 10_000  # run counters remembered (with their ETag) for one-request updates


def _info_of(hexd: str, head: Any) -> BlobInfo:
    """The BlobInfo a blob's HEAD carries (its metadata)."""
    return blob_info(f"blake3:{hexd}", head.meta["size"], head.attributes)


class S3Storage(Storage):
    remote: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        config: dict[str, Any] | None = None,
        client_options: dict[str, Any] | None = None,
        max_image_pixels: int = decode.DEFAULT_MAX_PIXELS,
    ) -> None:
        """``config``: obstore S3 settings over the AWS_* environment (tests pass the endpoint here).
        ``max_image_pixels``: the pixel limit of the decode that checks an unverified blob."""
        self.max_image_pixels = max_image_pixels
        self.url = url
        bucket, prefix = parse_url(url)
        endpoint = (config or {}).get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or ""
        options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "60s"}
        if endpoint.startswith("http://"):
            options["allow_http"] = True
        options.update(client_options or {})
        self.store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config or None,
            client_options=options,
            retry_config={"max_retries": 4, "retry_timeout": timedelta(seconds=30)},
        )
        self.guards = Guards(self.store)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # run -> (counter last seen, its ETag): a hint for one-request updates, replaced as it changes
        self._counters: LRUCache[str, tuple[RunCounter, str]] = LRUCache(_COUNTERS_CACHED)
        self._counts = GroupCommit(self._add_counts)  # new links' counts, one update per batch

    # -- plumbing -----------------------------------------------------------------------
    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, ``_FANOUT`` requests at a time (obstore releases the GIL)."""
        items = list(items)
        if len(items) <= 1:
            return [fn(x) for x in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_FANOUT, thread_name_prefix="mmstore-s3")
        return list(self._pool.map(fn, items))

    def _list(self, prefix: str, offset: str | None = None) -> Iterator[dict[str, Any]]:
        for chunk in obstore.list(self.store, prefix, offset=offset, chunk_size=1000):
            yield from chunk

    def _head(self, hexd: str) -> BlobInfo | None:  # info_async's twin
        try:
            return _info_of(hexd, obstore.get(self.store, blob_key(hexd), options={"head": True}))
        except FileNotFoundError:
            return None

    def _create_blob(self, hexd: str, data: bytes, info: BlobInfo) -> bool:
        """One conditional PUT (never multipart: that cannot be conditional); False if it existed."""
        try:
            obstore.put(
                self.store,
                blob_key(hexd),
                data,
                mode="create",
                attributes=blob_attributes(info),
                use_multipart=False,
            )
        except AlreadyExistsError:
            return False
        return True

    def _mark_verified(self, hexd: str) -> None:
        obstore.put(self.store, verified_key(hexd), b"", use_multipart=False)

    def _is_verified(self, hexd: str) -> bool:
        try:
            obstore.get(self.store, verified_key(hexd), options={"head": True})
        except FileNotFoundError:
            return False
        return True

    def _verify_stored(self, hexd: str, info: BlobInfo) -> bool:
        """Check a stored blob that no replica marked verified, as its upload would have: its
        digest and, for an image, the full decode. Marks it when it passes; withdraws it when it
        fails and no run links it (a run's links passed a check when they were made, see
        :meth:`_checked`). Whether it may be linked.

        Only images are uploaded unmarked (their decode runs beside the upload); a blob of another
        type (a rollout document) without a marker is reported absent, so its bytes come again.
        """
        if not info.mime.startswith("image/"):
            return False
        try:
            data = bytes(obstore.get(self.store, blob_key(hexd)).bytes())
        except FileNotFoundError:
            return False
        hasher = DigestHasher()
        hasher.update(data)
        if hasher.digest() != f"blake3:{hexd}":
            return False  # corrupt in the bucket: fsck's to report and quarantine
        try:
            self._checked(hexd, lambda: decode.verify(data, max_pixels=self.max_image_pixels), withdraw=None)
        except decode.ImageError:
            return False
        self._mark_verified(hexd)
        return True

    def _has_refs(self, hexd: str) -> bool:
        return next(self._list(f"{REFS}{hexd}/"), None) is not None

    def _counter(self, run: str) -> tuple[RunCounter, str] | None:
        try:
            result = obstore.get(self.store, run_key(run))
        except FileNotFoundError:
            self._counters.discard(run)
            return None
        current = RunCounter.decode(bytes(result.bytes())), result.meta["e_tag"]
        self._counters.replace(run, current)
        return current

    def _update_counter(self, run: str, change: Callable[[RunCounter], RunCounter | None]) -> None:
        """Compare-and-swap ``runs/<run>.json`` (created when absent); ``change`` None: leave it.

        The first attempt swaps against the counter this replica last saw (one request when no
        other replica wrote it since); a conflict reads it afresh.
        """
        current = self._counters.get(run)
        for attempt in range(_CAS_ATTEMPTS):
            if current is None or attempt > 0:
                current = self._counter(run)
            counter, etag = current if current else (RunCounter.new(), None)
            new = change(counter)
            if new is None:
                return
            mode = "create" if etag is None else {"e_tag": etag}
            try:
                put = obstore.put(self.store, run_key(run), new.encode(), mode=mode, use_multipart=False)
            except CONFLICT:
                if attempt > 0:
                    backoff(attempt)
                continue
            self._counters.replace(run, (new, put["e_tag"]))
            return
        raise StorageBusyError(f"run {run!r}: too many concurrent updates of its counter; retry", run=run)

    def _link(self, run: str, info: BlobInfo) -> bool:
        """Ref first, then the link: a crash in between keeps the blob, never loses a live one.

        Whether this call made the link (and counted it)."""
        hexd = digest_hex(info.digest)
        obstore.put(self.store, ref_key(hexd, run), b"", use_multipart=False)
        try:
            obstore.put(self.store, link_key(run, info), b"", mode="create", use_multipart=False)
        except AlreadyExistsError:
            return False  # linked before: counted then
        self._counts.add(run, 1, info.size)  # with the other links into this run arriving now
        return True

    def _unlink(self, run: str, info: BlobInfo, counted: bool) -> None:
        """Undo :meth:`_link` of a blob that a GC deleted before the writer could verify it."""
        obstore.delete(self.store, [link_key(run, info), ref_key(digest_hex(info.digest), run)])
        if counted:
            self._counts.add(run, -1, -info.size)

    def _add_counts(self, run: str, count: int, size: int) -> None:
        def add(c: RunCounter) -> RunCounter:
            return RunCounter(c.blob_count + count, c.bytes + size, c.created_at, time.time())

        self._update_counter(run, add)

    # -- Storage ------------------------------------------------------------------------
    def put(
        self, run: str, digest: str, data: bytes, info: BlobInfo, *, check: Check | None = None
    ) -> PutResult:
        hexd = digest_hex(digest)
        created = False
        if check is None:  # the caller validated the bytes: marked before they are in the bucket
            self._mark_verified(hexd)
        for attempt in range(_ROUNDS):
            etag = self.guards.claim(hexd, new=attempt == 0)
            stored = info if self._create_blob(hexd, data, info) else self._head(hexd)
            if stored is None:
                continue  # deleted between our PUT's 412 and the HEAD: claim again
            created = created or stored is info
            if check is not None:  # the decode ran while the bytes went up; before any link
                self._checked(hexd, check, withdraw=True if stored is info else None)
                check = None
                self._mark_verified(hexd)
            self._link(run, stored)
            if self.guards.verified(hexd, etag, lambda: self._head(hexd) is not None):
                return PutResult(stored, created=created)
        raise StorageBusyError(f"blob {digest} is contended by garbage collection; retry", digest=digest)

    def link_existing(self, run: str, digest: str, *, check: Check | None = None) -> BlobInfo | None:
        hexd = digest_hex(digest)
        if self._head(hexd) is None:  # the common case for new uploads: no claim, no write
            return None
        verified = self._is_verified(hexd)
        linked: BlobInfo | None = None  # what the last round linked
        counted = False  # whether a round made the link (and counted it)
        for _ in range(_ROUNDS):
            etag = self.guards.claim(hexd)
            info = self._head(hexd)  # after the claim: only now does "exists" stay true
            if info is None:
                if linked is not None:  # deleted under the last round's link: take it back
                    self._unlink(run, linked, counted)
                return None
            if check is not None:
                self._checked(hexd, check, withdraw=None)
                check = None
                if not verified:
                    self._mark_verified(hexd)
                    verified = True
            elif not verified:  # stored by a replica that has not (yet) accepted the bytes
                if not self._verify_stored(hexd, info):
                    return None
                verified = True
            counted = self._link(run, info) or counted
            linked = info
            if self.guards.verified(hexd, etag, lambda: self._head(hexd) is not None):
                return info
        raise StorageBusyError(f"blob {digest} is contended by garbage collection; retry", digest=digest)

    def _checked(self, hexd: str, check: Check, *, withdraw: bool | None) -> None:
        """Run an upload's ``check`` (its decode) once the blob is in the bucket, before any link.

        If it rejects the bytes, they are withdrawn (:meth:`_withdraw`) when ``withdraw`` is True
        (this upload created the blob) or None and no run links them (a dedup upload: bytes that
        a replica stored and died before its own check answered). Bytes that some run links passed
        a check when they were linked, so a failing check there says more about this replica
        (another Pillow, say) than about them: the upload is refused and they stay.
        """
        try:
            check()
        except decode.ImageError:
            try:
                if withdraw or (withdraw is None and not self._has_refs(hexd)):
                    self._withdraw(hexd)
            except Exception:  # the client still gets its 422; unlinked bytes are GC's
                log.exception("withdrawing blob blake3:%s failed", hexd)
            raise

    def _withdraw(self, hexd: str) -> None:
        """Remove a blob from every run and from the bucket, while other writers may be linking it.

        The guard is seized first (``deleting``), so a writer that links the blob from now on fails
        its verify and waits until the blob is gone (as for a GC), then takes its link back; one
        that verified before has written its ref before, so the listing of ``refs/<hex>/`` below
        finds it and its link is removed. Run counters keep the removed links counted until
        ``mmstore fsck`` recounts.
        """
        self.guards.seize(hexd)
        runs = [m["path"].rsplit("/", 1)[1] for m in self._list(f"{REFS}{hexd}/")]
        # links first (the run stops listing it), then refs, the blob and its guard
        links = [key for run in runs if (key := self._link_of(run, hexd))]
        for keys in (links, [ref_key(hexd, run) for run in runs]):
            if keys:
                obstore.delete(self.store, keys)
        self.guards.finish_delete(hexd)

    def _link_of(self, run: str, hexd: str) -> str | None:
        """The key of ``run``'s link to the blob, found by listing (no BlobInfo needed)."""
        name = f"{link_prefix(run)}{hexd}."
        first = next(self._list(link_prefix(run), offset=name[:-1]), None)  # keys after "<hex>"
        return first["path"] if first and first["path"].startswith(name) else None

    def info(self, digest: str) -> BlobInfo | None:
        return self._head(digest_hex(digest))

    async def info_async(self, digest: str) -> BlobInfo | None:
        hexd = digest_hex(digest)
        try:
            return _info_of(hexd, await obstore.get_async(self.store, blob_key(hexd), options={"head": True}))
        except FileNotFoundError:
            return None

    def read(self, digest: str, start: int, length: int) -> bytes:
        key = blob_key(digest_hex(digest))
        return bytes(obstore.get_range(self.store, key, start=start, length=length))

    async def open_stream(self, digest: str, start: int, length: int) -> AsyncIterator[bytes]:
        key = blob_key(digest_hex(digest))
        if length <= _CHUNK:  # one chunk: one ranged GET, awaited once
            data = bytes(await obstore.get_range_async(self.store, key, start=start, length=length))

            async def whole() -> AsyncIterator[bytes]:
                yield data

            return whole()
        result = await obstore.get_async(self.store, key, options={"range": (start, start + length)})

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=_CHUNK):
                yield bytes(chunk)

        return chunks()

    async def presign(self, digest: str, ttl_seconds: int) -> str:
        # a SigV4 signature, computed here (async: refreshing instance or web-identity credentials
        # is a request)
        key = blob_key(digest_hex(digest))
        return await obstore.sign_async(self.store, "GET", key, timedelta(seconds=ttl_seconds))

    def missing(self, digests: list[str]) -> list[str]:
        unique = list(dict.fromkeys(digests))
        present = self._map(lambda d: self._head(digest_hex(d)) is not None, unique)
        return [d for d, here in zip(unique, present, strict=True) if not here]

    def runs(self) -> list[RunInfo]:
        keys = [m["path"] for m in self._list(RUNS)]
        names = sorted(k[len(RUNS) : -len(".json")] for k in keys if k.endswith(".json"))
        found = self._map(self.run, names)
        return [r for r in found if r is not None]

    def run(self, run: str) -> RunInfo | None:
        current = self._counter(run)
        return current[0].info(run) if current else None

    def run_blobs(self, run: str, *, limit: int, cursor: str | None) -> RunBlobPage | None:
        if self._counter(run) is None and not self._links_exist(run):
            return None
        offset = link_offset(run, cursor) if cursor else None
        blobs: list[BlobInfo] = []
        more = False
        for meta in self._list(link_prefix(run), offset):
            if len(blobs) == limit:
                more = True
                break
            blobs.append(parse_link(meta["path"])[1])
        return RunBlobPage(run=run, blobs=blobs, next_cursor=blobs[-1].digest if more else None)

    def _links_exist(self, run: str) -> bool:
        return next(self._list(link_prefix(run)), None) is not None

    def delete_run(self, run: str) -> RunDeleted | None:
        if self._counter(run) is None and not self._links_exist(run):
            return None
        keys = [m["path"] for m in self._list(link_prefix(run))]
        hexes = [digest_hex(parse_link(k)[1].digest) for k in keys]
        # links before refs: an interrupted delete leaves refs (blobs kept), never the reverse
        for i in range(0, len(keys), 1000):
            obstore.delete(self.store, keys[i : i + 1000])
        refs = [ref_key(h, run) for h in hexes]
        for i in range(0, len(refs), 1000):
            obstore.delete(self.store, refs[i : i + 1000])
        obstore.delete(self.store, run_key(run))
        self._counters.discard(run)
        if len(hexes) > _REFS_BY_LISTING:
            referenced = {m["path"].split("/")[1] for m in self._list(REFS)}
            orphans = [h for h in hexes if h not in referenced]
        else:
            orphans = [h for h, ref in zip(hexes, self._map(self._has_refs, hexes), strict=True) if not ref]
        # orphans get the whole grace period from now, as in the local backend
        self._map(lambda h: self.guards.claim(h, refresh=True), orphans)
        return RunDeleted(run=run, unlinked=len(keys), orphaned=len(orphans))

    def gc(self, grace_seconds: float) -> GcReport:
        """Mark (list every ref) and sweep (each unreferenced blob through its guard)."""
        cutoff = time.time() - grace_seconds
        referenced = {m["path"].split("/")[1] for m in self._list(REFS)}
        blobs = {m["path"][len(BLOBS) :]: m for m in self._list(BLOBS)}
        candidates = [m for h, m in blobs.items() if h not in referenced]

        def collect(meta: dict[str, Any]) -> str:
            hexd = meta["path"][len(BLOBS) :]
            mtime = meta["last_modified"].timestamp()
            return self.guards.collect(hexd, mtime, cutoff, lambda: self._has_refs(hexd))

        outcomes = self._map(collect, candidates)
        deleted = [m for m, o in zip(candidates, outcomes, strict=True) if o == "deleted"]
        # guards whose blob never came (a claim for an upload that failed) or is gone
        stray = [m["path"][len(guard_key("")) :] for m in self._list(guard_key(""))]
        self._map(lambda h: self._drop_stray_guard(h, cutoff), [h for h in stray if h not in blobs])
        # markers whose blob never came (its upload died) or is gone: a marker is only ever a
        # shortcut (a blob without one is checked before it is linked), so dropping one is safe
        markers = [
            m["path"]
            for m in self._list(VERIFIED)
            if m["path"][len(VERIFIED) :] not in blobs and m["last_modified"].timestamp() <= cutoff
        ]
        for i in range(0, len(markers), 1000):
            obstore.delete(self.store, markers[i : i + 1000])
        return GcReport(
            deleted=len(deleted),
            bytes_freed=sum(m["size"] for m in deleted),
            garbage_in_grace=outcomes.count("in_grace"),
            grace_seconds=grace_seconds,
        )

    def _drop_stray_guard(self, hexd: str, cutoff: float) -> None:
        """A guard without a blob, unused for the grace period, is deleted (a racing writer's
        verify then fails and it claims afresh, so this is safe at any moment)."""
        guard = self.guards.read(hexd)
        if guard is not None and guard.used_at <= cutoff and guard.changed_at <= cutoff:
            obstore.delete(self.store, guard_key(hexd))

    def fsck(self, *, quarantine: bool, progress: Callable[[int], None] | None = None) -> FsckReport:
        """Re-hash every blob, report links to absent blobs, and recount every run.

        ``quarantine`` moves a corrupt blob to ``quarantine/`` and unlinks it from every run, so
        clients get 404 (and upload again), never bad bytes. Counts are set from a listing of the
        links, so run fsck while uploads are quiet: a link made meanwhile may go uncounted (and one
        made to a corrupt digest during its quarantine may be lost).
        """
        blobs = {m["path"][len(BLOBS) :]: m["size"] for m in self._list(BLOBS)}

        def check(hexd: str) -> str | None:
            hasher = DigestHasher()
            try:
                for chunk in obstore.get(self.store, blob_key(hexd)).stream(min_chunk_size=1 << 20):
                    hasher.update(chunk)
            except FileNotFoundError:
                return None  # collected since the listing
            if progress:
                progress(blobs[hexd])
            return None if hasher.digest() == f"blake3:{hexd}" else hexd

        corrupt = sorted(h for h in self._map(check, sorted(blobs)) if h)
        if quarantine:
            for hexd in corrupt:
                self._quarantine(hexd)
        refs: dict[str, list[str]] = {}
        for m in self._list(REFS):
            hexd, run = m["path"][len(REFS) :].split("/", 1)
            refs.setdefault(hexd, []).append(run)
        missing = sorted(f"blake3:{h}" for h in refs if h not in blobs)
        return FsckReport(
            checked=len(blobs),
            corrupt=[f"blake3:{h}" for h in corrupt],
            missing=missing,
            recounted=self._recount_all(),
        )

    def _quarantine(self, hexd: str) -> None:
        if self._head(hexd) is None:
            return
        obstore.copy(self.store, blob_key(hexd), QUARANTINE + hexd)
        self._withdraw(hexd)

    def _recount_all(self) -> list[str]:
        """Set every run's counter to what its links say; the runs whose counter was wrong."""
        actual: dict[str, tuple[int, int]] = {}
        for m in self._list(LINKS):
            run, info = parse_link(m["path"])
            count, size = actual.get(run, (0, 0))
            actual[run] = (count + 1, size + info.size)
        names = {m["path"][len(RUNS) : -len(".json")] for m in self._list(RUNS)}
        runs = sorted(names | set(actual))
        wrong = self._map(lambda run: self._set_count(run, *actual.get(run, (0, 0))), runs)
        return [run for run, was_wrong in zip(runs, wrong, strict=True) if was_wrong]

    def _set_count(self, run: str, count: int, size: int) -> bool:
        """CAS the run's counter to ``count`` blobs of ``size`` bytes; whether it said otherwise."""
        wrong = False

        def recount(c: RunCounter) -> RunCounter | None:
            nonlocal wrong
            if (c.blob_count, c.bytes) == (count, size):
                return None
            wrong = True
            return RunCounter(count, size, c.created_at, time.time())

        self._update_counter(run, recount)
        return wrong

    def check_writable(self) -> None:
        probe = f"readyz/{uuid.uuid4().hex}"
        obstore.put(self.store, probe, b"ok", use_multipart=False)
        obstore.delete(self.store, probe)
