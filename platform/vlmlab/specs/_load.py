"""Loading specs from YAML, command-line overrides, and whole-spec validation.

A spec is validated whole before a single query is spent. Every problem is
reported at once, each with the file, the field path, the bad value and what
is allowed::

    experiments/quickstart.yaml: 2 problems
      - method.popsize: got 1; Input should be greater than or equal to 2
      - data.sots: unknown field; allowed: dataset, root, shots, ...

Overrides use dotted paths and YAML values: ``--set method.popsize=30``,
``--set seeds=[1,2,3]``, ``--set backend.pretrained=null``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlmlab.specs._run import RunSpec, method_with_default_name
from vlmlab.specs._sections import SpecError
from vlmlab.tasks import DEFAULT_TASK, get_task, list_tasks


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"{source}: malformed override path {dotted!r}")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(
                f"{source}: cannot set {dotted!r}: {'.'.join(parts[: i + 1])} is not a section"
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"override {item!r}: expected PATH=VALUE, e.g. method.popsize=30")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise SpecError(f"override {item!r}: value is not valid YAML ({error})") from error
        _set_path(tree, path.strip(), value, f"override {item!r}")
    return tree


def _describe(error: Any, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: the field path, the value and what is allowed."""
    loc = tuple(error["loc"])
    location = ".".join(str(part) for part in (*prefix, *loc)) or "(spec)"
    if error["type"] == "extra_forbidden":
        owner: Any = model
        for part in loc[:-1]:
            is_model = isinstance(owner, type) and issubclass(owner, BaseModel)
            field = owner.model_fields.get(str(part)) if is_model else None
            owner = field.annotation if field is not None else None
            owner = next(
                (a for a in getattr(owner, "__args__", ()) if isinstance(a, type)), owner
            )  # Optional[Section] -> Section
        allowed = (
            ", ".join(owner.model_fields)
            if isinstance(owner, type) and issubclass(owner, BaseModel)
            else "?"
        )
        return f"{location}: unknown field; allowed: {allowed}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{location}: required field is missing"
    if not loc and not prefix:  # a check across fields: the message names them
        return message
    if isinstance(error.get("input"), dict):  # a check across a section's fields
        # ... whose message may name the field itself (``backend.pretrained: ...``)
        names_field = message.startswith(f"{location}.") and message.split(" ", 1)[0].endswith(":")
        return message if names_field else f"{location}: {message}"
    return f"{location}: got {error.get('input')!r}; {message}"


def _method_problems(tree: dict[str, Any]) -> list[str]:
    """Validate the method section against its task's method spec, in place.

    A valid section is replaced by the task's method spec; an invalid one is
    removed (the task's default stands in, so every other section is still checked).
    """
    name = tree.get("task", DEFAULT_TASK)
    if not isinstance(name, str) or name not in list_tasks():
        return []  # the task field reports it
    task = get_task(name)
    method = method_with_default_name(task, tree.get("method"))
    if not isinstance(method, dict):
        tree.pop("method", None)
        return [f"method: must be a mapping of fields, got {method!r}"]
    if method.get("name") not in task.variants:
        tree.pop("method", None)
        return [
            f"method.name: got {method.get('name')!r}; allowed for task {name}: "
            f"{', '.join(task.variants)}"
        ]
    try:
        tree["method"] = task.method_spec.model_validate(method)
    except ValidationError as error:
        tree.pop("method", None)
        return [_describe(e, task.method_spec, ("method",)) for e in error.errors()]
    return []


def validate_spec(tree: Any, source: str) -> RunSpec:
    """Validate a parsed spec; raise one :class:`SpecError` listing every problem.

    Field checks of every section first; when they pass, the checks across
    fields (:meth:`RunSpec.problems`, the task's own among them).
    """
    if not isinstance(tree, dict):
        raise SpecError(
            f"{source}: a spec must be a YAML mapping of fields, got {type(tree).__name__}"
        )
    tree = dict(tree)
    problems = _method_problems(tree)
    spec = None
    try:
        spec = RunSpec.model_validate(tree)
    except ValidationError as error:
        problems += [_describe(e, RunSpec) for e in error.errors()]
    if spec is not None and not problems:
        problems = spec.problems()
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise SpecError(f"{source}: {len(problems)} {noun}\n{lines}")
    assert spec is not None
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML spec, apply ``--set`` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from error
    if tree is None:
        tree = {}
    if isinstance(tree, dict) and overrides:
        tree = apply_overrides(tree, overrides)
    return validate_spec(tree, str(path))
