"""Shared fixtures: tiny synthetic cohorts, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """8 synthetic patients, 32-voxel volumes (seconds to make)."""
    from analysis.synthetic import make_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    make_cohort(out, n_patients=8, shape=32, seed=0)
    return out


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """12 synthetic patients at 64 voxels: enough for 4 folds with every class present."""
    from analysis.synthetic import make_cohort

    out = tmp_path_factory.mktemp("small_cohort")
    make_cohort(out, n_patients=12, shape=64, seed=1)
    return out


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
