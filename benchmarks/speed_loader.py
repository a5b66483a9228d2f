"""Speed of the input pipeline: images/s of the loader alone (fetch, copy to the device, augment, normalise) beside
the AIP training step's images/s (CIFAR ResNet-56 teacher, 50%-FLOPs student, batch 128).

    python benchmarks/speed_loader.py [--quick] [--device cpu|cuda] [--out benchmarks/results]

For in-memory CIFAR (uint8 batches augmented on the device; the lossless tree in ~/.cache/aip/cifar10 when present,
else a synthetic uint8 set of the same size) and for an ImageFolder tree read from files, each also the way it was
before the uint8 pipeline (per-sample transforms, no workers). Results: <out>/speed-loader-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from speed import step_overhead
from timing import sync

from aip.batches import cpu_count


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


def write_loader(args: argparse.Namespace, result: dict) -> None:
    """Section (iv) alone: speed-loader-<device>.json and .md, with the command and the machine."""
    quick = " --quick" if args.quick else ""
    command = f"python benchmarks/speed_loader.py{quick} --device {args.device}"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    repeats, batches = (5, 50) if args.quick else (11, 200)
    load = os.getloadavg()[0]
    result = loader_speed(args.device, repeats, 128, batches)
    write_loader(args, {**result, "load_1min": [load, os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
