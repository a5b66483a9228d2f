"""Speed benchmark: trainer overhead, real latency speed-up of pruned networks, and the cost of one pruning interval.

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--out benchmarks/results]

(i)   one AIP training step (the trainer's own DistillStep) against one plain cross-entropy step of the same student
      plus one teacher forward in inference mode, the three timed apart but in turns, on the same batch;
(ii)  torchvision ResNet-18/50 (224x224) and CIFAR ResNet-56 (32x32) pruned to 50% and 25% of their FLOPs (L1):
      measured latency speed-up against the FLOPs speed-up, batch 1 and 32, eval mode, torch.inference_mode, with
      channels_last where it is faster;
(iii) one pruning interval on ResNet-50 at 224x224: dependency graph, importance and removal, re-prepare;
(iv)  the input pipeline's images/s alone (fetch, copy to the device, augment, normalise) against the AIP step's at
      batch 128, for in-memory CIFAR (uint8 batches augmented on the device) and an ImageFolder tree read from
      files (`--only-loader` runs this section alone).
Figures are medians of repeated runs after warm-up, reported as ratios so they hold on a noisy machine. Results go
to <out>/speed-<device>.json and .md, and a plot to <out>/speed-<device>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aip.batches import cpu_count  # noqa: E402
from aip.config import LossConfig  # noqa: E402
from aip.distill.discriminator import Discriminator  # noqa: E402
from aip.distill.features import FeatureTaps  # noqa: E402
from aip.distill.step import DistillStep  # noqa: E402
from aip.models import classifier_of, create_model, default_taps  # noqa: E402
from aip.prune.cost import model_cost  # noqa: E402
from aip.prune.importance import create_importance  # noqa: E402
from aip.prune.pruner import ChannelPruner  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time in seconds of each function, timed in turns (one call of each per round), so that a slow
    phase of a shared machine weighs on all of them alike rather than on whichever ran then."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def pruned_copy(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of `model` pruned by L1 to `ratio` of its FLOPs."""
    model = copy.deepcopy(model)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9)
    pruner.prune_to(ratio * model_cost(model, example).flops, "flops", create_importance("l1"))
    return model


def step_overhead(device: str, repeats: int, batch: int) -> dict:
    """(i): AIP step vs plain CE step + teacher forward, CIFAR ResNet-56 teacher and its 50%-FLOPs student."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet56", 10).to(acc.device).eval().requires_grad_(False)
    example = torch.randn(1, 3, 32, 32, device=acc.device)
    student = pruned_copy(teacher, example, 0.5).requires_grad_(True).train()
    plain, bare_teacher = copy.deepcopy(student), copy.deepcopy(teacher)  # no taps on these two
    disc = Discriminator(10).to(acc.device)
    x = torch.randn(batch, 3, 32, 32, device=acc.device)
    y = torch.randint(0, 10, (batch,), device=acc.device)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
    student_p, disc_p, opt_s, opt_d, sched = acc.prepare(student, disc, opt_s, opt_d, sched)
    taps = default_taps(student, "cifar_resnet56")
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
        step = DistillStep(acc, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps, LossConfig())
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


def interval_time(device: str) -> dict:
    """(iii): one pruning interval on torchvision ResNet-50 at 224x224, its parts timed apart."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu")
    torch.manual_seed(0)
    model = create_model("torchvision:resnet50", 1000).to(acc.device)
    example = torch.randn(1, 3, 224, 224, device=acc.device)
    start = time.perf_counter()
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.8)
    graph = time.perf_counter() - start
    base = pruner.cost("flops")
    start = time.perf_counter()
    log = pruner.prune_to(0.8 * base, "flops", create_importance("l1"))
    prune = time.perf_counter() - start
    start = time.perf_counter()
    acc.free_memory()
    acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    prepare = time.perf_counter() - start
    return {
        "model": "torchvision:resnet50",
        "input": 224,
        "flops_ratio_after": log.cost_after / base,
        "removal_steps": log.steps,
        "graph_s": graph,
        "score_and_remove_s": prune,
        "re_prepare_s": prepare,
        "total_s": graph + prune + prepare,
    }


def _cifar_tree() -> Path | None:
    """The extracted lossless CIFAR-10 ImageFolder tree (train/, test/) under ~/.cache/aip, if there."""
    root = Path.home() / ".cache" / "aip" / "cifar10"
    return root if (root / "train").is_dir() and (root / "test").is_dir() else None


def _images_per_second(loader, to_inputs, device: str, batches: int, warmup: int = 3) -> float:
    """Images per second that `loader` delivers as model inputs (`to_inputs(batch, index)`, on the device), from
    batch `warmup` on (worker start-up left out), over at most `batches` batches."""
    seen, start = 0, None
    for index, (x, _) in enumerate(loader):
        if index == warmup:
            sync(device)
            start, seen = time.perf_counter(), 0
        to_inputs(x, index)
        seen += len(x)
        if index + 1 >= warmup + batches:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def loader_speed(device: str, repeats: int, batch: int, batches: int) -> dict:
    """(iv): images/s of the input pipeline alone (fetch, copy to the device, augment, normalise) against the AIP
    training step's (section (i)'s step at `batch`), for in-memory CIFAR and for an ImageFolder tree read from
    files; each loader also the way it was before the uint8 pipeline (per-sample transforms, no workers)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from aip.batches import BatchTransform, MemoryImages, resolve_workers, whole_batch
    from aip.config import DataConfig
    from aip.data import CIFAR10_MEAN, CIFAR10_STD, build_data
    from aip.images import load_image
    from aip.seeding import SeededBatches, derive_seed

    tree = _cifar_tree()
    if tree is not None:
        train = build_data(DataConfig(name="cifar10", root=str(tree))).train  # the decoded cache once built
        source = f"CIFAR-10 decoded from {tree}"
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (50_000,), generator=gen)
        train = MemoryImages(images, labels, BatchTransform(CIFAR10_MEAN, CIFAR10_STD, pad=4, flip=True))
        source = "synthetic uint8 50000x3x32x32 (no CIFAR-10 tree)"
    cuda = device == "cuda"
    seeded = SeededBatches(train, seed=1)

    def on_device(x: torch.Tensor, index: int) -> torch.Tensor:
        x = x.to(device, non_blocking=cuda)
        return train.transform(x, torch.Generator().manual_seed(derive_seed(1, 0, index)))

    def plain(x: torch.Tensor, index: int) -> torch.Tensor:
        return x.to(device, non_blocking=cuda)

    options = {"batch_size": batch, "shuffle": True, "drop_last": True, "pin_memory": cuda}
    workers = resolve_workers("auto", in_memory=True)
    rows = [
        {
            "loader": "in-memory CIFAR, uint8 batches augmented on the device",
            "workers": workers,
            "images_s": _images_per_second(
                DataLoader(seeded, collate_fn=whole_batch, num_workers=workers, **options), on_device, device, batches
            ),
        },
        {
            "loader": "in-memory CIFAR, per-sample transforms (before)",
            "workers": 0,
            "images_s": _images_per_second(DataLoader(train, **options), plain, device, max(4, batches // 8)),
        },
    ]
    folder = tree / "train" if tree is not None else None
    if folder is not None:
        size = 32
        transform = v2.Compose(
            [
                v2.RandomResizedCrop(size),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
                v2.ToPureTensor(),
            ]
        )
        files = datasets.ImageFolder(str(folder), transform, loader=load_image)
        auto = resolve_workers("auto", in_memory=False)
        for count in (auto, 0):
            loader = DataLoader(files, num_workers=count, persistent_workers=count > 0, **options)
            rows.append(
                {
                    "loader": f"ImageFolder files ({folder}, imagefolder transforms at {size}px)"
                    + (" (before: no workers)" if count == 0 else ""),
                    "workers": count,
                    "images_s": _images_per_second(loader, plain, device, batches if count else max(4, batches // 8)),
                }
            )
    step_s = step_overhead(device, repeats, batch)["aip_step_s"]
    for row in rows:
        row["over_step"] = row["images_s"] * step_s / batch
    return {"source": source, "batch": batch, "step_images_s": batch / step_s, "rows": rows}


def loader_lines(r: dict) -> list[str]:
    """(iv)'s table: each loader's images/s and its ratio to the AIP step's (target: at least 3)."""
    lines = [
        "",
        f"## Input pipeline against the training step (batch {r['batch']}; {r['source']})",
        "",
        f"AIP step (CIFAR ResNet-56 teacher, 50%-FLOPs student): {r['step_images_s']:.0f} images/s",
        "",
        "| loader | workers | images/s | loader / step |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['loader']} | {row['workers']} | {row['images_s']:.0f} | {row['over_step']:.1f} |")
    return lines


def write(results: dict, out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{device}.json").write_text(json.dumps(results, indent=1))
    s = results["step"]
    lines = [
        f"# Speed ({device}: {results['machine']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"## Trainer overhead (CIFAR ResNet-56 teacher, 50%-FLOPs student, batch {s['batch']})",
        "",
        "| AIP step | plain CE step | teacher forward | AIP / (plain + teacher) | AIP / plain |",
        "|---|---|---|---|---|",
        f"| {1000 * s['aip_step_s']:.1f} ms | {1000 * s['plain_step_s']:.1f} ms "
        f"| {1000 * s['teacher_forward_s']:.1f} ms | {s['aip_over_plain_plus_teacher']:.3f} "
        f"| {s['aip_over_plain']:.2f} |",
        "",
        "## Latency speed-up of pruned networks (eval, inference_mode)",
        "",
        "| model | batch | FLOPs ratio | FLOPs speed-up | latency speed-up | efficiency | base ms | pruned ms "
        "| layout |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["latency"]:
        lines.append(
            f"| {r['model']} ({r['input']}px) | {r['batch']} | {r['flops_ratio']:.3f} | {r['flops_speedup']:.2f} "
            f"| {r['latency_speedup']:.2f} | {r['efficiency']:.2f} | {r['base_ms']:.1f} | {r['pruned_ms']:.1f} "
            f"| {r['layout']} |"
        )
    i = results["interval"]
    lines += [
        "",
        "## One pruning interval (torchvision ResNet-50, 224px, to 80% FLOPs, L1)",
        "",
        "| dependency graph | score + remove | re-prepare | total |",
        "|---|---|---|---|",
        f"| {i['graph_s']:.2f} s | {i['score_and_remove_s']:.2f} s ({i['removal_steps']} steps) "
        f"| {i['re_prepare_s']:.3f} s | {i['total_s']:.2f} s |",
    ]
    if "loader" in results:
        lines += loader_lines(results["loader"])
    (out / f"speed-{device}.md").write_text("\n".join(lines) + "\n")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, CIFAR ResNet-56 and ResNet-18 only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--only-loader", action="store_true", help="section (iv) alone, to speed-loader-<device>.*")
    args = parser.parse_args()
    repeats = 5 if args.quick else 11
    loader_batches = 50 if args.quick else 200
    if args.only_loader:
        load = os.getloadavg()[0]
        result = loader_speed(args.device, repeats, 128, loader_batches)
        write_loader(args, {**result, "load_1min": [load, os.getloadavg()[0]]})
        return
    models = [("cifar_resnet56", 32), ("torchvision:resnet18", 224)]
    if not args.quick:
        models.append(("torchvision:resnet50", 224))
    results = {
        "command": "python benchmarks/speed.py" + (" --quick" if args.quick else "") + f" --device {args.device}",
        "machine": (
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        ),
        "torch": torch.__version__,
        "step": step_overhead(args.device, repeats, 64),
        "latency": latency(args.device, repeats, [1, 32], models),
        "interval": interval_time(args.device),
        "loader": loader_speed(args.device, repeats, 128, loader_batches),
    }
    write(results, Path(args.out), args.device)


def write_loader(args: argparse.Namespace, result: dict) -> None:
    """Section (iv) alone: speed-loader-<device>.json and .md, with the command and the machine."""
    quick = " --quick" if args.quick else ""
    command = f"python benchmarks/speed.py --only-loader{quick} --device {args.device}"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {cpu_count()} CPUs"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-loader-{args.device}.json").write_text(json.dumps({"command": command, **result}, indent=1))
    load = "load average (1 min) {:.1f} at the start, {:.1f} at the end".format(*result["load_1min"])
    lines = [f"# Input pipeline ({args.device}: {machine}, torch {torch.__version__})", "", f"Command: `{command}`"]
    lines += ["", f"Machine load: {load} (other jobs shared the machine when above its CPU count)."]
    lines += loader_lines(result)
    (out / f"speed-loader-{args.device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
