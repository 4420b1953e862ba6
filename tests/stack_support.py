"""Helpers shared by the production-stack tests (test_compose.py, test_stack_security.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """Import one of the stack's scripts by path (docker/ and mlflow/ are not packages)."""
    spec = importlib.util.spec_from_file_location(f"near2_stack_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
