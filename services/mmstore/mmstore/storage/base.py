"""The storage interface: everything the routes need, nothing backend-specific.

A backend stores immutable blobs by digest and the run -> blob links that keep them alive.
Blobs no live run links become garbage; :meth:`Storage.gc` deletes garbage older than a grace
period. Implementations must make ``put`` atomic (no partial blob ever visible) and race-free
(concurrent puts of one digest end with one blob), and must serialise ``put``'s existence check
against ``gc``'s deletion so a blob being (re)linked is never deleted.

Backends: :mod:`.local` (a directory with a SQLite index) and :mod:`.s3` (any S3-compatible
bucket, shared by any number of replicas); :func:`mmstore.storage.open_storage` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from mmstore_client.models import BlobInfo, GcReport, RunBlobPage, RunDeleted, RunInfo

Check = Callable[[], object]  # raises if the bytes must not be kept (see Storage.put)


@dataclass(frozen=True, slots=True)
class PutResult:
    info: BlobInfo
    created: bool  # False: the blob already existed (it is linked to the run all the same)


@dataclass(frozen=True, slots=True)
class FsckReport:
    checked: int
    corrupt: list[str]  # digests whose bytes no longer match (quarantined when asked)
    missing: list[str]  # indexed digests whose bytes are gone
    orphans: list[str] = field(default_factory=list)  # stored bytes no index names (removed on repair)
    recounted: list[str] = field(default_factory=list)  # runs whose blob count / bytes were repaired


class Storage(ABC):
    #: Reads cross the network (an object store). :class:`~mmstore.blob_read.BlobReader` then looks
    #: blobs up in a worker thread and sends bytes from :meth:`open_stream` (never blocking the event
    #: loop, never buffering a whole blob). Local backends leave it False and are read with :meth:`read`.
    remote: ClassVar[bool] = False

    @abstractmethod
    def put(
        self, run: str, digest: str, data: bytes, info: BlobInfo, *, check: Check | None = None
    ) -> PutResult:
        """Store ``data`` under ``digest`` (if absent) and link it to ``run``.

        ``check`` (the full decode) raises if the bytes must not be kept. It is called before the
        blob is linked anywhere: a local backend calls it before writing; a remote one may store
        the bytes first, so the check overlaps the upload, and withdraws them if it raises (unless
        a run links them: see that backend).
        """

    @abstractmethod
    def link_existing(self, run: str, digest: str, *, check: Check | None = None) -> BlobInfo | None:
        """Link an already stored blob to ``run`` without its bytes; None when it is absent.

        ``check``, where given, is called once the blob is found, before it is linked (see
        :meth:`put`; a remote backend withdraws bytes it rejects only when no run links them).
        """

    @abstractmethod
    def info(self, digest: str) -> BlobInfo | None: ...

    def exists(self, digest: str) -> bool:
        """Whether the blob is still stored: checked before a cached HEAD or 304 is answered."""
        return self.info(digest) is not None

    async def info_async(self, digest: str) -> BlobInfo | None:
        """:meth:`info` on the event loop with no thread, for ``remote`` backends."""
        raise NotImplementedError(f"{type(self).__name__} is looked up with info()")

    @abstractmethod
    def read(self, digest: str, start: int, length: int) -> bytes:
        """``length`` bytes of the blob from ``start``; FileNotFoundError when it is gone."""

    async def open_stream(self, digest: str, start: int, length: int) -> AsyncIterator[bytes]:
        """The same bytes as :meth:`read`, as chunks, for ``remote`` backends.

        The backend's response has started when this returns, so a blob that is gone raises
        FileNotFoundError here, before the HTTP response is begun.
        """
        raise NotImplementedError(f"{type(self).__name__} is read with read()")

    async def presign(self, digest: str, ttl_seconds: int) -> str:
        """A URL the client can GET the blob's bytes from, without credentials, for ``ttl_seconds``.

        Remote backends that can sign (S3).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot presign URLs")

    @abstractmethod
    def missing(self, digests: list[str]) -> list[str]: ...

    @abstractmethod
    def runs(self) -> list[RunInfo]: ...

    @abstractmethod
    def run(self, run: str) -> RunInfo | None: ...

    @abstractmethod
    def run_blobs(self, run: str, *, limit: int, cursor: str | None) -> RunBlobPage | None: ...

    @abstractmethod
    def delete_run(self, run: str) -> RunDeleted | None: ...

    @abstractmethod
    def gc(self, grace_seconds: float) -> GcReport: ...

    @abstractmethod
    def fsck(self, *, quarantine: bool, progress: Callable[[int], None] | None = None) -> FsckReport:
        """Re-hash every blob (``progress(size)`` after each); repair what can be repaired."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise if the backend cannot take writes now (used by /readyz)."""
