"""Commands about models and registries: `zeroshot`, `pretrain tiny-clip`, `backends`, `tasks`, `datasets`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    pass

from vlmlab.cli._app import app
from vlmlab.cli._common import (
    _fail,
    _weights_named,
)


@app.command()
def zeroshot(
    backend: Annotated[str, typer.Option(help="'conse' or 'open_clip:<architecture>'")] = "conse",
    pretrained: Annotated[
        str | None, typer.Option(help="open_clip pretrained tag or checkpoint file")
    ] = None,
    dataset: Annotated[str, typer.Option(help="a name from `vlmlab datasets`")] = "fashion-mnist",
    split: Annotated[str, typer.Option()] = "test",
    root: Annotated[
        str | None, typer.Option(help="dataset folder (imagefolder, or overrides)")
    ] = None,
    n: Annotated[int, typer.Option(help="class-balanced subset size (0: whole split)")] = 500,
    seed: Annotated[int, typer.Option()] = 0,
    prompt: Annotated[
        str, typer.Option(help="context words before the class name")
    ] = "a photo of a",
) -> None:
    """Zero-shot accuracy of a hand-written prompt (the baseline every method beats)."""
    from rich.console import Console
    from rich.table import Table

    from vlmlab.data import load_dataset, stratified_subset
    from vlmlab.methods import zero_shot
    from vlmlab.oracle import create_oracle

    _weights_named(backend, pretrained, "--pretrained")
    console = Console()
    options = {"root": root} if root else {}
    data = load_dataset(dataset, split, **options)
    if n:
        data = data.subset(stratified_subset(data.labels, n, seed))
    kwargs = {"pretrained": pretrained} if pretrained else {}
    with console.status(f"loading {backend} and encoding {len(data)} images..."):
        oracle = create_oracle(backend, **kwargs)
        result = zero_shot(oracle, data, prompt=prompt)
    table = Table(
        title=f"Zero-shot: {result.backend} {result.model} on {result.dataset}/{result.split}"
    )
    table.add_column("class")
    table.add_column("accuracy (%)", justify="right")
    for name, acc in result.per_class_accuracy.items():
        table.add_row(name, f"{acc * 100:.2f}")
    console.print(table)
    console.print(
        f"backend={result.backend} model={result.model} dataset={result.dataset} "
        f"split={result.split} n={result.n_images} prompt={result.prompt!r} "
        f"accuracy={result.accuracy * 100:.2f}% chance={result.chance * 100:.2f}%"
    )


pretrain_app = typer.Typer(help="Train models offline: `vlmlab pretrain tiny-clip`.")
app.add_typer(pretrain_app, name="pretrain")


@pretrain_app.command("tiny-clip")
def pretrain_tiny_clip_command(
    epochs: Annotated[int, typer.Option()] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    hold_out: Annotated[
        list[str] | None,
        typer.Option(help="a class never named in captions (repeat for more): a weak class"),
    ] = None,
    force: Annotated[bool, typer.Option(help="train again even if the cache has it")] = False,
) -> None:
    """Train a small CLIP (open_clip ViT + text transformer) on Fashion-MNIST, offline.

    A CLIP trained here, not OpenAI's: use it as
    `backend: {name: open_clip:vlmlab-tiny-fmnist, pretrained: <printed path>}`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vlmlab.pretrain import PretrainConfig, pretrain_tiny_clip

    console = Console()
    try:
        config = PretrainConfig(epochs=epochs, seed=seed, hold_out=tuple(hold_out or ()))
    except ValueError as error:
        raise _fail(str(error)) from error
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"training {config.name}", total=None, loss="")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")

        try:
            result = pretrain_tiny_clip(config, force=force, progress=progress)
        except ValueError as error:
            raise _fail(str(error)) from error
    manifest = result.manifest
    console.print(
        f"{result.checkpoint}\n{config.name}: zero-shot accuracy "
        f"{manifest['zero_shot_test_accuracy'] * 100:.2f} % on the {manifest['dataset']} test split "
        f'("a photo of a {{}}."); trained in {manifest["wall_seconds"]:.0f} s '
        "(a CLIP trained here on Fashion-MNIST, not OpenAI's CLIP)\n"
        f"backend: {{name: {result.backend}, pretrained: {result.checkpoint}}}"
    )


@app.command()
def backends() -> None:
    """List the oracle backends."""
    from vlmlab.oracle import list_backends

    for name, text in list_backends().items():
        typer.echo(f"{name:12s} {text}")


@app.command()
def tasks() -> None:
    """List the registered tasks and their methods."""
    from vlmlab.tasks import iter_tasks

    for task in iter_tasks():
        kind = "white-box" if task.white_box else "black-box"
        typer.echo(f"{task.name:12s} {task.title} ({kind}): {', '.join(task.variants)}")


@app.command()
def datasets() -> None:
    """List the registered datasets."""
    from vlmlab.data import list_datasets

    for name, text in list_datasets().items():
        typer.echo(f"{name:14s} {text}")
