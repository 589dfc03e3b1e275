"""The ``vlmlab`` command line."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="vlmlab: adapt black-box vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    table.add_column("accuracy", justify="right")
    for name, acc in result.per_class_accuracy.items():
        table.add_row(name, f"{acc:.3f}")
    console.print(table)
    console.print(
        f"backend={result.backend} model={result.model} dataset={result.dataset} "
        f"split={result.split} n={result.n_images} prompt={result.prompt!r} "
        f"accuracy={result.accuracy:.3f} chance={result.chance:.3f}"
    )


@app.command()
def backends() -> None:
    """List the oracle backends."""
    from vlmlab.oracle import list_backends

    for name, text in list_backends().items():
        typer.echo(f"{name:12s} {text}")


@app.command()
def datasets() -> None:
    """List the registered datasets."""
    from vlmlab.data import list_datasets

    for name, text in list_datasets().items():
        typer.echo(f"{name:14s} {text}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
