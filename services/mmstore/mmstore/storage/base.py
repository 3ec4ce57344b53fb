"""The storage interface: everything the routes need, nothing backend-specific.

A backend stores immutable blobs by digest and the run -> blob links that keep them alive.
Blobs no live run links become garbage; :meth:`Storage.gc` deletes garbage older than a grace
period. Implementations must make ``put`` atomic (no partial blob ever visible) and race-free
(concurrent puts of one digest end with one blob), and must serialise ``put``'s existence check
against ``gc``'s deletion so a blob being (re)linked is never deleted.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from mmstore_client.models import BlobInfo, GcReport, RunBlobPage, RunDeleted, RunInfo

RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class PutResult:
    info: BlobInfo
    created: bool  # False: the blob already existed (it is linked to the run all the same)


@dataclass(frozen=True, slots=True)
class FsckReport:
    checked: int
    corrupt: list[str]  # digests whose bytes no longer match (quarantined when asked)
    missing: list[str]  # indexed digests whose bytes are gone


class Storage(ABC):
    @abstractmethod
    def put(self, run: str, digest: str, data: bytes, info: BlobInfo) -> PutResult:
        """Store verified ``data`` under ``digest`` (if absent) and link it to ``run``."""

    @abstractmethod
    def link_existing(self, run: str, digest: str) -> BlobInfo | None:
        """Link an already stored blob to ``run`` without its bytes; None when it is absent."""

    @abstractmethod
    def info(self, digest: str) -> BlobInfo | None: ...

    @abstractmethod
    def read(self, digest: str, start: int, length: int) -> bytes:
        """``length`` bytes of the blob from ``start``; FileNotFoundError when it is gone."""

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
    def fsck(self, *, quarantine: bool) -> FsckReport: ...

    @abstractmethod
    def check_writable(self) -> None:
        """Raise if the backend cannot take writes now (used by /readyz)."""
