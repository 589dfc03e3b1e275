"""What the commands share: exit codes, failures, spec loading, results folders, tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from vlmlab.storage import Location


_TRACK_OPTION = typer.Option(
    "--track",
    help="also send metrics to mlflow and/or tensorboard (repeatable; the spec's `tracking:`)",
)


def _track_overrides(track: list[str] | None) -> list[str]:
    """``--track mlflow --track tensorboard`` as spec overrides."""
    overrides = []
    for name in track or []:
        if name not in ("mlflow", "tensorboard"):
            raise _fail(f"--track {name!r}: choose mlflow or tensorboard")
        overrides.append(f"tracking.{name}=true")
    return overrides


def _print_tracking(console: Any, spec: Any, results: str) -> None:
    if spec.tracking is None or not spec.tracking.enabled:
        return
    from vlmlab.tracking import mlflow_uri, tensorboard_dir

    location = _results_location(results)
    places = []
    uri = mlflow_uri(spec.tracking, location)
    if uri is not None:
        places.append(f"MLflow {uri} (experiment {spec.tracking.experiment or spec.name!r})")
    folder = tensorboard_dir(spec.tracking, location)
    if folder is not None:
        places.append(f"TensorBoard {folder}")
    console.print("tracking: " + "; ".join(places), soft_wrap=True)


def _results_location(results: str) -> Location:
    """``--results`` as a :class:`vlmlab.storage.Location` (a path or a URI)."""
    from vlmlab.storage import locate

    try:
        return locate(results)
    except ValueError as error:
        raise _fail(str(error)) from None


@contextmanager
def _report_folder(root: Location) -> Iterator[tuple[Path, str]]:
    """A local folder for report files and the name they get under ``root/report``.

    Plots are drawn to local files; for results on an object store they are
    written to a temporary folder and uploaded (each upload atomic) on exit.
    """
    import tempfile

    target = root / "report"
    if target.is_local:
        yield target.local_path, str(target)
        return
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder), str(target)
        for path in sorted(Path(folder).iterdir()):
            (target / path.name).write_bytes(path.read_bytes())


EXIT_USAGE = 2
"""Exit status of a usage or spec error (nothing ran)."""
EXIT_FAILED = 1
"""Exit status of a run that started and failed."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells expect."""


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    # soft_wrap: a message is never broken at the terminal's width, so a path or a
    # field name in it stays greppable whatever the console is.
    console = Console(stderr=True, soft_wrap=True)
    # Text, not markup: a message quoting a list like [1, 2] prints as it is.
    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    return typer.Exit(code=code)


@contextmanager
def _run_failures() -> Iterator[None]:
    """What a started run's failures become: trials' tracebacks and exit 1, Ctrl-C exit 130.

    A spec or usage problem found before anything started exits 2 instead
    (:func:`_load_checked`); a failure here is the run's own.
    """
    import traceback

    from vlmlab.errors import TrialsFailedError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise _fail(
            "interrupted; completed trials are in the results, --resume continues the rest",
            EXIT_INTERRUPTED,
        ) from None
    except TrialsFailedError as error:
        import sys

        for run_id, trace in error.failures:
            print(f"--- trial {run_id} failed:\n{trace.rstrip()}", file=sys.stderr)
        raise _fail(str(error), EXIT_FAILED) from None
    except Exception as error:
        traceback.print_exc()
        raise _fail(f"the run failed: {type(error).__name__}: {error}", EXIT_FAILED) from None


def _load_checked(
    spec: str, overrides: list[str], results: str | None, *, section: str | None = None
) -> tuple[Any, str, Any]:
    """Load and check a spec the way ``vlmlab validate`` does, before Ray starts: exit 2
    listing every problem. Returns the spec and its results folder (default
    ``results/<spec name>``) and what the checks found (``vlmlab.specs.Preflight``)."""
    from vlmlab.errors import VlmlabError
    from vlmlab.specs import load_spec, preflight

    try:
        loaded = load_spec(spec, overrides)
    except (VlmlabError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if section is not None and getattr(loaded, section) is None:
        example = {"sweep": "sweep-quickstart.yaml", "study": "study-budget.yaml"}[section]
        raise _fail(f"{spec}: no `{section}:` section (see experiments/{example})")
    folder = results or default_results(loaded)
    found = preflight(loaded, folder)
    if not found.ok:
        lines = "\n".join(f"  - {p}" for p in found.problems)
        noun = "problem" if len(found.problems) == 1 else "problems"
        raise _fail(f"{spec}: {len(found.problems)} {noun}\n{lines}")
    return loaded, folder, found


def _weights_named(backend: str, pretrained: str | None, flag: str) -> None:
    """An open_clip backend's weights must be named (a spec's ``backend.pretrained`` rule)."""
    from vlmlab.oracle import backend_takes_model

    try:
        _, takes_weights = backend_takes_model(backend)
    except ValueError as error:
        raise _fail(str(error)) from None
    if takes_weights and pretrained is None:
        raise _fail(
            f"{flag}: {backend} needs its weights named: a pretrained tag (openai), a "
            "checkpoint file, an hf-hub: name, or random-init for untrained weights"
        )


def default_results(spec: Any) -> str:
    """``results/<spec name>``: one experiment a folder unless the user says otherwise."""
    return f"results/{spec.name}"


class _RichProgress:
    """Draws one progress bar per trial: generation, queries / budget, the task's headline."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.budgets: dict[str, int | None] = {}

    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        self.budgets[run_id] = budget
        note = f" (resumed at {start})" if start else ""
        self.tasks[run_id] = self.progress.add_task(
            f"{run_id}{note}", total=generations, completed=start, stats=""
        )

    def generation_done(self, run_id: str, progress) -> None:
        budget = self.budgets.get(run_id)
        spent = (
            f"queries {progress.queries_used}/{budget if budget is not None else '∞'}  "
            if progress.queries_used or budget is not None
            else ""  # a white-box task spends no queries
        )
        stats = f"{spent}{progress.summary}"
        self.progress.update(self.tasks[run_id], completed=progress.generation, stats=stats)

    def trial_finished(self, outcome) -> None:
        pass


def _shots(ladder: list[int]) -> str:
    return f"{ladder[0]}-shot" if len(ladder) == 1 else f"{ladder}-shot ladder"


def _budgets(spec) -> str:
    if spec.white_box:
        return f"white-box, {spec.generations} epochs per trial"
    budgets = {k: spec.query_budget(k) for k in spec.data.shot_ladder}
    if len(set(budgets.values())) == 1:
        return f"budget {next(iter(budgets.values())) or 'unlimited'} queries per trial"
    each = ", ".join(f"{b} ({k}-shot)" for k, b in budgets.items())
    return f"budget {each} queries per trial"


def _outcome_table(outcomes, task, where: str):
    """Each trial's test metrics in percent, the references that bound them first."""
    from rich.table import Table

    metrics = task.table_metrics or task.metrics
    table = Table(title=f"{task.title} — {where} (test split, %)")
    # A white-box task spends no queries: its last column counts epochs.
    spent = "epochs" if task.white_box else "queries"
    for column in ("prompt", "shots", "seed", *(label for _, label in metrics), spent):
        first = column == "prompt"
        table.add_column(column, justify="left" if first else "right", no_wrap=first)

    def cells(values: dict[str, float]) -> list[str]:
        return [f"{values[k] * 100:.2f}" if k in values else "-" for k, _ in metrics]

    # The hand-written prompt on the test split: the same for every shot count and seed.
    zero_shot = next((o.zeroshot_test for o in outcomes if o.zeroshot_test), None)
    if zero_shot and not task.white_box:  # a white-box reference (w_old) differs by seed
        table.add_row("zero-shot", "-", "-", *cells(zero_shot), "0")
        for reference in task.extra_references:
            values = next(
                (o.references[reference] for o in outcomes if reference in o.references), None
            )
            if values:
                table.add_row(task.reference_label(reference), "-", "-", *cells(values), "0")
    for o in outcomes:
        table.add_row(
            o.method + (" (earlier run)" if o.skipped else ""),
            str(o.shots),
            str(o.seed),
            *cells(o.test),
            str(o.generations)
            if spent == "epochs"
            else f"{o.queries_used}/{o.budget}"
            if o.budget is not None
            else "white-box"
            if o.queries_used == 0
            else f"{o.queries_used}/∞",
        )
    return table


_RESULTS_OPTION = typer.Option(
    "--results", help="results folder or URI (default: results/<spec name>)"
)


def _print_tables(console, tables) -> None:
    """Report tables (``vlmlab.results.ReportTable``) as rich tables."""
    from rich.table import Table
    from rich.text import Text

    for t in tables:
        # The title on its own line: a table narrower than its title would wrap it.
        console.print(Text(t.title, style="italic"), soft_wrap=True)
        table = Table()
        for column in t.columns:
            # A row's label never breaks (it names the experiment's variant); numbers may.
            first = column == "method"
            table.add_column(column, justify="left" if first else "right", no_wrap=first)
        for row in t.rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
