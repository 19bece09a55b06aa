"""Fixtures shared by the tests that start real server processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.models.catalog import CATALOG
from service.models.weights import write_random


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory with seeded random-init resnet18v1 (seed 0), shared by live servers."""
    directory = tmp_path_factory.mktemp("live-weights")
    write_random(CATALOG["resnet18v1"], 0, directory)
    return directory
