"""The UCI heart-disease files and the example's converter (examples/heart-disease/convert.py),
for the tests that convert them (test_heart_disease_convert, test_flamby_counts)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "heart-disease"
RAW = REPO.parent / "shared" / "data" / "heart_disease"
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")

needs_raw = pytest.mark.skipif(
    not RAW.is_dir(), reason=f"raw UCI heart-disease files not found at {RAW}"
)


@functools.cache
def _load_converter() -> ModuleType:
    # `heart-disease` is not a package name, so load the script from its path. It must sit in
    # sys.modules while it runs: dataclasses look their module up there.
    name = "heart_disease_convert"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "convert.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
