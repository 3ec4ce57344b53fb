"""``mmstore-inference`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="mmstore-inference: vLLM pulling images from mmstore by digest", no_args_is_help=True)


@app.callback()
def main() -> None:
    """mmstore inference service."""


@app.command()
def serve(
    model: Annotated[
        Path | None, typer.Option(help="checkpoint folder [env MMSTORE_INFERENCE_MODEL]")
    ] = None,
    store: Annotated[str | None, typer.Option(help="mmstore URL [env MMSTORE_INFERENCE_STORE]")] = None,
    host: Annotated[str | None, typer.Option(help="bind address [env MMSTORE_INFERENCE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [env MMSTORE_INFERENCE_PORT, default 8800]")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM max_model_len")] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vLLM memory fraction (RAM on CPU)")
    ] = None,
    enforce_eager: Annotated[bool | None, typer.Option(help="no CUDA graphs / torch.compile")] = None,
    dtype: Annotated[str | None, typer.Option(help="vLLM dtype")] = None,
    log_level: Annotated[str, typer.Option(help="log level")] = "info",
) -> None:
    """Run the service (the engine starts before the port answers /readyz).

    Exits 1 with the reason if the engine cannot start; /readyz says why meanwhile.
    """
    import uvicorn

    from .app import create_app
    from .settings import InferenceSettings

    flags = dict(
        model=model,
        store=store,
        host=host,
        port=port,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        dtype=dtype,
    )
    settings = InferenceSettings(**{k: v for k, v in flags.items() if v is not None})
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    failure: list[str] = []

    def engine_failed(reason: str) -> None:
        failure.append(reason)
        server.should_exit = True  # uvicorn's own graceful shutdown, then the exit status below

    app_ = create_app(settings, on_engine_failure=engine_failed)
    config = uvicorn.Config(
        app_, host=settings.host, port=settings.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    server.run()
    if failure:
        typer.echo(
            f"mmstore-inference: the vLLM engine could not start for {settings.model}: {failure[0]} "
            "(the log above has vLLM's own account; check the checkpoint folder and the memory settings)",
            err=True,
        )
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
