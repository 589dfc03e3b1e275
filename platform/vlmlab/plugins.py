"""Plugins: tasks, backends and datasets that other distributions register by entry point.

A distribution declares, in its ``pyproject.toml``::

    [project.entry-points."vlmlab.tasks"]
    my-task = "my_package:register_my_task"

and the named function, called with no argument, registers what it brings
with :func:`vlmlab.tasks.register_task`, :func:`vlmlab.oracle.register_backend`
or :func:`vlmlab.data.register_dataset`. Each group is loaded the first time
its registry is read (``vlmlab run``, ``report``, ``sweep`` and ``serve`` all
read them), once per process, so installing a plugin changes no vlmlab file.
A plugin that fails to load is skipped with a warning naming it: one broken
distribution does not stop the others, or vlmlab.

This module imports nothing of vlmlab: every registry may use it.
"""

from __future__ import annotations

import threading
import warnings
from importlib.metadata import entry_points

TASKS = "vlmlab.tasks"
BACKENDS = "vlmlab.backends"
DATASETS = "vlmlab.datasets"
GROUPS = (TASKS, BACKENDS, DATASETS)

_loaded: set[str] = set()
_loading = threading.RLock()


def load_plugins(group: str) -> list[str]:
    """Call every entry point of ``group`` not called yet in this process; their names.

    Raises:
        ValueError: ``group`` is not one of :data:`GROUPS`.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; one of {', '.join(GROUPS)}")
    loaded = []
    with _loading:  # re-entrant: a plugin's registration may read its own registry
        for entry in entry_points(group=group):
            key = f"{group}:{entry.name}={entry.value}"
            if key in _loaded:
                continue
            _loaded.add(key)  # before the call: a failing plugin is tried once
            try:
                register = entry.load()
                if not callable(register):
                    raise TypeError(f"{entry.value} is not a function")
                register()
            except Exception as error:
                warnings.warn(
                    f"vlmlab plugin {entry.name!r} ({group} = {entry.value!r}) was not "
                    f"loaded: {type(error).__name__}: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            loaded.append(entry.name)
    return loaded


__all__ = ["BACKENDS", "DATASETS", "GROUPS", "TASKS", "load_plugins"]
