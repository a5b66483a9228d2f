"""The quality benchmark's runs: the cache key (aip/ code, teacher file, library versions), one aip arm run in its
own directory and reused when complete, and the rows the results files record (paths relative, never this
machine's). See benchmarks/quality.py."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from quality_report import curve_points

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# Finished runs, one small JSON file each (the report and our record, no checkpoints), committed: a sitting longer
# than one machine's life goes on from a clean clone, and a row is reused only under its exact key.
LEDGER = REPO / "benchmarks" / "results" / "ledger"
# The libraries whose version changes the numbers (kernels, pruning, transforms): part of every cache key.
LIBRARIES = ("torch", "torchvision", "torch-pruning")


def fail(message: str) -> None:
    sys.exit(f"error: {' '.join(message.split())}")


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout


def code_version() -> dict:
    """HEAD and its aip/ tree, plus a hash of the uncommitted changes under aip/ (tracked diff and untracked files)."""
    try:
        head = git("rev-parse", "HEAD").decode().strip()
        tree = git("rev-parse", "HEAD:aip").decode().strip()
        diff = git("diff", "HEAD", "--", "aip")
        digest = hashlib.sha256(diff)
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "aip").decode().split()
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(f"cannot read the code version with git in {REPO} ({exc}); run from a git checkout")
    for name in sorted(untracked):
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return {
        "commit": head,
        "aip_tree": tree,
        "aip_changes_sha256": digest.hexdigest(),
        "dirty": bool(diff or untracked),
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_versions() -> dict[str, str]:
    """The installed version of each of LIBRARIES, as their package metadata says (nothing is imported)."""
    try:
        return {name: importlib.metadata.version(name) for name in LIBRARIES}
    except importlib.metadata.PackageNotFoundError as exc:
        fail(f"{exc.name} is not installed; pip install -e . first")


def run_machine() -> str:
    """The machine a run is measured on, in words: CPU model, torch's CPU kernels and threads, GPU if any (the same
    config and seed differ by up to about half a point across them, so every recorded run names its machine)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({capability}), {torch.get_num_threads()} torch threads{gpu}"


def cache_key_parts(code: dict, weights: Path) -> dict:
    """What, besides an arm's config, names its cached run: the aip/ code (not HEAD: other commits keep the cache),
    the teacher file and the library versions. Shared with benchmarks/ablations.py, whose baseline runs are the
    quality runs."""
    return {
        "code": {k: code[k] for k in ("aip_tree", "aip_changes_sha256")},
        "teacher_sha256": file_sha256(weights),
        "libraries": library_versions(),
    }


def expected_stages(cfg: dict) -> int:
    """The stage rows a finished run reports: a sparsity stage, the intervals (modes aip and acp alike) and the
    fine-tune."""
    p = cfg["prune"]
    sparse = 1 if p.get("sparsity", {}).get("epochs", 0) > 0 else 0
    return sparse + p["intervals"] + (1 if p["finetune_epochs"] > 0 else 0)


def complete(run_dir: Path, key: str, cfg: dict) -> dict | None:
    """The run's report and our record of it when both exist, match the key and hold every stage; else None."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
        meta = json.loads(run_dir.with_name(run_dir.name + ".done.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or len(report.get("stages", [])) != expected_stages(cfg) or not report.get("teacher"):
        return None
    return {"report": report, **meta}


def arm_key(cfg: dict, key_parts: dict) -> str:
    """The hash that names an aip arm's run: its resolved config and the key parts (code, teacher, libraries)."""
    return hashlib.sha256(json.dumps({**key_parts, "config": cfg}, sort_keys=True).encode()).hexdigest()


def read_ledger(label: str, key: str, ledger: Path | None) -> dict | None:
    """The ledger's record of this label and key, or None (no ledger, no record, or one of another key)."""
    if ledger is None:
        return None
    try:
        done = json.loads((ledger / f"{label}-{key[:16]}.json").read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("key") == key else None


def write_ledger(label: str, done: dict, ledger: Path | None) -> None:
    """Record a finished run in the ledger (its report or result and our record; paths relative to the repo)."""
    if ledger is None:
        return
    ledger.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in done.items() if k != "cached"}
    if "run_dir" in record:
        record["run_dir"] = portable(record["run_dir"])
    (ledger / f"{label}-{done['key'][:16]}.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")


# The one failure a benchmark reports rather than stops on: the pruner cannot reach the target within the method's
# own limits (prune.max_layer_ratio, the effective-rank caps of prune.capacity).
REFUSAL = "error: cannot reach the target"


class Tee(io.TextIOBase):
    """A text stream that writes to each of several (the terminal and a buffer that keeps the run's error line)."""

    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def read_refusal(path: Path, key: str) -> dict | None:
    """The recorded refusal of this key's run (the pruner could not reach the target), or None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def run_arm(
    cfg: dict, key_parts: dict, work: Path, label: str, dry: bool = False, ledger: Path | None = None
) -> dict | None:
    """Run one arm in work/<label>-<key> (reused when complete with the same key, or when `ledger` records it); its
    report and wall time, or {key, refused, machine} where the pruner cannot reach the target within the method's
    limits (recorded like a run). `dry`: only a complete cached or recorded run, else None."""
    import yaml

    from aip.train import main as train_main

    key = arm_key(cfg, key_parts)
    run_dir = work / f"{label}-{key[:16]}"
    refused_path = run_dir.with_name(run_dir.name + ".refused.json")
    refused = read_refusal(refused_path, key) or read_ledger(label, key, ledger)
    if refused is not None and "refused" in refused:
        print(f"{label}: refusal recorded", flush=True)
        return {**refused, "cached": True}
    done = complete(run_dir, key, cfg)
    if done is not None:
        print(f"{label}: cached in {run_dir}", flush=True)
        done = {**done, "cached": True, "run_dir": str(run_dir)}
        if read_ledger(label, key, ledger) is None:
            write_ledger(label, done, ledger)
        return done
    recorded = read_ledger(label, key, ledger)
    if recorded is not None and len(recorded["report"].get("stages", [])) == expected_stages(cfg):
        print(f"{label}: recorded in {ledger}", flush=True)
        return {**recorded, "cached": True}
    if dry:
        return None
    # The run directory holds only the run (aip refuses foreign files there); our records lie beside it.
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    done_path = run_dir.with_name(run_dir.name + ".done.json")
    started_path = run_dir.with_name(run_dir.name + ".started")
    work.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done_path.unlink(missing_ok=True)
    resumed = started_path.is_file() and run_dir.is_dir()  # an earlier try of this key was cut short
    started_path.write_text(key + "\n")
    print(f"{label}: {'resuming' if resumed else 'running'} in {run_dir}", flush=True)
    start = time.perf_counter()
    # Same key: an interrupted run goes on from its newest checkpoint (or from the start in its own directory).
    errors = io.StringIO()
    with contextlib.redirect_stderr(Tee(sys.stderr, errors)):
        code = train_main(["--config", str(cfg_path), "--out", str(run_dir), "--resume", "auto"])
    refusal = next((line for line in errors.getvalue().splitlines() if line.startswith(REFUSAL)), None)
    if code == 2 and refusal:  # the method's own limit (e.g. capacity caps above the target): a result, not a fault
        record = {"key": key, "refused": refusal.removeprefix("error: "), "machine": run_machine()}
        refused_path.write_text(json.dumps(record, indent=1))
        write_ledger(label, record, ledger)
        return {**record, "cached": False}
    if code != 0:
        fail(f"the run {label} failed (exit {code}) in {run_dir}; see its output above")
    seconds = time.perf_counter() - start
    search = None
    if cfg["mode"] == "acp":
        log = json.loads((run_dir / "pruning_log.json").read_text())
        search = next((e["search_seconds"] for e in log if "search_seconds" in e), None)
    meta = {"key": key, "seconds": seconds, "resumed": resumed, "search_seconds": search, "machine": run_machine()}
    done_path.write_text(json.dumps(meta, indent=1))
    done = complete(run_dir, key, cfg)
    if done is None:
        fail(f"the run {label} ended without a complete report.json in {run_dir}")
    done = {**done, "cached": False, "run_dir": str(run_dir)}
    write_ledger(label, done, ledger)
    return done


def aip_row(done: dict) -> dict:
    """One aip run's row: final top-1/top-5, cost ratios, wall time, stages and recovery curve."""
    report = done["report"]
    t, final = report["teacher"], report["stages"][-1]
    return {
        "top1": final["top1"],
        "top5": final["top5"],
        "flops_ratio": final["flops"] / t["flops"],
        "params_ratio": final["params"] / t["params"],
        "seconds": done["seconds"],
        "search_seconds": done.get("search_seconds"),
        "cached": done["cached"],
        "resumed": done.get("resumed", False),
        "machine": done.get("machine"),
        "run_dir": portable(done["run_dir"]),
        "key": done["key"],
        "teacher": t,
        "stages": [
            {"stage": st["stage"], "kind": st["kind"], "flops_ratio": st["flops"] / t["flops"], "top1": st["top1"]}
            for st in report["stages"]
        ],
        "curve": curve_points(report),
    }


def portable(path: str | Path) -> str:
    """A path as the results files record it: relative to the repository (or to ../shared), never this machine's."""
    p = Path(path).resolve()
    for base, name in ((REPO, "."), (SHARED, "../shared")):
        if p.is_relative_to(base):
            return str(Path(name) / p.relative_to(base))
    return p.name


def portable_config(cfg: dict) -> dict:
    """An arm's config as the results files record it: the teacher file and data tree named, not this machine's."""
    out = json.loads(json.dumps(cfg))
    out["model"]["teacher_checkpoint"] = portable(cfg["model"]["teacher_checkpoint"])
    out["data"]["root"] = "<lossless CIFAR-10 tree, extracted from ../shared/data/cifar10.tar.gz>"
    return out
