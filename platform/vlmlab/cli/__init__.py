"""The ``vlmlab`` command line: one Typer app, its commands in small modules by purpose.

``_models`` (zeroshot, pretrain, the registries), ``_runs`` (validate, run,
sweep, study, report), ``_serve`` (serve, keys); ``_common`` holds what they
share.
"""

from __future__ import annotations

from vlmlab.cli import _models, _runs, _serve  # noqa: F401 - they add their commands to app
from vlmlab.cli._app import app
from vlmlab.cli._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, default_results


def main() -> None:
    app()


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "app", "default_results", "main"]
