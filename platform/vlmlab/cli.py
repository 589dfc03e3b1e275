"""The ``vlmlab`` command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from vlmlab.storage import Location

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


class _KeysWatcher:
    """Reloads the keys file of a running ``vlmlab serve`` on SIGHUP or when it changes.

    A change is a new modification time, size or inode (an editor's atomic save
    replaces the file). A broken file is reported and the served keys stay as
    they were.
    """

    def __init__(self, path: str, console: Any, *, allow_empty: bool = False) -> None:
        self.path = Path(path)
        self.console = console
        self.allow_empty = allow_empty
        self.requested = False
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def request(self, signum: int, frame: Any) -> None:  # the SIGHUP handler
        self.requested = True

    def poll(self) -> None:
        stamp = self._stamp()
        if not self.requested and stamp == self.seen:
            return
        why = "SIGHUP" if self.requested else "the file changed"
        self.requested, self.seen = False, stamp
        from vlmlab.serving import KeysFileError, reload_keys

        try:
            changes = reload_keys(self.path, allow_empty=self.allow_empty)
        except KeysFileError as error:
            self.console.print(f"keys not reloaded ({why}), the served keys stay: {error}")
            return
        except Exception as error:
            self.console.print(
                f"keys not reloaded ({why}), the served keys stay: {type(error).__name__}: {error}"
            )
            return
        summary = ", ".join(f"{what} {names}" for what, names in changes.items() if names)
        self.console.print(f"keys reloaded ({why}): {summary or 'no change'}", soft_wrap=True)


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

    from vlmlab.runner import build_oracle, run_experiment

    loaded, results, found = _load_checked(spec, [*(set_ or []), *_track_overrides(track)], results)
    if dry_run:
        _print_plan(loaded, results, found)
        return
    console = Console()
    _print_tracking(console, loaded, results)
    with _run_failures():
        oracle = pool_oracle = None
        if in_process:
            with console.status(f"loading {loaded.backend.name}..."):
                oracle = build_oracle(loaded)
            where = "in-process"
        elif loaded.white_box:  # trains the model: each trial builds its backend on an actor
            resources = loaded.pool
            where = f"Ray actors ({resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU each)"
        else:
            from vlmlab.drivers import deploy_for_spec

            with console.status(f"starting Ray and the {loaded.backend.name} oracle pool..."):
                oracle = pool_oracle = deploy_for_spec(loaded, address=address)
            where = f"oracle pool ({loaded.pool.replicas} replica(s))"
        shown = oracle.metadata.display_name if oracle is not None else loaded.backend.name
        console.print(
            f"[bold]{loaded.name}[/]: {loaded.method.name} on {shown}, "
            f"{loaded.data.dataset} {_shots(loaded.data.shot_ladder)}, seeds {loaded.seeds}, "
            f"{_budgets(loaded)}; {where}; results in {results}"
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            listener = _RichProgress(progress)
            if in_process:
                outcomes = run_experiment(
                    loaded, results, resume=resume, oracle=oracle, listener=listener
                )
            else:
                from vlmlab.drivers import run_experiment_on_pool

                outcomes = run_experiment_on_pool(
                    loaded,
                    results,
                    resume=resume,
                    address=address,
                    pool=pool_oracle,
                    listener=listener,
                )

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


LEDGER_MEMORY = "memory"
"""``vlmlab serve --ledger memory``: no journal, whatever ``$VLMLAB_LEDGER_JOURNAL`` says."""


def _ledger_journal(ledger: str | None, keys: str) -> str | None:
    """Where the served keys' ledger journals: the flag, the environment, else beside the keys.

    Budgets survive by default: a service restarted with the same keys file
    finds every key's spent queries in ``<keys file>.ledger.sqlite``.
    """
    import os

    from vlmlab.pool import JOURNAL_ENV

    if ledger == LEDGER_MEMORY:
        os.environ.pop(JOURNAL_ENV, None)  # the ledger actor's own default would read it
        return None
    if ledger is not None:
        return ledger
    if os.environ.get(JOURNAL_ENV):
        return os.environ[JOURNAL_ENV]
    path = Path(keys)
    return str(path.with_name(path.name.removesuffix(path.suffix) + ".ledger.sqlite"))


@app.command("serve")
def serve_command(
    root: Annotated[
        str | None,
        typer.Argument(help="folder of artifact folders, e.g. results/quickstart/artifacts"),
    ] = None,
    keys: Annotated[
        str | None,
        typer.Option(help="keys file (`vlmlab keys add`): serves the black box at /v1/oracle/*"),
    ] = None,
    oracle: Annotated[
        str, typer.Option(help="the black box behind /v1/oracle: conse | open_clip:<arch>")
    ] = "conse",
    oracle_pretrained: Annotated[
        str | None, typer.Option(help="open_clip weights: a tag (openai) or a checkpoint path")
    ] = None,
    oracle_replicas: Annotated[int, typer.Option(help="oracle replicas")] = 1,
    oracle_cpus: Annotated[float, typer.Option(help="CPUs per oracle replica")] = 1.0,
    oracle_gpus: Annotated[float, typer.Option(help="GPUs per oracle replica")] = 0.0,
    max_request_mb: Annotated[
        float, typer.Option(help="largest request body, MB (image-set uploads are the big ones)")
    ] = 8.0,
    host: Annotated[str, typer.Option(help="HTTP address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(help="adapter replicas (each loads the backend)")] = 1,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per replica")] = 0.0,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray)")
    ] = None,
    ledger: Annotated[
        str | None,
        typer.Option(
            help="where the query ledger keeps its book: a SQLite file, a postgresql:// URI "
            "(one book shared by several services), or `memory` (none: spent queries last as "
            "long as the Ray cluster) (default: $VLMLAB_LEDGER_JOURNAL, else "
            "<keys file>.ledger.sqlite beside the keys file)"
        ),
    ] = None,
    allow_no_keys: Annotated[
        bool,
        typer.Option(
            "--allow-no-keys",
            help="serve a keys file that holds no keys (refused otherwise, at start and on "
            "reload: an emptied file would lock every client out)",
        ),
    ] = False,
) -> None:
    """Serve every adapted model under ROOT, and with --keys the black box, over HTTP.

    Ray Serve with a FastAPI ingress (docs at /docs). Adapters: POST /v1/classify
    {adapter, image, top_k}; GET /v1/adapters. Oracle (API key as a Bearer token):
    POST /v1/oracle/image-sets, POST /v1/oracle/logits, GET /v1/oracle/usage.
    GET /healthz. Runs until interrupted (Ctrl-C or SIGTERM), then removes its app.
    """
    import time

    from rich.console import Console

    console = Console()
    try:
        from vlmlab.serving import AdapterStore, load_keys

        if root is None and keys is None:
            raise _fail("nothing to serve: give an artifact ROOT, --keys FILE, or both")
        if keys is not None:
            _weights_named(oracle, oracle_pretrained, "--oracle-pretrained")
        ids = AdapterStore(root).ids() if root is not None else []
        if root is not None and not ids:
            raise _fail(f"no artifacts (folders with manifest.json) under {root!r}")
        served = [f"{len(ids)} adapter(s)"] if root is not None else []
        if keys is not None:
            count = len(load_keys(keys, allow_empty=allow_no_keys))
            served.append(f"the {oracle} oracle for {count} key(s)")
            ledger = _ledger_journal(ledger, keys)
        from vlmlab.serving import APP_NAME, serve_adapters

        with console.status(f"starting Ray Serve with {' and '.join(served)}..."):
            url = serve_adapters(
                root,
                host=host,
                port=port,
                address=address,
                num_replicas=replicas,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                keys=keys,
                oracle={"name": oracle, "pretrained": oracle_pretrained},
                oracle_replicas=oracle_replicas,
                oracle_cpus=oracle_cpus,
                oracle_gpus=oracle_gpus,
                max_request_bytes=int(max_request_mb * 1024 * 1024),
                ledger=ledger,
                allow_no_keys=allow_no_keys,
            )
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if keys is not None:
        from vlmlab.oracle import redact_postgres_uri
        from vlmlab.pool import RemoteLedger

        journal = RemoteLedger().journal()
        console.print(
            f"query ledger: journaled to {redact_postgres_uri(journal)}"
            if journal
            else "query ledger: in memory (--ledger memory); the keys' spent queries last as "
            "long as this Ray cluster",
            soft_wrap=True,
        )
    console.print(  # one line, whatever the width: scripts grep it for the URL
        f"serving {' and '.join(served)} at {url} (API docs: {url}/docs); Ctrl-C stops",
        soft_wrap=True,
    )
    import signal

    def _stop(signum, frame):  # SIGTERM (a process manager) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    watcher = _KeysWatcher(keys, console, allow_empty=allow_no_keys) if keys is not None else None
    if watcher is not None:
        signal.signal(signal.SIGHUP, watcher.request)
    try:
        while True:
            time.sleep(1.0)
            if watcher is not None:
                watcher.poll()
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(APP_NAME)
        console.print(f"stopped: removed the {APP_NAME} app")


keys_app = typer.Typer(help="API keys of the oracle service, stored as SHA-256 digests.")
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="the key's name (letters, digits, . _ -)")],
    file: Annotated[str, typer.Option(help="keys file, created if missing")] = "keys.yaml",
    budget: Annotated[int | None, typer.Option(help="queries in total (default: no cap)")] = None,
    rate: Annotated[
        float | None, typer.Option(help="requests a second, sustained (default: no limit)")
    ] = None,
    burst: Annotated[int, typer.Option(help="requests at once above the rate")] = 10,
    max_images: Annotated[int, typer.Option(help="images the key may register")] = 10_000,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="a per-key limit as NAME=VALUE, repeatable (e.g. max_classes=100); "
            "README, 'Limits', lists them with their defaults"
        ),
    ] = None,
) -> None:
    """Create an API key: prints it once; the file keeps only its digest."""
    from vlmlab.serving import KEY_LIMITS, KeysFileError, add_key

    limits: dict[str, int] = {}
    for item in limit or []:
        setting, _, value = item.partition("=")
        if (
            setting.strip() not in KEY_LIMITS
            or not value.strip().isascii()
            or not value.strip().isdigit()
        ):
            raise _fail(f"--limit {item!r}: give NAME=INTEGER, NAME one of {', '.join(KEY_LIMITS)}")
        limits[setting.strip()] = int(value)
    try:
        token = add_key(
            file, name, budget=budget, rate=rate, burst=burst, max_images=max_images, **limits
        )
    except KeysFileError as error:
        raise _fail(str(error)) from None
    typer.echo(token)
    typer.echo(
        f"key {name!r} added to {file} (only its SHA-256 is stored: keep the key now)", err=True
    )


@keys_app.command("list")
def keys_list(
    file: Annotated[str, typer.Option(help="keys file")] = "keys.yaml",
) -> None:
    """The keys in a file with their budgets and limits (never the keys themselves)."""
    from vlmlab.serving import KEY_LIMITS, ApiKey, KeysFileError, load_keys

    try:
        keys = load_keys(file, allow_empty=True)
    except KeysFileError as error:
        raise _fail(str(error)) from None
    defaults = ApiKey(sha256="0" * 64)
    for name, key in keys.items():
        rate = "no rate limit" if key.rate is None else f"{key.rate:g}/s (burst {key.burst})"
        budget = "no budget cap" if key.budget is None else f"budget {key.budget}"
        changed = "".join(
            f", {limit} {getattr(key, limit)}"
            for limit in KEY_LIMITS
            if limit != "max_images" and getattr(key, limit) != getattr(defaults, limit)
        )
        typer.echo(
            f"{name:20s} {budget}, {rate}, {key.max_images} images{changed}, "
            f"sha256 {key.sha256[:12]}…"
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
