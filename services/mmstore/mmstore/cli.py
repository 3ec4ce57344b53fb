"""``mmstore`` command line: serve, fsck, gc."""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .settings import Settings
from .storage import Storage, open_storage

app = typer.Typer(help="mmstore: content-addressed, run-scoped image asset store", no_args_is_help=True)
console = Console(stderr=True)


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


_STORAGE_HELP = (
    "s3://BUCKET or s3://BUCKET/PREFIX: an S3-compatible bucket instead of --root (AWS_* env vars, "
    "AWS_ENDPOINT_URL included) [env MMSTORE_STORAGE]"
)


def _settings(**flags) -> Settings:
    """Flags given on the command line win over MMSTORE_* env vars, which win over defaults."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(map(str, err["loc"]))  # empty for a check across fields
            console.print(f"{where}: {err['msg']}" if where else err["msg"], style="red", markup=False)
        raise typer.Exit(2) from None


def _open_storage(settings: Settings) -> Storage:
    """The configured backend, checked writable: a bucket that is absent or refuses us exits 2."""
    try:
        storage = open_storage(settings)
        storage.check_writable()
    except Exception as exc:
        where = settings.storage or settings.root
        console.print(
            f"[red]cannot write to {where}: {exc}[/red]\n"
            "For s3:// check that the bucket exists and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_REGION / AWS_ENDPOINT_URL are set for it."
        )
        raise typer.Exit(2) from None
    return storage


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="bind address [env MMSTORE_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port [env MMSTORE_PORT, default 8700]")] = None,
    root: Annotated[
        Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT, default ./data]")
    ] = None,
    storage: Annotated[str | None, typer.Option(help=_STORAGE_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes [env MMSTORE_WORKERS]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the HTTP service."""
    import uvicorn

    from .timeouts import HeadTimeoutProtocol
    from .workers import serve as serve_workers

    settings = _settings(host=host, port=port, root=root, storage=storage, workers=workers)
    if not settings.token_scopes() and not is_loopback(settings.host):
        console.print(
            f"[red]refusing to bind {settings.host}: no tokens are configured, so every scope "
            "would be open. Set MMSTORE_TOKENS or MMSTORE_TOKENS_FILE, or bind 127.0.0.1.[/red]"
        )
        raise typer.Exit(2)
    # Open the storage once here: a bucket that cannot be used fails now, naming the fix, rather
    # than in every request; a local index is created (schema, WAL mode) before workers race to.
    _open_storage(settings)
    where = f"storage={settings.storage}" if settings.storage else f"root={settings.root.resolve()}"
    console.print(
        f"mmstore on http://{settings.host}:{settings.port} {where} "
        f"workers={settings.workers} auth={'tokens' if settings.token_scopes() else 'open (loopback)'}"
    )
    # Workers are separate processes that read their settings from the environment.
    os.environ.update(
        {
            "MMSTORE_ROOT": str(settings.root.resolve()),
            "MMSTORE_HOST": settings.host,
            "MMSTORE_PORT": str(settings.port),
            "MMSTORE_STORAGE": settings.storage or "",
        }
    )
    config = uvicorn.Config(
        "mmstore.app:serving_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=log_level,
        access_log=False,
        http=functools.partial(HeadTimeoutProtocol, head_timeout=settings.head_timeout_seconds),
        timeout_keep_alive=settings.keepalive_timeout_seconds,
    )
    serve_workers(config)


@app.command()
def fsck(
    root: Annotated[Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT]")] = None,
    storage: Annotated[str | None, typer.Option(help=_STORAGE_HELP)] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            "--quarantine",
            help="move corrupt blobs to quarantine/ and forget them; remove orphans (local storage)",
        ),
    ] = False,
) -> None:
    """Re-hash every blob; report (and with --repair mend) bytes that no longer match, and (local
    storage) orphans: files in blobs/ that no index row names, left by an upload killed mid-way."""
    backend = _open_storage(_settings(root=root, storage=storage))
    total = sum(r.bytes for r in backend.runs()) or None
    with Progress(
        TextColumn("fsck"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("fsck", total=total)
        report = backend.fsck(quarantine=repair, progress=lambda n: progress.advance(task, n))
    console.print(
        f"checked {report.checked} blobs: {len(report.corrupt)} corrupt, {len(report.missing)} missing, "
        f"{len(report.orphans)} orphans"
    )
    for d in report.corrupt:
        console.print(f"corrupt{' (quarantined)' if repair else ''}: {d}")
    for d in report.missing:
        console.print(f"missing: {d}")
    for d in report.orphans:
        console.print(f"orphan{' (removed)' if repair else ''}: {d}", soft_wrap=True)
    for run in report.recounted:
        console.print(f"recounted run {run} (its blob count or bytes were off; repaired)")
    if report.corrupt or report.missing or report.orphans:
        raise typer.Exit(1)


@app.command()
def gc(
    root: Annotated[Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT]")] = None,
    storage: Annotated[str | None, typer.Option(help=_STORAGE_HELP)] = None,
    grace_seconds: Annotated[float | None, typer.Option(help="keep garbage younger than this")] = None,
) -> None:
    """Delete unreferenced blobs older than the grace period (offline; the API has POST /v1/gc)."""
    settings = _settings(root=root, storage=storage, gc_grace_seconds=grace_seconds)
    report = _open_storage(settings).gc(settings.gc_grace_seconds)
    console.print_json(report.model_dump_json())
