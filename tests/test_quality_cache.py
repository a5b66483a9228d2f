"""The quality benchmark's cache key (benchmarks/quality.py): a library upgrade must never reuse old numbers."""

from __future__ import annotations

import importlib.metadata
import json
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


def test_a_ledger_record_stands_in_for_a_run_of_the_same_key_only(quality, tmp_path: Path) -> None:
    cfg = {"mode": "aip", "seed": 0, "prune": {"intervals": 2, "finetune_epochs": 1}}
    parts = {"code": {"aip_tree": "t", "aip_changes_sha256": "c"}, "teacher_sha256": "w", "libraries": {"torch": "2"}}
    ledger, work = tmp_path / "ledger", tmp_path / "work"
    report = {"teacher": {"top1": 90.0}, "stages": [{"top1": 50.0}, {"top1": 60.0}, {"top1": 70.0}]}
    key = quality.arm_key(cfg, parts)
    run_dir = str(quality.REPO / "benchmarks" / ".cache" / "quality" / f"arm-{key[:16]}")
    done = {"report": report, "key": key, "seconds": 5.0, "cached": False, "run_dir": run_dir}
    assert quality.run_arm(cfg, parts, work, "arm", dry=True, ledger=ledger) is None
    quality.write_ledger("arm", done, ledger)
    recorded = quality.run_arm(cfg, parts, work, "arm", dry=True, ledger=ledger)
    assert recorded["report"] == report and recorded["cached"] and recorded["seconds"] == 5.0
    assert recorded["run_dir"] == f"benchmarks/.cache/quality/arm-{key[:16]}"  # relative, never this machine's
    assert quality.run_arm(cfg, parts, work, "arm", dry=True) is None  # no ledger, no run
    assert quality.run_arm({**cfg, "seed": 1}, parts, work, "arm", dry=True, ledger=ledger) is None
    upgraded = {**parts, "libraries": {"torch": "3"}}
    assert quality.run_arm(cfg, upgraded, work, "arm", dry=True, ledger=ledger) is None
    (ledger / f"arm-{key[:16]}.json").write_text(json.dumps({**done, "key": "another"}))
    assert quality.run_arm(cfg, parts, work, "arm", dry=True, ledger=ledger) is None
    short = {**done, "report": {**report, "stages": report["stages"][:2]}}  # a run cut short is no result
    quality.write_ledger("arm", short, ledger)
    assert quality.run_arm(cfg, parts, work, "arm", dry=True, ledger=ledger) is None


def test_every_recorded_run_names_its_machine_and_the_report_counts_them(quality) -> None:
    import quality as bench
    import quality_peers
    import quality_report
    import torch

    here = quality.run_machine()
    assert f"{torch.get_num_threads()} torch threads" in here
    assert torch.backends.cpu.get_cpu_capability() in here
    report = {
        "teacher": {"top1": 90.0, "flops": 10, "params": 4},
        "stages": [{"stage": 1, "kind": "finetune", "top1": 70.0, "top5": 90.0, "flops": 5, "params": 2}],
    }
    aip = quality.aip_row(
        {"report": report, "key": "k", "seconds": 1.0, "cached": True, "run_dir": "r", "machine": "A"}
    )
    peer = {"top1": 71.0, "flops_ratio": 0.5, "params_ratio": 0.5, "pruning_ratios": [0.3, 0.2], "teacher_top1": 90.0}
    peer = quality_peers.peer_row(
        {**peer, "wall_seconds": 1.0, "cached": True, "key": "k", "stages": [], "machine": "B"}
    )
    old = {**aip, "machine": None}  # recorded before runs named their machine
    assert (aip["machine"], peer["machine"]) == ("A", "B")
    counts = bench.run_machines({"0.5": {"d_aip": [aip, aip], "p_tp_kd": [peer]}, "0.3": {"d_aip": [old]}})
    assert counts == {"A": 2, "B": 1, "not recorded": 1}
    line = quality_report.machines({"description": "here", "runs": counts})
    assert line == "A (2 runs); B (1 run); not recorded (1 run)"
    assert quality_report.machines({"description": "here"}) == "here"  # a results file from before


def test_a_run_the_pruner_cannot_bring_to_its_target_is_recorded_as_refused(
    quality, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aip.train

    calls = []

    def refuse(argv: list[str]) -> int:
        calls.append(argv)
        print("error: cannot reach the target: the flops are still 0.783 of the interval's start", file=sys.stderr)
        return 2

    monkeypatch.setattr(aip.train, "main", refuse)
    cfg = {"mode": "aip", "seed": 0, "prune": {"intervals": 2, "finetune_epochs": 1}}
    parts = {"code": {"aip_tree": "t", "aip_changes_sha256": "c"}, "teacher_sha256": "w", "libraries": {"torch": "2"}}
    work, ledger = tmp_path / "work", tmp_path / "ledger"
    done = quality.run_arm(cfg, parts, work, "arm", ledger=ledger)
    assert done["refused"] == "cannot reach the target: the flops are still 0.783 of the interval's start"
    assert len(calls) == 1 and done["machine"] == quality.run_machine()
    for again in (  # from the work directory, and from the ledger alone (a clean clone): never run again
        quality.run_arm(cfg, parts, work, "arm", dry=True, ledger=ledger),
        quality.run_arm(cfg, parts, tmp_path / "clone", "arm", dry=True, ledger=ledger),
    ):
        assert again["refused"] == done["refused"] and again["cached"]
    assert len(calls) == 1
    assert quality.run_arm({**cfg, "seed": 1}, parts, work, "arm", dry=True, ledger=ledger) is None  # another key

    def crash(argv: list[str]) -> int:
        print("error: data.root: no such directory", file=sys.stderr)
        return 2

    monkeypatch.setattr(aip.train, "main", crash)  # any other failure stops the benchmark
    with pytest.raises(SystemExit, match="failed"):
        quality.run_arm({**cfg, "seed": 2}, parts, work, "arm", ledger=ledger)
