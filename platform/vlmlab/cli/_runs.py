"""Commands that run and read experiments: `validate`, `run`, `sweep`, `study budget`, `report`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    pass

from vlmlab.cli._app import app
from vlmlab.cli._common import (
    _RESULTS_OPTION,
    _TRACK_OPTION,
    _budgets,
    _fail,
    _load_checked,
    _outcome_table,
    _print_tables,
    _print_tracking,
    _report_folder,
    _results_location,
    _RichProgress,
    _run_failures,
    _shots,
    _track_overrides,
)


@app.command()
def validate(
    spec: Annotated[str, typer.Argument(help="experiment spec (YAML)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a spec field: method.popsize=30")
    ] = None,
    results: Annotated[str | None, _RESULTS_OPTION] = None,
) -> None:
    """Check a spec without running it: fields, weights, data, class names, budget, results.

    Every check that needs no model forward, in seconds, without starting Ray:
    exit 0 when the spec can run, 2 with every problem listed.
    """
    _print_plan(*_load_checked(spec, set_ or [], results))


def _print_plan(spec: Any, folder: str, found: Any) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    console.print(
        f"[bold]{spec.name}[/]: {spec.task} task, {spec.method.name} on {spec.backend.name}"
        f"{f' ({spec.backend.pretrained})' if spec.backend.pretrained else ''}, "
        f"{spec.data.dataset}; results in {folder}",
        highlight=False,
    )
    for line in found.plan:
        console.print(f"  {line}", highlight=False)
    for note in found.notes:
        console.print(f"  note: {note}", highlight=False)
    console.print("ok: the spec can run (no model was loaded)")


@app.command()
def run(
    spec: Annotated[
        str, typer.Argument(help="experiment spec (YAML), e.g. experiments/quickstart.yaml")
    ],
    results: Annotated[str | None, _RESULTS_OPTION] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a spec field: method.popsize=30")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from checkpoints; skip completed trials")
    ] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process", help="no Ray: one process, seeds one after another (debugging)"
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="check the spec as `vlmlab validate` does; run nothing"),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    ] = None,
    track: Annotated[list[str] | None, _TRACK_OPTION] = None,
) -> None:
    """Run an experiment spec: on the Ray Serve oracle pool (default) or in-process.

    On the pool, the seeds run concurrently as Ray actors sharing the pool; a
    local Ray is started on demand unless --address or RAY_ADDRESS names a cluster.
    Exit status: 0 done, 1 a trial failed (its traceback is printed and in its
    runs row), 2 a spec or usage error (nothing ran), 130 interrupted.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vlmlab.drivers import executor_for

    loaded, results, found = _load_checked(spec, [*(set_ or []), *_track_overrides(track)], results)
    if dry_run:
        _print_plan(loaded, results, found)
        return
    console = Console()
    _print_tracking(console, loaded, results)
    with _run_failures():
        executor = executor_for(loaded, "in-process" if in_process else "ray", address=address)
        preparing = (
            f"loading {loaded.backend.name}..."
            if in_process
            else f"starting Ray and the {loaded.backend.name} oracle pool..."
        )
        with console.status(preparing):
            oracle = executor.prepare()
        shown = oracle.metadata.display_name if oracle is not None else loaded.backend.name
        console.print(
            f"[bold]{loaded.name}[/]: {loaded.method.name} on {shown}, "
            f"{loaded.data.dataset} {_shots(loaded.data.shot_ladder)}, seeds {loaded.seeds}, "
            f"{_budgets(loaded)}; {executor.where}; results in {results}"
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            outcomes = executor.run(results, resume=resume, listener=_RichProgress(progress))

    first = outcomes[0]
    where = f"{first.backend} {first.model} on {loaded.data.dataset}"
    console.print(_outcome_table(outcomes, loaded.task_entry, where))
    for line in loaded.task_entry.headline(outcomes, first.backend, loaded.data.dataset):
        console.print(line)
    folder = str(_results_location(results))
    console.print(f"results: {folder}/runs, {folder}/steps; artifacts: {folder}/artifacts")


@app.command()
def sweep(
    spec: Annotated[str, typer.Argument(help="spec with a `sweep:` section")],
    results: Annotated[str | None, _RESULTS_OPTION] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a spec field")] = None,
    resume: Annotated[
        bool, typer.Option(help="restore the sweep in --results and finish it")
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: local Ray)")
    ] = None,
    track: Annotated[list[str] | None, _TRACK_OPTION] = None,
) -> None:
    """Ray Tune sweep with Optuna search and ASHA over the spec's search space, on the oracle pool."""
    from rich.console import Console

    loaded, results, _ = _load_checked(
        spec, [*(set_ or []), *_track_overrides(track)], results, section="sweep"
    )
    console = Console()
    _print_tracking(console, loaded, results)
    with _run_failures():
        from vlmlab.drivers import deploy_for_spec, run_sweep, sweep_progress

        pool = None
        if not loaded.white_box:  # white-box trials build their own backend
            with console.status("starting Ray and the oracle pool..."):
                pool = deploy_for_spec(loaded, address=address)
        shown = pool.metadata.display_name if pool is not None else loaded.backend.name
        console.print(
            f"[bold]{loaded.name}[/]: sweep of {loaded.sweep.num_samples} trials "
            f"({loaded.sweep.sampler.upper()} search, {loaded.sweep.scheduler.upper()}) on "
            f"{shown}, {loaded.data.dataset}; optimizing {loaded.sweep.metric}; results in "
            f"{results}"
        )
        with sweep_progress(console, loaded) as callback:
            grid = run_sweep(
                loaded, results, resume=resume, address=address, pool=pool, callbacks=[callback]
            )
    best = grid.get_best_result(metric=loaded.sweep.metric, mode=loaded.sweep.mode)
    console.print(
        f"best trial: {loaded.sweep.metric}={best.metrics.get(loaded.sweep.metric) * 100:.2f} % with "
        f"{ {k: v for k, v in best.config.items()} }; rows in {_results_location(results)}/runs and .../steps"
    )


study_app = typer.Typer(help="Scaling studies: `vlmlab study budget SPEC --results DIR`.")
app.add_typer(study_app, name="study")


@study_app.command("budget")
def study_budget(
    spec: Annotated[str, typer.Argument(help="spec with a `study:` section (budgets: [...])")],
    results: Annotated[str | None, _RESULTS_OPTION] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a spec field")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: local Ray)")
    ] = None,
) -> None:
    """Query-budget study: every budget x method variant x seed as a Ray Tune grid on the pool.

    Writes the rows to the results tables, then a markdown table per metric
    (method x budget) and a PNG of each metric against queries used. Running it
    again skips the trials already completed.
    """
    import time

    from rich.console import Console

    from vlmlab._io import atomic_write_text
    from vlmlab.errors import VlmlabError
    from vlmlab.results import budget_tables, plot_budget
    from vlmlab.runner import results_store
    from vlmlab.tasks import reference_labels, study_metrics

    loaded, results, _ = _load_checked(spec, set_ or [], results, section="study")
    console = Console()
    clock = time.perf_counter()
    from vlmlab.drivers import deploy_for_spec, run_budget_study, study_trials

    try:
        trials = study_trials(loaded)
    except (VlmlabError, ValueError) as error:
        raise _fail(str(error)) from None
    with _run_failures():
        with console.status("starting Ray and the oracle pool..."):
            pool = deploy_for_spec(loaded, address=address)
        console.print(
            f"[bold]{loaded.name}[/]: budget study of {len(trials)} trials "
            f"(budgets {loaded.study.budgets} x {len(loaded.expand_trials())} method(s) x "
            f"seeds {loaded.seeds}) on {pool.metadata.display_name}, {loaded.data.dataset}; "
            f"results in {results}"
        )
        with console.status("running the study's trials (Ray Tune grid)..."):
            run_ids = run_budget_study(loaded, results, address=address, pool=pool)
    runs = results_store(results).runs()
    runs = runs[runs.run_id.isin(run_ids)]
    tables = budget_tables(runs, study_metrics(), reference_labels())
    _print_tables(console, tables)
    elapsed = f"{len(runs)} trials in {time.perf_counter() - clock:.0f} s"
    if not tables:
        console.print(f"{elapsed}; one budget leaves nothing to compare: no table or figure")
        return
    with _report_folder(_results_location(results)) as (report_dir, shown):
        atomic_write_text(report_dir / "budget_study.md", "\n".join(t.markdown() for t in tables))
        plot_budget(runs, study_metrics(), report_dir / "budget_study.png")
    console.print(f"{elapsed}; wrote {shown}/budget_study.md, {shown}/budget_study.png")


@app.command()
def report(
    results: Annotated[str, typer.Argument(help="results folder written by `vlmlab run`")],
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="DevSafety slack in points (percent of accuracy) still counted safe in the "
            "'safe' columns; 0 counts only seeds with no kept class worse",
        ),
    ] = 1.0,
) -> None:
    """Print paper-style tables (mean ± std over seeds) and plot them.

    Forgetting: H, Err_fgt and Acc_mem by method, and H against queries.
    CraFT: test accuracy by shots (K) and method, and accuracy against K.
    Devsafety: target gain, DevSafety(acc) and the safety ratio over seeds, by method.
    """
    from rich.console import Console

    from vlmlab._io import atomic_write_text
    from vlmlab.results import budget_tables, experiments_in, plot_budget
    from vlmlab.runner import results_store
    from vlmlab.tasks import iter_tasks, reference_labels, study_metrics

    root = _results_location(results)
    if not (root / "runs").is_dir():
        raise _fail(f"no results in {str(root)!r} (expected {root}/runs/ from `vlmlab run`)")
    store = results_store(root)
    runs, steps = store.runs(), store.steps()
    tasks = list(iter_tasks())
    tables = [table for task in tasks for table in task.tables(runs, tolerance=tolerance)]
    tables += budget_tables(runs, study_metrics(), reference_labels())
    if not tables:
        raise _fail(f"{str(root)!r} holds no completed runs yet")
    console = Console()
    experiments = experiments_in(runs)
    notice = (
        f"{str(root)!r} holds {len(experiments)} experiments: "
        + ", ".join(f"{name} ({count} runs)" for name, count in experiments.items())
        + "; each has its own tables (`--results results/<spec name>` keeps them apart)"
        if len(experiments) > 1
        else None
    )
    if notice:
        console.print(f"note: {notice}", soft_wrap=True, highlight=False)
    _print_tables(console, tables)
    with _report_folder(root) as (report_dir, shown):
        markdown = "\n".join(t.markdown() for t in tables)
        atomic_write_text(
            report_dir / "report.md", (f"> {notice}\n\n" if notice else "") + markdown
        )
        figures = [figure for task in tasks for figure in task.figures(runs, steps, report_dir)]
        budget_figure = plot_budget(runs, study_metrics(), report_dir / "budget_study.png")
        figures += [budget_figure] if budget_figure is not None else []
        written = [report_dir / "report.md", *(f for f in figures if f is not None)]
    console.print("wrote " + ", ".join(f"{shown}/{Path(f).name}" for f in written))
