"""``mmstore`` command line: serve, fsck, gc."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .settings import Settings

app = typer.Typer(help="mmstore: content-addressed, run-scoped image asset store", no_args_is_help=True)
console = Console(stderr=True)


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def _settings(**flags) -> Settings:
    """Flags given on the command line win over MMSTORE_* env vars, which win over defaults."""
    return Settings(**{k: v for k, v in flags.items() if v is not None})


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="bind address [env MMSTORE_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port [env MMSTORE_PORT, default 8700]")] = None,
    root: Annotated[
        Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT, default ./data]")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes [env MMSTORE_WORKERS]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the HTTP service."""
    import uvicorn

    settings = _settings(host=host, port=port, root=root, workers=workers)
    if not settings.token_scopes() and not is_loopback(settings.host):
        console.print(
            f"[red]refusing to bind {settings.host}: no tokens are configured, so every scope "
            "would be open. Set MMSTORE_TOKENS or MMSTORE_TOKENS_FILE, or bind 127.0.0.1.[/red]"
        )
        raise typer.Exit(2)
    settings.root.mkdir(parents=True, exist_ok=True)
    console.print(
        f"mmstore on http://{settings.host}:{settings.port} root={settings.root.resolve()} "
        f"workers={settings.workers} auth={'tokens' if settings.token_scopes() else 'open (loopback)'}"
    )
    # Workers are separate processes that read their settings from the environment.
    os.environ.update(
        {
            "MMSTORE_ROOT": str(settings.root.resolve()),
            "MMSTORE_HOST": settings.host,
            "MMSTORE_PORT": str(settings.port),
        }
    )
    uvicorn.run(
        "mmstore.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=log_level,
        access_log=False,
    )


@app.command()
def fsck(
    root: Annotated[Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT]")] = None,
    quarantine: Annotated[
        bool, typer.Option(help="move corrupt blobs to quarantine/ and forget them")
    ] = False,
) -> None:
    """Re-hash every blob; report (and optionally quarantine) those whose bytes no longer match."""
    from .storage.local import LocalStorage

    storage = LocalStorage(_settings(root=root).root)
    total = sum(r.bytes for r in storage.runs()) or None
    with Progress(
        TextColumn("fsck"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("fsck", total=total)
        report = storage.fsck(quarantine=quarantine, progress=lambda n: progress.advance(task, n))
    console.print(
        f"checked {report.checked} blobs: {len(report.corrupt)} corrupt, {len(report.missing)} missing"
    )
    for d in report.corrupt:
        console.print(f"corrupt{' (quarantined)' if quarantine else ''}: {d}")
    for d in report.missing:
        console.print(f"missing: {d}")
    if report.corrupt or report.missing:
        raise typer.Exit(1)


@app.command()
def gc(
    root: Annotated[Path | None, typer.Option(help="storage directory [env MMSTORE_ROOT]")] = None,
    grace_seconds: Annotated[float | None, typer.Option(help="keep garbage younger than this")] = None,
) -> None:
    """Delete unreferenced blobs older than the grace period (offline; the API has POST /v1/gc)."""
    from .storage.local import LocalStorage

    settings = _settings(root=root, gc_grace_seconds=grace_seconds)
    report = LocalStorage(settings.root).gc(settings.gc_grace_seconds)
    console.print_json(report.model_dump_json())
