"""Speed benchmark: trainer overhead, real latency speed-up of pruned networks, and the cost of one pruning interval.

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--out benchmarks/results] [--only SECTION...]

(i)   one AIP training step (the trainer's own DistillStep) against one plain cross-entropy step of the same student
      plus one teacher forward in inference mode, the three timed apart but in turns, on the same batch;
(ii)  torchvision ResNet-18/50 (224x224) and CIFAR ResNet-56 (32x32) pruned to 50% and 25% of their FLOPs (L1):
      measured latency speed-up against the FLOPs speed-up, batch 1 and 32, eval mode, torch.inference_mode, with
      channels_last where it is faster;
(iii) one pruning interval on ResNet-50 at 224x224 per criterion (l1, taylor, activation, similarity on feature
      maps): dependency graph, one-time setup, the interval with its calibration passes, re-prepare;
(iv)  CIFAR ResNet-56 at 50% FLOPs with any widths and with `prune.round_to: 8` and 16: latency at batch 1 and 32,
      three fresh processes per kernel set (the CPU's own, and AVX2's on an AVX-512 CPU), the median with the range;
(v)   CIFAR ResNet-56 pruned to a latency target of 0.5 at batch 32 (`prune.target_latency_ratio`'s pricing), with
      and without `round_to: 8`: steps, seconds, the latency reached and measured again, the FLOPs it kept.
Figures are medians of repeated runs after warm-up, reported as ratios so they hold on a noisy machine. Results go
to <out>/speed-<device>.json and .md, and a plot to <out>/speed-<device>.png; `--only SECTION...` reruns some
sections and keeps the others' saved results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aip.config import LossConfig  # noqa: E402
from aip.distill.adversarial import GRID  # noqa: E402
from aip.distill.discriminator import Discriminator  # noqa: E402
from aip.distill.features import FeatureTaps  # noqa: E402
from aip.distill.step import DistillStep, StepParts  # noqa: E402
from aip.models import create_model, default_taps  # noqa: E402
from aip.prune.cost import model_cost  # noqa: E402
from benchmarks.speed_prune import (  # noqa: E402
    interval_lines,
    interval_times,
    latency_target,
    target_lines,
)
from benchmarks.speed_rounding import REUSE_MEMORY, rounding_latency, rounding_lines  # noqa: E402
from benchmarks.timing import interleaved_medians, load, median_time, pruned_copy  # noqa: E402


def step_overhead(device: str, repeats: int, batch: int) -> dict:
    """(i): AIP step vs plain CE step + teacher forward, CIFAR ResNet-56 teacher and its 50%-FLOPs student."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet56", 10).to(acc.device).eval().requires_grad_(False)
    example = torch.randn(1, 3, 32, 32, device=acc.device)
    student = pruned_copy(teacher, example, 0.5).requires_grad_(True).train()
    plain, bare_teacher = copy.deepcopy(student), copy.deepcopy(teacher)  # no taps on these two
    taps = default_taps(student, "cifar_resnet56")
    disc = Discriminator(len(taps) * GRID * GRID, input="attention").to(acc.device)  # the trainer's default
    x = torch.randn(batch, 3, 32, 32, device=acc.device)
    y = torch.randint(0, 10, (batch,), device=acc.device)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
    student_p, disc_p, opt_s, opt_d, sched = acc.prepare(student, disc, opt_s, opt_d, sched)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)

    def plain_step() -> None:
        with acc.autocast():
            loss = nn.functional.cross_entropy(plain(x), y)
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    def teacher_forward() -> None:
        with torch.inference_mode(), acc.autocast():
            bare_teacher(x)

    with FeatureTaps(teacher, taps) as t_taps, FeatureTaps(student, taps) as s_taps:
        parts = StepParts(acc, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps)
        step = DistillStep(parts, LossConfig())
        fns = {"aip": lambda: step(x, y), "plain": plain_step, "teacher": teacher_forward}
        medians = interleaved_medians(fns, device, 3 * repeats, 3)
    aip, plain_t, teacher_t = medians["aip"], medians["plain"], medians["teacher"]
    return {
        "batch": batch,
        "aip_step_s": aip,
        "plain_step_s": plain_t,
        "teacher_forward_s": teacher_t,
        "aip_over_plain_plus_teacher": aip / (plain_t + teacher_t),
        "aip_over_plain": aip / plain_t,
    }


def latency(device: str, repeats: int, batches: list[int], models: list[tuple[str, int]]) -> list[dict]:
    """(ii): latency and FLOPs speed-ups of pruned copies, for each model, ratio and batch size."""
    rows = []
    for name, size in models:
        torch.manual_seed(0)
        base = create_model(name, 1000 if name.startswith("torchvision") else 10).eval()
        example = torch.randn(1, 3, size, size)
        variants = {1.0: base, **{r: pruned_copy(base, example, r).eval() for r in (0.5, 0.25)}}
        flops = {r: model_cost(m, example).flops for r, m in variants.items()}
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device)
            times: dict[float, float] = {}
            layout: dict[float, str] = {}
            for ratio, model in variants.items():
                best = None
                for fmt in (torch.contiguous_format, torch.channels_last):
                    m = copy.deepcopy(model).to(device, memory_format=fmt)
                    xi = x.to(memory_format=fmt)
                    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                        t = median_time(lambda m=m, xi=xi: m(xi), device, repeats, 2)
                    if best is None or t < best:
                        best, layout[ratio] = t, "channels_last" if fmt is torch.channels_last else "contiguous"
                times[ratio] = best
            for ratio in (0.5, 0.25):
                flops_speedup = flops[1.0] / flops[ratio]
                latency_speedup = times[1.0] / times[ratio]
                rows.append(
                    {
                        "model": name,
                        "input": size,
                        "batch": batch,
                        "flops_ratio": flops[ratio] / flops[1.0],
                        "flops_speedup": flops_speedup,
                        "latency_speedup": latency_speedup,
                        "efficiency": latency_speedup / flops_speedup,
                        "base_ms": 1000 * times[1.0],
                        "pruned_ms": 1000 * times[ratio],
                        "layout": layout[ratio],
                    }
                )
                print(
                    f"{name} b{batch} FLOPs x{flops_speedup:.2f}: latency x{latency_speedup:.2f} "
                    f"({1000 * times[1.0]:.1f} -> {1000 * times[ratio]:.1f} ms, {layout[ratio]})",
                    flush=True,
                )
    return rows


def write(results: dict, out: Path, device: str) -> None:
    """The JSON, the markdown tables and the plot of whichever sections `results` holds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{device}.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Speed ({device}: {results['machine']})", "", f"Command: `{results['command']}`"]
    if "step" in results:
        s = results["step"]
        lines += [
            "",
            f"## Trainer overhead (CIFAR ResNet-56 teacher, 50%-FLOPs student, batch {s['batch']})",
            "",
            "| AIP step | plain CE step | teacher forward | AIP / (plain + teacher) | AIP / plain |",
            "|---|---|---|---|---|",
            f"| {1000 * s['aip_step_s']:.1f} ms | {1000 * s['plain_step_s']:.1f} ms "
            f"| {1000 * s['teacher_forward_s']:.1f} ms | {s['aip_over_plain_plus_teacher']:.3f} "
            f"| {s['aip_over_plain']:.2f} |",
        ]
    if "latency" in results:
        lines += [
            "",
            "## Latency speed-up of pruned networks (eval, inference_mode)",
            "",
            "| model | batch | FLOPs ratio | FLOPs speed-up | latency speed-up | efficiency | base ms | pruned ms "
            "| layout |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["latency"]:
            lines.append(
                f"| {r['model']} ({r['input']}px) | {r['batch']} | {r['flops_ratio']:.3f} "
                f"| {r['flops_speedup']:.2f} | {r['latency_speedup']:.2f} | {r['efficiency']:.2f} "
                f"| {r['base_ms']:.1f} | {r['pruned_ms']:.1f} | {r['layout']} |"
            )
    runs = results.get("runs", {})
    if isinstance(results.get("interval"), list):
        lines += interval_lines(results["interval"], runs.get("interval", ""))
    if "rounding" in results:
        lines += rounding_lines(results["rounding"], runs.get("rounding", ""))
    if "target" in results:
        lines += target_lines(results["target"], runs.get("target", ""))
    (out / f"speed-{device}.md").write_text("\n".join(lines) + "\n")
    if "latency" in results:
        plot(results["latency"], out / f"speed-{device}.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = max(r["flops_speedup"] for r in rows) * 1.1
    ax.plot([1, top], [1, top], "k--", label="ideal (latency = FLOPs speed-up)")
    for (model, batch), marker in zip(sorted({(r["model"], r["batch"]) for r in rows}), "osD^v<>p*h", strict=False):
        pts = sorted(
            (r["flops_speedup"], r["latency_speedup"]) for r in rows if (r["model"], r["batch"]) == (model, batch)
        )
        ax.plot(*zip(*[(1.0, 1.0), *pts], strict=True), marker=marker, label=f"{model} b{batch}")
    ax.set_xlabel("FLOPs speed-up")
    ax.set_ylabel("measured latency speed-up")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("step", "latency", "interval", "rounding", "target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, CIFAR ResNet-56 and ResNet-18 only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="run these sections; the others keep their saved results"
    )
    args = parser.parse_args()
    repeats = 5 if args.quick else 11
    models = [("cifar_resnet56", 32), ("torchvision:resnet18", 224)]
    if not args.quick:
        models.append(("torchvision:resnet50", 224))
    saved = Path(args.out) / f"speed-{args.device}.json"
    results = json.loads(saved.read_text()) if args.only and saved.is_file() else {}
    command = "python benchmarks/speed.py" + (" --quick" if args.quick else "") + f" --device {args.device}"
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    if not results:  # a full run; a partial one keeps the full run's header and notes its own per section
        results.update({"command": command, "machine": machine, "torch": torch.__version__})
    run = {
        "step": lambda: step_overhead(args.device, repeats, 64),
        "latency": lambda: latency(args.device, repeats, [1, 32], models),
        "interval": lambda: interval_times(args.device),
        "rounding": lambda: rounding_latency(args.device, 3 * repeats),
        "target": lambda: latency_target(args.device),
    }
    for section in args.only or SECTIONS:
        started = load()
        results[section] = run[section]()
        env = " ".join(f"{k}={os.environ[k]}" for k in REUSE_MEMORY if k in os.environ)  # the allocator's settings
        ran = f"{command} --only {' '.join(args.only)}" if args.only else command
        note = f"`{env + ' ' if env else ''}{ran}` on {machine}"
        results.setdefault("runs", {})[section] = f"{note}, {started} when it started, torch {torch.__version__}"
    write(results, Path(args.out), args.device)


if __name__ == "__main__":
    main()
