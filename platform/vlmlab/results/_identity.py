"""What makes two runs the same experiment, and how a report keeps different ones apart.

A run's ``config`` (the resolved spec of its trial, as JSON) says everything it
ran with. Its *identity* is that config without what cannot change the result:
the seed, the experiment's name and notes, where it ran (pool, device, feature
cache), where progress also went (tracking), how often it checkpointed, and
the sweep or study section that generated it (their choices are already
resolved into the method and budget). The **fingerprint** is a digest of the
identity; runs with one fingerprint differ only by seed, and only those may be
averaged in one row.

Reports split further: one table per *setting* (experiment name plus the
identity without the method section and the axes a table spreads across its
columns, such as CraFT's shots), one row per method section within it,
labelled by what differs (``safe_bbf (prompted=all)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

NEUTRAL_FIELDS = (
    "name",
    "experiment",
    "description",
    "expected",
    "seeds",
    "tracking",
    "pool",
    "sweep",
    "study",
    "eval_every",
    "variants",
    "backend.device",
    "backend.cache_dir",
)
"""Spec fields (dotted) that never change a trial's result."""

FINGERPRINT_LENGTH = 12


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        tree.pop(head, None)
    elif isinstance(tree.get(head), dict):
        tree[head] = dict(tree[head])
        _drop(tree[head], rest)


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a trial's resolved config that can change its result.

    ``data.root`` is where a dataset lies, not which one, except for an
    ``imagefolder``, where the folder is the dataset.
    """
    tree: dict[str, Any] = json.loads(json.dumps(dict(config)))  # a deep copy of plain values
    for dotted in NEUTRAL_FIELDS:
        _drop(tree, dotted)
    data = tree.get("data")
    if isinstance(data, dict) and data.get("dataset") != "imagefolder":
        data.pop("root", None)
    return tree


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short digest of :func:`identity`: equal for runs that differ only by seed."""
    canonical = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"sigma": 1}}`` -> ``{"method.sigma": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def differing(flats: Iterable[Mapping[str, Any]]) -> list[str]:
    """The dotted fields whose values are not the same in every one of ``flats``."""
    flats = list(flats)
    keys = sorted({key for flat in flats for key in flat})
    missing = object()
    return [
        key
        for key in keys
        if len({json.dumps(flat.get(key, missing), sort_keys=True, default=str) for flat in flats})
        > 1
    ]


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(flat: Mapping[str, Any], fields: Iterable[str], *, strip: str = "") -> str:
    """``k=v, k=v`` for ``fields`` of ``flat`` (``strip`` removes a leading section name)."""
    return ", ".join(
        f"{field.removeprefix(strip)}={_short(flat.get(field, '-'))}" for field in fields
    )


@dataclass(frozen=True)
class RowGroup:
    """The runs of one table row: one method section, every seed of it."""

    label: str
    method: str
    runs: pd.DataFrame


@dataclass(frozen=True)
class TableGroup:
    """The runs of one table: one experiment in one setting."""

    experiment: str
    dataset: str
    backend: str
    model: str
    note: str
    """What sets this table apart from another of the same experiment ('' when alone)."""
    runs: pd.DataFrame

    @property
    def where(self) -> str:
        """``<experiment>: <backend> <model> on <dataset>[, note]`` for titles."""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.experiment}: {self.backend} {self.model} on {self.dataset}{note}"

    def rows(self, label_of: Any = str) -> list[RowGroup]:
        """One group per method section, sorted by method then label; ``label_of`` turns a
        method name into its table label (a task marks white-box references)."""
        runs = self.runs
        groups = []
        for (method, _), of_variant in runs.groupby(["method", "_variant"], sort=True):
            same_name = runs[runs.method == method]
            label = label_of(str(method))
            if same_name._variant.nunique() > 1:
                fields = differing(list(same_name.drop_duplicates("_variant")._method_flat))
                label += f" ({describe(of_variant._method_flat.iloc[0], fields, strip='method.')})"
            groups.append(RowGroup(label, str(method), of_variant))
        return sorted(groups, key=lambda g: (g.method, g.label))


def _config_of(row_config: Any) -> dict[str, Any]:
    if not isinstance(row_config, str) or not row_config:
        return {}
    try:
        loaded = json.loads(row_config)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def table_groups(done: pd.DataFrame, *, axes: Iterable[str] = ()) -> list[TableGroup]:
    """Split the completed runs of one task into tables: one per experiment and setting.

    Args:
        axes: dotted config fields a table spreads across its columns (CraFT's
            ``data.shots`` and ``budget.max_queries``): they do not split tables.

    Runs written before fingerprints existed are fingerprinted from their config.
    """
    if done.empty:
        return []
    axes = tuple(axes)
    done = done.copy()
    settings, variants, method_flats, setting_flats = [], [], [], []
    for config, model in zip(done.config, done.model, strict=True):
        ident = identity(_config_of(config))
        method = ident.pop("method", {})
        # The model id names the weights themselves (a retrained checkpoint at the same path).
        flat = {**flatten(ident), "model": str(model)}
        for axis in axes:
            flat.pop(axis, None)
        method_flat = flatten({"method": method})
        settings.append(json.dumps(flat, sort_keys=True, default=str))
        variants.append(json.dumps(method_flat, sort_keys=True, default=str))
        method_flats.append(method_flat)
        setting_flats.append(flat)
    done["_setting"], done["_variant"] = settings, variants
    done["_method_flat"], done["_setting_flat"] = method_flats, setting_flats
    experiment = done.experiment.fillna("-").astype(str)
    done["_experiment"] = experiment
    tables = []
    for name, of_experiment in done.groupby("_experiment", sort=True):
        distinct = of_experiment.drop_duplicates("_setting")
        fields = differing(distinct._setting_flat) if len(distinct) > 1 else []
        for _, group in of_experiment.groupby("_setting", sort=False):
            first = group.iloc[0]
            tables.append(
                TableGroup(
                    experiment=str(name),
                    dataset=str(first.dataset),
                    backend=str(first.backend),
                    model=str(first.model),
                    note=describe(first._setting_flat, fields) if fields else "",
                    runs=group,
                )
            )
    return sorted(tables, key=lambda t: (t.experiment, t.dataset, t.backend, t.model, t.note))


def experiments_in(runs: pd.DataFrame) -> dict[str, int]:
    """Experiment name -> runs, for a folder's notice that it holds several experiments."""
    if runs.empty:
        return {}
    counts = runs.experiment.fillna("-").astype(str).value_counts()
    return {str(name): int(count) for name, count in sorted(counts.items())}
