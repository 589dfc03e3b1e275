"""Ground rules of the repository layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_standard_platform_module_imports_from_repo_root():
    # Ray puts the driver's working directory on sys.path; the stdlib module must win.
    code = "import platform, sys; print(platform.__file__); print(platform.system())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].endswith("platform.py") and str(ROOT) not in out[0]
    assert out[1]  # platform.system() works


def test_import_vlmlab_stays_light():
    code = "import sys, vlmlab; print(' '.join(m for m in ('ray', 'torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def _private_imports(path: Path) -> list[str]:
    """``vlmlab.<pkg>._<mod>`` imports in ``path`` that reach into another package."""
    import ast

    relative = (
        path.relative_to(ROOT / "platform").with_suffix("") if "platform" in path.parts else None
    )
    own = ".".join(relative.parts[:2]) if relative is not None else ""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "vlmlab":
                continue
            private = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
            if private is None:
                continue
            owner = ".".join(parts[:private])  # the package whose private name it is
            if not (own == owner or own.startswith(owner + ".")):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


def test_no_module_reaches_into_another_packages_private_names():
    files = [*(ROOT / "platform" / "vlmlab").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = [hit for path in files for hit in _private_imports(path)]
    assert not found, "\n".join(found)


def _settings_classes() -> dict[str, set[str]]:
    """Every settings model in ``vlmlab.methods`` and ``vlmlab.tasks``, with the fields it declares."""
    import importlib
    import inspect
    import pkgutil

    from pydantic import BaseModel

    import vlmlab.methods
    import vlmlab.tasks

    found = {}
    for package in (vlmlab.methods, vlmlab.tasks):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, cls in vars(module).items():
                if (
                    inspect.isclass(cls)
                    and issubclass(cls, BaseModel)
                    and cls.__module__ == module.__name__
                ):
                    found[f"{module.__name__}.{name}"] = set(inspect.get_annotations(cls))
    return found


def test_each_setting_is_declared_once():
    """A method's settings live in one class: no two settings models list five or more of the
    same fields (a subclass adds fields, it never lists its parent's again)."""
    import itertools

    classes = _settings_classes()
    assert {
        "vlmlab.methods._forgetting_config.ForgettingConfig",
        "vlmlab.methods._craft_config.CraftConfig",
    } <= set(classes)
    twice = [
        f"{a} and {b}: {sorted(fields_a & fields_b)}"
        for (a, fields_a), (b, fields_b) in itertools.combinations(classes.items(), 2)
        if len(fields_a & fields_b) >= 5
    ]
    assert not twice, "\n".join(twice)


def test_each_task_validates_its_method_section_with_the_methods_own_config():
    from vlmlab.methods import MethodConfig
    from vlmlab.tasks import get_task

    for name in ("forgetting", "safe_forgetting", "craft", "devsafety"):  # the built-in tasks
        task = get_task(name)
        assert issubclass(task.method_spec, MethodConfig), name
        assert task.method_spec.__module__.startswith("vlmlab.methods."), (
            name,
            task.method_spec.__module__,
        )
