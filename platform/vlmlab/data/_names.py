"""Class names as prompts see them: cleaned folder names and user-given mapping files.

A prompt reads "a photo of a {name}.", so a folder called ``001.Black_footed_Albatross``
must reach the text tower as ``Black footed Albatross`` (the official Black-Box
Forgetting code strips CUB's numeric prefix and underscores the same way). Any other
spelling a paper uses (CoOp's EuroSAT names, a corrected typo) comes from a mapping
file that a spec names in ``data.class_names``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmlab.data._dataset import ImageDataset

_NUMERIC_PREFIX = re.compile(r"^\d+[.\-_\s]+(?=[^\W\d_])")


def prompt_name(folder: str) -> str:
    """A folder name as a prompt word: ``001.Black_footed_Albatross`` → ``Black footed Albatross``.

    Strips a leading number with its separator (``001.``, ``12_``, ``3-``), turns
    underscores into spaces and collapses runs of spaces. A name that is only a
    number (``7``) stays as it is.
    """
    name = _NUMERIC_PREFIX.sub("", folder.strip())
    return " ".join(name.replace("_", " ").split()) or folder


ClassNames = Mapping[str, str] | Sequence[str]
"""Either the new names in class order, or a mapping from old name (or index) to new."""


def read_class_names(path: str | Path) -> ClassNames:
    """Read a class-name file: ``.txt`` (one name per line, in class order),
    ``.json`` / ``.yaml`` (a list in class order, or a mapping old name or index → name).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.class_names: no such file {str(file)!r}")
    text = file.read_text(encoding="utf-8")
    suffix = file.suffix.lower()
    content: Any
    if suffix == ".txt":
        content = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        content = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        content = yaml.safe_load(text)
    else:
        raise ValueError(
            f"data.class_names: {str(file)!r} must be .txt (a name a line), .json or .yaml"
        )
    if isinstance(content, dict):
        return {str(key): _name(value, file) for key, value in content.items()}
    if isinstance(content, list):
        return [_name(value, file) for value in content]
    raise ValueError(
        f"data.class_names: {str(file)!r} must hold a list of names or a mapping, "
        f"not {type(content).__name__}"
    )


def _name(value: Any, source: Path | str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"data.class_names: {source}: every name must be a non-empty string")
    return value.strip()


def rename_classes(dataset: ImageDataset, names: ClassNames) -> ImageDataset:
    """``dataset`` with prompt names from ``names`` (a list in class order, or a
    mapping whose keys are current names or class indices; unmapped classes keep theirs).

    Raises a ``ValueError`` naming every key that matches no class, or the count
    when a list has the wrong length, so a typo never silently keeps a name.
    """
    return replace(dataset, class_names=renamed(dataset.class_names, names, dataset.name))


def renamed(current: Sequence[str], names: ClassNames, source: str) -> list[str]:
    """The class names ``current`` (of dataset ``source``) after :func:`rename_classes`'s
    rules, checked the same way; ``vlmlab validate`` renames a class list without images."""
    current = list(current)
    if isinstance(names, Mapping):
        by_key = {str(i): i for i in range(len(current))} | {n: i for i, n in enumerate(current)}
        unknown = [key for key in names if key not in by_key]
        if unknown:
            raise ValueError(
                f"data.class_names: {', '.join(map(repr, unknown))} match no class of "
                f"{source} (classes: {', '.join(current)})"
            )
        result = list(current)
        for key, value in names.items():
            result[by_key[key]] = _name(value, source)
    else:
        if len(names) != len(current):
            raise ValueError(
                f"data.class_names: {len(names)} names given but {source} has "
                f"{len(current)} classes"
            )
        result = [_name(value, source) for value in names]
    duplicates = sorted({n for n in result if result.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.class_names: names must be distinct; repeated: {duplicates}")
    return result
