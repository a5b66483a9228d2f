"""The coverage matrix (benchmarks/coverage.py) as tests: each model reaches 50% FLOPs within 5%, or names the groups
it left and why; the independent equivalence check holds; the export runs without aip. One model in the default
run, the whole matrix under the `slow` marker (python -m pytest -m slow tests/test_coverage.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "coverage_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "coverage.py"
)
coverage = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(coverage)

FAST = ["torchvision:resnet18"]


def _check(name: str) -> None:
    row = coverage.run_one(name)
    if row["flops_ratio"] > 0.5 or row["flops_ratio"] < 0.5 * 0.95:
        assert row["refused"], f"{name} missed the target without saying which groups it left: {row}"
        assert all(reason for reason in row["refused"].values())
    if "equivalence_max_rel_error" in row:
        assert row["equivalence_max_rel_error"] < 1e-3, row
        assert row["forward_ok"]
        assert row["export_loads_without_aip"] == "yes", row


@pytest.mark.parametrize("name", FAST)
def test_model_prunes_correctly(name: str) -> None:
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in coverage.MODELS if m not in FAST])
def test_matrix_model_prunes_correctly_or_says_why_not(name: str) -> None:
    _check(name)
