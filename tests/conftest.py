"""Shared test helpers: paths to the shipped fixtures and their brute-force statistics."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


def pytest_configure(config: pytest.Config) -> None:
    """deadrelu's ONNX kernel is built into a cache folder of this test session (not the
    user's ~/.cache), once per session; DEADRELU_CACHE_DIR set by the caller wins."""
    if "DEADRELU_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="deadrelu-test-cache-")
        os.environ["DEADRELU_CACHE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ from the current output")


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
