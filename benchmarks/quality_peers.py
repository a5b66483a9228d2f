"""The quality benchmark's peer arms: a plain Torch-Pruning script (benchmarks/peers/torch_pruning_kd.py) run as a
process of its own on aip's training subset, cached like the aip arms (see benchmarks/quality.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from quality_runs import read_ledger, run_machine, write_ledger

SCRIPT = Path(__file__).resolve().parent / "peers" / "torch_pruning_kd.py"
# The peer arms: name -> the script's --loss.
PEERS = {"p_tp_ce": "ce", "p_tp_kd": "kd"}


def write_subset(data: Path, size: int, work: Path) -> Path:
    """The files of aip's `data.train_subset` (aip.data.SUBSET_SEED's permutation of the train/ tree's ImageFolder
    order, the first `size`, sorted), as a JSON list relative to `data`: the peer trains on the same images."""
    import torch
    from torchvision import datasets

    from aip.data import SUBSET_SEED

    samples = datasets.ImageFolder(str(data / "train")).samples
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(SUBSET_SEED))
    keep = sorted(order[:size].tolist())
    files = [Path(samples[i][0]).relative_to(data).as_posix() for i in keep]
    path = work / f"subset-{size}-{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]}.json"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(files))
    return path


def peer_args(peer: str, model: str, s: dict, target: float, seed: int) -> dict:
    """The script's settings for one peer arm: aip's budget (steps, epochs, lr, batch) at one target and seed."""
    return {
        "model": model,
        "target": target,
        "seed": seed,
        "loss": PEERS[peer],
        "steps": s["intervals"],
        "between": s["between"],
        "finetune": s["finetune"],
        "lr": s["lr"],
        "batch-size": s["batch_size"],
    }


def run_peer(
    args: dict,
    weights: Path,
    data: Path,
    subset: Path,
    key_parts: dict,
    work: Path,
    label: str,
    dry: bool = False,
    ledger: Path | None = None,
) -> dict | None:
    """Run the peer script once in its own process (reused when a result of the same key exists in `work` or the
    `ledger`): its result dict with the key, wall time and whether it was cached. The key holds the script's text,
    its settings, the teacher file, the subset's files and the library versions (aip's code is not in it: the peer
    uses none of it)."""
    key_src = {
        "script_sha256": hashlib.sha256(SCRIPT.read_bytes()).hexdigest(),
        "args": args,
        "teacher_sha256": key_parts["teacher_sha256"],
        "libraries": key_parts["libraries"],
        "subset": subset.name,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    path = work / f"{label}-{key[:16]}.json"
    try:
        done = json.loads(path.read_text())
        if done.get("key") == key:
            print(f"{label}: cached in {path}", flush=True)
            if read_ledger(label, key, ledger) is None:
                write_ledger(label, done, ledger)
            return {**done, "cached": True}
    except (OSError, ValueError):
        pass
    recorded = read_ledger(label, key, ledger)
    if recorded is not None:
        print(f"{label}: recorded in {ledger}", flush=True)
        return {**recorded, "cached": True}
    if dry:
        return None
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".running.json")
    command = [sys.executable, str(SCRIPT), "--weights", str(weights), "--data", str(data), "--subset", str(subset)]
    command += [x for k, v in args.items() for x in (f"--{k}", str(v))] + ["--out", str(tmp)]
    print(f"{label}: running {SCRIPT.name}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command).returncode
    if code != 0:
        sys.exit(f"error: the peer run {label} failed (exit {code}); see its output above")
    result = {**json.loads(tmp.read_text()), "key": key, "wall_seconds": time.perf_counter() - start}
    result["machine"] = run_machine()  # the peer's process runs under the same threads setting as this one
    path.write_text(json.dumps(result, indent=1))
    tmp.unlink()
    write_ledger(label, result, ledger)
    return {**result, "cached": False}


def peer_row(done: dict) -> dict:
    """One peer run's row, in the aip rows' shape (no per-epoch curve: the script evaluates after each phase)."""
    return {
        "top1": done["top1"],
        "top5": None,
        "flops_ratio": done["flops_ratio"],
        "params_ratio": done["params_ratio"],
        "pruning_ratios": done["pruning_ratios"],
        "teacher_top1": done["teacher_top1"],
        "seconds": done["wall_seconds"],
        "search_seconds": None,
        "cached": done["cached"],
        "machine": done.get("machine"),
        "key": done["key"],
        "stages": done["stages"],
        "curve": [],
    }
