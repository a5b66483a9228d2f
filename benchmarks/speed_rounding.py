"""What `prune.round_to` does to latency: CIFAR ResNet-56 pruned by L1 to 50% of its FLOPs with any widths and with
widths that are multiples of 8 and of 16, timed against the unpruned network at batch 1 and 32.

Section (iv) of `benchmarks/speed.py`. Each trial is a fresh process whose allocator keeps freed memory (see
`REUSE_MEMORY`); the table gives the median trial with the range. On a CPU with AVX-512 the trials run twice:
with the machine's own kernels, and with oneDNN and ATen held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`,
`ATEN_CPU_CAPABILITY=avx2`), the kernels of an AVX2 CPU: which widths are cheap depends on the vector width the
kernels use (oneDNN blocks fp32 channels by 16 under AVX-512 and by 8 under AVX2).

    python -m benchmarks.speed_rounding --child [--device cpu] [--repeats 33]   # one trial, JSON rows on stdout
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aip.models import create_model  # noqa: E402
from aip.prune.cost import model_cost  # noqa: E402
from benchmarks.timing import interleaved_medians, pruned_copy  # noqa: E402

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# glibc maps each large block afresh and faults its pages in on every forward unless told to keep freed memory; the
# wider network's bigger activations pay more of that, by an amount that changed from process to process (round_to 8:
# efficiency 0.73-0.93 over three processes here). Told to keep freed memory, three processes agree within 0.01.
REUSE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def one_trial(
    device: str, repeats: int, batches: tuple[int, ...] = (1, 32), round_tos: tuple[int, ...] = (8, 16)
) -> list[dict]:
    """Latency of the unpruned and pruned networks at each batch size in this process (eval, inference_mode, the
    faster memory layout of each), all timed in turns so that the machine's load weighs on each alike."""
    torch.manual_seed(0)
    base = create_model("cifar_resnet56", 10).eval()
    example = torch.randn(1, 3, 32, 32)
    variants = {"unpruned": base, "any width": pruned_copy(base, example, 0.5)}
    for round_to in round_tos:
        variants[f"round_to {round_to}"] = pruned_copy(base, example, 0.5, round_to)
    flops = {name: model_cost(m, example).flops for name, m in variants.items()}
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, device=device)
        fns = {}
        for name, model in variants.items():
            for fmt in (torch.contiguous_format, torch.channels_last):
                m = copy.deepcopy(model).to(device, memory_format=fmt)
                xi = x.to(memory_format=fmt)

                def run(m: nn.Module = m, xi: torch.Tensor = xi) -> None:
                    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                        m(xi)

                fns[(name, fmt is torch.channels_last)] = run
        times = interleaved_medians(fns, device, repeats, 3)
        best = {name: min(times[(name, False)], times[(name, True)]) for name in variants}
        for name in variants:
            if name != "unpruned":
                speedup = flops["unpruned"] / flops[name]
                rows.append(
                    {
                        "widths": name,
                        "batch": batch,
                        "flops_ratio": flops[name] / flops["unpruned"],
                        "flops_speedup": speedup,
                        "latency_speedup": best["unpruned"] / best[name],
                        "efficiency": best["unpruned"] / best[name] / speedup,
                        "base_ms": 1000 * best["unpruned"],
                        "pruned_ms": 1000 * best[name],
                        "threads": torch.get_num_threads(),
                        "kernels": kernels(device),
                    }
                )
    return rows


def kernels(device: str) -> str:
    """The vector kernels this process runs: the GPU's name, or ATen's CPU capability (which the env can lower)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return torch.backends.cpu.get_cpu_capability()


def kernel_sets(device: str) -> list[dict[str, str]]:
    """The environments to run trials under: the machine's own kernels, plus AVX2's on a CPU that has more."""
    sets: list[dict[str, str]] = [{}]
    if device == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        sets.append(AVX2)
    return sets


def rounding_latency(device: str, repeats: int, trials: int = 3) -> list[dict]:
    """(iv): `trials` fresh processes per kernel set, each timing every network; one row per kernels, widths and
    batch size with the median trial's figures and the range of the efficiency."""
    rows = []
    for extra in kernel_sets(device):
        runs = [_child(device, repeats, extra) for _ in range(trials)]
        for i, first in enumerate(runs[0]):
            same = [run[i] for run in runs]
            efficiency = [r["efficiency"] for r in same]
            assert all(r["widths"] == first["widths"] and r["batch"] == first["batch"] for r in same)
            median = sorted(same, key=lambda r: r["efficiency"])[len(same) // 2]
            rows.append({**median, "efficiencies": efficiency, "trials": trials, "env": extra})
            print(
                f"resnet56 [{first['kernels']}] {first['widths']} b{first['batch']}: "
                f"FLOPs x{first['flops_speedup']:.2f}, "
                f"efficiency {statistics.median(efficiency):.2f} ({min(efficiency):.2f}-{max(efficiency):.2f}, "
                f"{trials} processes)",
                flush=True,
            )
    return rows


def _child(device: str, repeats: int, extra: dict[str, str]) -> list[dict]:
    """One trial in a fresh process with `extra` in its environment (the kernels must be chosen before start-up)."""
    command = [sys.executable, "-m", "benchmarks.speed_rounding", "--child", "--device", device]
    command += ["--repeats", str(repeats)]
    env = {**os.environ, **REUSE_MEMORY, **extra}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"a rounding trial failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rounding_lines(rows: list[dict], run: str) -> list[str]:
    """The markdown table of section (iv); `run` says how and when it ran."""
    trials = rows[0].get("trials", 1)
    lines = [
        "",
        "## Hardware-friendly widths (CIFAR ResNet-56, 50% FLOPs, L1; eval, inference_mode)",
        "",
        f"Run: {run}. {rows[0]['threads']} thread(s); efficiency = latency speed-up / FLOPs speed-up; the networks "
        f"are timed in turns; each kernel set ran {trials} fresh process(es): the median one's figures, the range of "
        "the efficiency beside them.",
        "",
        "| kernels | widths | batch | FLOPs ratio | FLOPs speed-up | latency speed-up | efficiency | range "
        "| base ms | pruned ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = r.get("efficiencies", [r["efficiency"]])
        lines.append(
            f"| {r.get('kernels', '-')} | {r['widths']} | {r['batch']} | {r['flops_ratio']:.3f} "
            f"| {r['flops_speedup']:.2f} | {r['latency_speedup']:.2f} | {r['efficiency']:.2f} "
            f"| {min(spread):.2f}-{max(spread):.2f} | {r['base_ms']:.2f} | {r['pruned_ms']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="one trial of the rounding section (JSON rows on stdout)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=33)
    args = parser.parse_args()
    print(json.dumps(one_trial(args.device, args.repeats)))


if __name__ == "__main__":
    main()
