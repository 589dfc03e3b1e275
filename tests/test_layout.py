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
