"""Deploy benchmark: fp32 and int8 ONNX (onnxruntime, CPU) of a teacher and its 50%-FLOPs student, side by side.

    python benchmarks/deploy.py [--models resnet20 resnet56 resnet18] [--student-run resnet20=DIR ...]
                                [--data DIR] [--work DIR] [--out benchmarks/results]

For each network: teacher fp32, teacher int8, student fp32 (50% of the teacher's FLOPs), student int8: top-1 on the
full 10,000-image CIFAR-10 test set and onnxruntime latency (CPUExecutionProvider, `aip.deploy.THREADS` intra-op
thread, median of repeats) at batch 1 and at the batch size of the table; int8 is `aip.deploy.quantize_int8` (what
`export.formats: onnx_int8` runs: QDQ, per-channel int8 weights, int8 activations, MinMax) calibrated on 256
training images through the validation transform, the same fixed choice a run makes.

Networks: the published CIFAR-10 ResNet-20 and ResNet-56 of ../shared/weights (their normalisation, their
`downsample` modules renamed), and a torchvision ResNet-18 at 224x224 with random weights (latency only: its
top-1 means nothing; calibrated on random normal images).

The CIFAR students: `--student-run NET=DIR` takes a finished aip run's model_pruned.onnx (and its report.json's
FLOPs). Otherwise one is made here on a short, stated budget (BUDGET: `mode: aip`, L1 to 50% of the FLOPs in one
interval, recovery on a fixed training subset for a few epochs), cached under --work; its top-1 is that of a
briefly recovered student, NOT of a fully recovered AIP student, which costs hours on a CPU. The ResNet-18 student
is the teacher pruned by L1 to 50% of its FLOPs, not trained. Results: <out>/deploy.json and deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aip.data import build_data  # noqa: E402
from aip.deploy import CALIBRATION_SEED, THREADS, onnx_latency_ms, onnx_top1, quantize_int8  # noqa: E402
from aip.export import ONNX_FILE, export_onnx  # noqa: E402
from aip.models import create_model  # noqa: E402
from aip.prune.cost import model_cost  # noqa: E402
from aip.schema import DataConfig  # noqa: E402
from benchmarks.quality import MODELS, SHARED, find_data  # noqa: E402
from benchmarks.timing import pruned_copy  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]  # what the published weights were trained with
CALIBRATION = 256
CIFAR_BATCH = 128  # the latency batch of the CIFAR tables (the recovery's data.batch_size)
IMAGENET_BATCH = 32
EVAL_BATCH = 500
# The short recovery of a student made here: stated in the results, never a fully recovered accuracy.
# ResNet-56 costs about three times ResNet-20 per image, so it recovers on fewer images to keep the default run short.
BUDGET = {"intervals": 1, "epochs_between": 1, "finetune_epochs": 1, "lr": 0.01, "batch": 128}
SUBSET = {"resnet20": 5000, "resnet56": 1500}  # data.train_subset of the recovery


def student_config(key: str, weights: Path, data: Path) -> dict:
    """The aip run that makes a CIFAR student on BUDGET: L1 to 50% FLOPs, AIP recovery on a training subset."""
    b, net = BUDGET, MODELS[key]
    return {
        "mode": "aip",
        "seed": 0,
        "name": f"deploy-{net['name']}",
        "model": {
            "name": net["name"],
            "teacher_checkpoint": str(weights),
            "checkpoint_rename": {".downsample.": ".shortcut."},
        },
        "data": {
            "name": "cifar10",
            "root": str(data),
            "batch_size": b["batch"],
            "eval_batch_size": EVAL_BATCH,
            "num_workers": 0,
            "train_subset": SUBSET[key],
            "mean": MEAN,
            "std": STD,
        },
        "train": {"lr": b["lr"], "scheduler": "cosine", "log_every": 50},
        "prune": {
            "criterion": "l1",
            "target_flops_ratio": 0.5,
            "intervals": b["intervals"],
            "epochs_between": b["epochs_between"],
            "finetune_epochs": b["finetune_epochs"],
        },
        "checkpoint": {"keep": 1},
        "export": {"formats": ["onnx"]},
        "logging": {"report_to": []},
    }


def make_student(key: str, weights: Path, data: Path, work: Path) -> Path:
    """A finished aip run on BUDGET under `work` (reused when its report and ONNX file are there)."""
    import yaml

    from aip.train import main as train_main

    cfg = student_config(key, weights, data)
    run_dir = work / cfg["name"]
    same = (run_dir / "budget.json").is_file() and json.loads((run_dir / "budget.json").read_text()) == cfg
    if same and (run_dir / "report.json").is_file() and (run_dir / ONNX_FILE).is_file():
        print(f"reusing the student run {run_dir}", flush=True)
        return run_dir
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if train_main(["--config", str(path), "--out", str(run_dir), "--overwrite"]) != 0:
        sys.exit(f"error: the student run of {key} failed")
    (run_dir / "budget.json").write_text(json.dumps(cfg))
    return run_dir


def cifar_arrays(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration images (a fixed random choice of training images, validation transform), test images, labels."""
    bundle = build_data(DataConfig(name="cifar10", root=str(data), mean=MEAN, std=STD))
    val, train = bundle.val, bundle.train_eval
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    pick = torch.tensor(sorted(order[:CALIBRATION].tolist()))
    calib = train.transform(train.images[pick]).numpy()
    return calib, val.transform(val.images).numpy(), val.labels.numpy()


def rows_for(files: dict, test: tuple[np.ndarray, np.ndarray] | None, shape: tuple, batch: int, flops: dict) -> list:
    """One row per (model, format): top-1 (None without test data), latency at 1 and `batch`, size, FLOPs."""
    rows = []
    for (model, fmt), path in files.items():
        top1 = None
        if test is not None:
            x, y = test
            top1 = onnx_top1(
                path, ((x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]) for i in range(0, len(y), EVAL_BATCH))
            )
        row = {
            "model": model,
            "format": fmt,
            "flops": flops[model],
            "top1": top1,
            "latency_ms_batch1": onnx_latency_ms(path, shape, 1),
            f"latency_ms_batch{batch}": onnx_latency_ms(path, shape, batch),
            "size_mb": Path(path).stat().st_size / 2**20,
        }
        rows.append(row)
        shown = "-" if top1 is None else f"{top1:.2f}"
        print(f"  {model} {fmt}: top-1 {shown}  {row['latency_ms_batch1']:.3f} ms (batch 1)", flush=True)
    return rows


def cifar_net(key: str, data: Path, work: Path, student_run: str | None, arrays: tuple) -> dict:
    """The four rows of a published CIFAR ResNet and its 50%-FLOPs student."""
    net = MODELS[key]
    weights = SHARED / "weights" / net["weights"]
    calib, x, y = arrays
    example = torch.from_numpy(x[:1])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    teacher = create_model(net["name"], 10, 3, {}, example)
    teacher.load_state_dict({k.replace(".downsample.", ".shortcut."): v for k, v in state.items()})
    run_dir = Path(student_run) if student_run else make_student(key, weights, data, work)
    report = json.loads((run_dir / "report.json").read_text())
    flops = {"teacher": model_cost(teacher.eval(), example).flops, "student": report["stages"][-1]["flops"]}
    out = work / key
    out.mkdir(parents=True, exist_ok=True)
    files = {("teacher", "onnx"): export_onnx(teacher, example, out / "teacher.onnx")}
    files[("teacher", "onnx_int8")] = quantize_int8(files[("teacher", "onnx")], out / "teacher_int8.onnx", [calib])
    files[("student", "onnx")] = run_dir / ONNX_FILE
    files[("student", "onnx_int8")] = quantize_int8(run_dir / ONNX_FILE, out / "student_int8.onnx", [calib])
    rows = rows_for(files, (x, y), (3, 32, 32), CIFAR_BATCH, flops)
    source = (
        f"--student-run {run_dir}"
        if student_run
        else f"made here on the short budget (BUDGET), top-1 {report['stages'][-1]['top1']:.2f} in torch"
    )
    return {"batch": CIFAR_BATCH, "rows": rows, "student": source, "teacher_top1_torch": report["teacher"]["top1"]}


def resnet18(work: Path) -> dict:
    """torchvision ResNet-18 at 224x224, random weights, and its L1 copy at 50% FLOPs: latency only."""
    torch.manual_seed(0)
    example = torch.randn(1, 3, 224, 224)
    teacher = create_model("torchvision:resnet18", 1000, 3, {}, example).eval()
    student = pruned_copy(teacher, example, 0.5).eval()
    flops = {"teacher": model_cost(teacher, example).flops, "student": model_cost(student, example).flops}
    calib = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
    out = work / "resnet18"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in (("teacher", teacher), ("student", student)):
        files[(name, "onnx")] = export_onnx(model, example, out / f"{name}.onnx")
        files[(name, "onnx_int8")] = quantize_int8(files[(name, "onnx")], out / f"{name}_int8.onnx", [calib])
    rows = rows_for(files, None, (3, 224, 224), IMAGENET_BATCH, flops)
    return {"batch": IMAGENET_BATCH, "rows": rows, "student": "L1-pruned copy of the teacher, random weights"}


def cpu_name() -> str:
    """The CPU's model name and the vector extensions int8 kernels use (VNNI makes int8 convolutions fast)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{name or platform.processor() or platform.machine()} ({', '.join(simd) or 'no AVX2'})"


NAMES = {"resnet20": "CIFAR ResNet-20", "resnet56": "CIFAR ResNet-56", "resnet18": "ResNet-18 224px (random)"}


def markdown(out: dict) -> list[str]:
    """The side-by-side table: per network, teacher and student in fp32 and int8."""
    lines = [
        "# Deploy: fp32 and int8 ONNX on the CPU",
        "",
        f"{out['machine']['description']}; onnxruntime {out['machine']['onnxruntime']} CPUExecutionProvider, "
        f"{THREADS} intra-op thread, median latency. Top-1 on the full CIFAR-10 test set. CIFAR students: "
        f"{out['student_note']}",
        "",
        "| network | model | format | FLOPs | top-1 | latency batch 1 (ms) | latency batch N (ms) | N | size (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, net in out["networks"].items():
        batched = f"latency_ms_batch{net['batch']}"
        for r in net["rows"]:
            top1 = "-" if r["top1"] is None else f"{r['top1']:.2f}"
            lines.append(
                f"| {NAMES[key]} | {r['model']} | {r['format']} | {r['flops'] / 1e6:.1f}M | {top1} "
                f"| {r['latency_ms_batch1']:.3f} | {r[batched]:.2f} | {net['batch']} | {r['size_mb']:.2f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet18"], choices=list(NAMES))
    parser.add_argument("--student-run", action="append", default=[], help="NET=DIR: a finished aip run's student")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder tree with train/ and test/ (default ~/.cache/aip/cifar10)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "aip" / "deploy-bench"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.student_run)
    started, work, load = time.perf_counter(), Path(args.work), list(os.getloadavg())  # a shared machine's noise
    networks = {}
    cifar = [m for m in args.models if m != "resnet18"]
    if cifar:
        data = find_data(args.data)
        arrays = cifar_arrays(data)
        for key in cifar:
            print(f"{key}:", flush=True)
            networks[key] = cifar_net(key, data, work, given.get(key), arrays)
    if "resnet18" in args.models:
        print("resnet18:", flush=True)
        networks["resnet18"] = resnet18(work)
    import onnxruntime

    cpu = cpu_name()
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "description": f"{cpu}, {os.cpu_count()} cores, CPU",
            "load_average_at_start": load,
            "load_average_at_end": list(os.getloadavg()),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "settings": {
            "intra_op_threads": THREADS,
            "calibration_images": CALIBRATION,
            "quantization": "onnxruntime quantize_static: QDQ, per-channel int8 weights, int8 activations, MinMax",
        },
        "student_budget": {**BUDGET, "train_subset": SUBSET},
        "student_note": (
            "L1 to 50% of the FLOPs in one interval, AIP recovery of "
            f"{BUDGET['epochs_between'] + BUDGET['finetune_epochs']} epochs on a fixed subset of "
            + " / ".join(f"{n} (ResNet-{k[6:]})" for k, n in SUBSET.items())
            + " training images: a short budget, not a fully recovered student (unless --student-run gave one)"
        ),
        "networks": networks,
        "wall_seconds": time.perf_counter() - started,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "deploy.json").write_text(json.dumps(out, indent=1))
    (dest / "deploy.md").write_text("\n".join(markdown(out)) + "\n")
    print("\n".join(markdown(out)))


if __name__ == "__main__":
    main()
