"""``mmstore-smoke``: the main job, and the local stack without Docker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="mmstore's main job: a multi-turn visual RL loop on the local stack", no_args_is_help=True
)


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="run folder (samples, summary, checkpoint, service logs)")] = Path(
        "runs/smoke"
    ),
    model: Annotated[
        Path | None,
        typer.Option(
            help="model folder [default: tiny Qwen2-VL, built if absent]", envvar="MMSTORE_SMOKE_MODEL"
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(help="use this mmstore instead of starting one", envvar="MMSTORE_SMOKE_STORE"),
    ] = None,
    inference: Annotated[
        str | None,
        typer.Option(
            help="use this inference service instead of starting one", envvar="MMSTORE_SMOKE_INFERENCE"
        ),
    ] = None,
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            help="inference replicas to start; more than 1: behind nginx (apt-get install -y nginx)",
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="inference: start mmstore-inference; vllm-serve: start stock vLLM's server with the "
            "mmstore-vllm plugin and drive its /inference/v1/generate with content_parts refs",
            envvar="MMSTORE_SMOKE_ENGINE",
        ),
    ] = "inference",
    inference_replica: Annotated[
        list[str] | None,
        typer.Option(
            "--inference-replica",
            metavar="URL",
            help="use this running inference replica (repeat it; nginx is started in front of them)",
        ),
    ] = None,
    affinity: Annotated[
        bool,
        typer.Option(
            help="send each group's id as X-Mmstore-Affinity (nginx: consistent hashing); "
            "--no-affinity: round-robin"
        ),
    ] = True,
    groups: Annotated[int, typer.Option(help="GRPO groups (environment seeds)")] = 6,
    group_size: Annotated[int, typer.Option(help="samples per group (n)")] = 4,
    turns: Annotated[int, typer.Option(help="turns per rollout (one new picture each)")] = 3,
    workers: Annotated[int, typer.Option(help="concurrent rollout workers")] = 3,
    max_tokens: Annotated[int, typer.Option(help="tokens per completion")] = 8,
    train_steps: Annotated[int, typer.Option(help="trainer steps")] = 3,
    env: Annotated[
        str,
        typer.Option(
            help="environment: shapes (count shapes) or click (click the red shape with a tool call)",
            envvar="MMSTORE_SMOKE_ENV",
        ),
    ] = "shapes",
) -> None:
    """Run the loop end to end and print the summary; exit 1 if an invariant is broken."""
    from .env import ENVS
    from .smoke import SmokeConfig, SmokeFailed, run_smoke
    from .stack import ServiceFailed
    from .summary import console, print_summary

    if env not in ENVS:
        raise typer.BadParameter(f"--env must be one of {', '.join(ENVS)}")
    if inference and (replicas > 1 or inference_replica):
        raise typer.BadParameter("give either --inference or --replicas / --inference-replica, not both")
    if inference_replica and replicas > 1:
        raise typer.BadParameter(
            "--replicas starts replicas; --inference-replica uses running ones: pick one"
        )
    if engine not in ("inference", "vllm-serve"):
        raise typer.BadParameter(f"--engine {engine!r}: use inference or vllm-serve")
    if engine == "vllm-serve" and (replicas > 1 or inference_replica):
        raise typer.BadParameter("--engine vllm-serve starts one stock vLLM server: no replicas")
    cfg = SmokeConfig(
        engine=engine,
        out=out,
        model=model,
        store=store,
        inference=inference,
        replicas=replicas,
        replica_urls=list(inference_replica or []),
        affinity=affinity,
        groups=groups,
        group_size=group_size,
        turns=turns,
        workers=workers,
        max_tokens=max_tokens,
        train_steps=train_steps,
        env=env,
    )
    try:
        summary = run_smoke(cfg)
    except (SmokeFailed, ServiceFailed) as exc:
        console.print(f"[red]smoke run failed:[/red] {exc}")
        raise typer.Exit(2) from None
    print_summary(summary, out)
    if summary.placeholder_mismatches or summary.processed_payloads:
        raise typer.Exit(1)


@app.command()
def up(
    out: Annotated[Path, typer.Option(help="folder for data and logs")] = Path("runs/stack"),
    model: Annotated[Path | None, typer.Option(help="model folder [default: tiny Qwen2-VL]")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="inference replicas; more than 1: behind nginx")] = 1,
) -> None:
    """Start mmstore and the inference service in the background (stop with `down`)."""
    from mmstore_trainer.tiny_model import ensure_default_tiny_model

    from .balancer import balancer_service
    from .stack import Stack, inference_replicas, store_service, wait_ready, write_state

    model = model or ensure_default_tiny_model()
    stack = Stack(out)
    try:
        store = stack.start(store_service(out, root=out / "store-data"))
        started = [stack.start(s) for s in inference_replicas(model, store.url, out, replicas)]
        if replicas > 1:
            stack.start(balancer_service([s.url for s in started], out))
        wait_ready(stack.services, 420)
    except BaseException:
        stack.stop()
        raise
    write_state(stack.services)
    for service in stack.services:
        typer.echo(f"{service.name}: {service.url} (log {service.log})")


@app.command()
def down() -> None:
    """Stop what `up` started."""
    from .stack import stop_state

    typer.echo(f"stopped: {', '.join(stop_state()) or 'nothing'}")
