"""The ``vlmlab`` Typer application every command module adds its commands to."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="vlmlab: adapt black-box vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
