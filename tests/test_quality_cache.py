"""The quality benchmark's cache key (benchmarks/quality.py): a library upgrade must never reuse old numbers."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality_runs.py as a module (quality.py's cache key and run helpers)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import quality_runs

        yield quality_runs
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_cache_key_names_the_torch_torchvision_and_torch_pruning_versions(
    quality, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"weights")
    code = {"aip_tree": "t", "aip_changes_sha256": "c"}
    parts = quality.cache_key_parts(code, weights)
    assert parts["libraries"] == {
        name: importlib.metadata.version(name) for name in ("torch", "torchvision", "torch-pruning")
    }
    installed = importlib.metadata.version
    for name in quality.LIBRARIES:  # the same code and teacher under one upgraded library: another key
        monkeypatch.setattr(
            importlib.metadata, "version", lambda n, up=name: installed(n) + (".post1" if n == up else "")
        )
        upgraded = quality.cache_key_parts(code, weights)
        assert upgraded["libraries"][name] != parts["libraries"][name], name
        assert upgraded != parts and upgraded["code"] == parts["code"], name


def test_a_finished_run_counts_its_sparsity_stage_and_acp_its_intervals(quality) -> None:
    assert quality.expected_stages({"mode": "aip", "prune": {"intervals": 2, "finetune_epochs": 2}}) == 3
    assert quality.expected_stages({"mode": "acp", "prune": {"intervals": 2, "finetune_epochs": 2}}) == 3
    sparse = {"mode": "aip", "prune": {"intervals": 2, "finetune_epochs": 1, "sparsity": {"epochs": 1}}}
    assert quality.expected_stages(sparse) == 4
    assert quality.expected_stages({"mode": "aip", "prune": {"intervals": 3, "finetune_epochs": 0}}) == 3
