"""`export.formats: onnx_int8`: the fp32 ONNX export quantized to int8 by ONNX Runtime, and what deploying it costs.

Static quantization (QDQ, per-channel int8 weights, int8 activations) calibrated on training images through the
validation transform; then top-1 on the validation set and CPU latency, at batch 1 and at `data.batch_size`, of the
fp32 and int8 ONNX files of both the teacher and the student, all through onnxruntime's CPUExecutionProvider.
Latency runs on `THREADS` intra-op thread(s), whatever the machine, so that numbers compare across machines and
runs; accuracy passes use every core (they do not change with the thread count). Files: the run directory gets
model_pruned_int8.onnx; the teacher's fp32 and int8 ONNX, and the student's fp32 ONNX when `onnx` is not among the
formats, live in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from aip.batches import WholeBatches, whole_batch
from aip.export import ONNX_FILE, _reason, _tmp, export_onnx, onnx_loads

if TYPE_CHECKING:
    from aip.session import Session

ONNX_INT8 = "onnx_int8"
INT8_FILE = "model_pruned_int8.onnx"
THREADS = 1  # onnxruntime intra-op threads of every latency measurement (one core: comparable across machines)
LATENCY_REPEATS = 20  # timed runs per figure (the median is reported), after WARMUP untimed ones ...
WARMUP = 3
LATENCY_SECONDS = 3.0  # ... unless they take longer than this: then at least MIN_REPEATS
MIN_REPEATS = 5
CALIBRATION_SEED = 0  # the fixed choice of calibration images (as data.train_subset's): the same in every run

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # a fresh pass of (images, labels) batches


def session_for(path: str | Path, threads: int | None = THREADS) -> Any:
    """An onnxruntime CPU session of `path`; `threads` intra-op threads (None: onnxruntime's default, every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(fp32: str | Path, out: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """Quantize the ONNX file `fp32` to `out` (QDQ, per-channel int8 weights, int8 activations, MinMax ranges over
    the `calibration` batches), atomically: `out` is either the finished file or untouched."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch, dtype=np.float32)}

    out = Path(out)
    tmp = _tmp(out)
    with tempfile.TemporaryDirectory(prefix="aip-int8-") as work:
        pre = Path(work) / "pre.onnx"  # shapes inferred and graph optimised: what quantization works best from
        quant_pre_process(str(fp32), str(pre))
        try:
            quantize_static(
                str(pre),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
            if not onnx_loads(tmp):
                raise RuntimeError("the quantized model does not pass onnx.checker")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def is_int8(path: str | Path) -> bool:
    """Whether the ONNX file holds QuantizeLinear/DequantizeLinear nodes and int8 weights (a quantized model)."""
    import onnx

    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    int8 = any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    return {"QuantizeLinear", "DequantizeLinear"} <= ops and int8


def onnx_top1(path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Top-1 (%) of the ONNX classifier `path` over `batches` of (normalised images, labels), every core."""
    session = session_for(path, threads=None)
    correct = total = 0
    for x, y in batches:
        (logits,) = session.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def onnx_latency_ms(path: str | Path, shape: tuple[int, ...], batch: int) -> float:
    """Median wall time (ms) of one onnxruntime run of `path` on a random batch of `batch` inputs of `shape`."""
    session = session_for(path)
    x = {"images": np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)}
    for _ in range(WARMUP):
        session.run(None, x)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < LATENCY_REPEATS and (len(times) < MIN_REPEATS or time.perf_counter() - began < LATENCY_SECONDS):
        start = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure(
    files: dict[str, tuple[Path, Path]], val: Batches, shape: tuple[int, ...], batch: int
) -> list[dict[str, Any]]:
    """One row per model and format: `files` maps a model's name to its (fp32, int8) ONNX files."""
    rows = []
    for name, pair in files.items():
        for fmt, path in zip(("onnx", "onnx_int8"), pair, strict=True):
            rows.append(
                {
                    "model": name,
                    "format": fmt,
                    "top1": onnx_top1(path, val()),
                    "latency_ms_batch1": onnx_latency_ms(path, shape, 1),
                    f"latency_ms_batch{batch}": onnx_latency_ms(path, shape, batch),
                    "size_mb": Path(path).stat().st_size / 2**20,
                }
            )
    return rows


def drops(rows: list[dict[str, Any]], max_drop: float) -> list[str]:
    """One line per model whose int8 top-1 is more than `max_drop` points below its fp32 ONNX top-1."""
    fp32 = {r["model"]: r["top1"] for r in rows if r["format"] == "onnx"}
    lines = []
    for row in rows:
        drop = fp32.get(row["model"], row["top1"]) - row["top1"]
        if row["format"] == "onnx_int8" and drop > max_drop:
            lines.append(
                f"deploy: the {row['model']}'s int8 ONNX top-1 {row['top1']:.2f} is {drop:.2f} points below its fp32 "
                f"ONNX top-1 {fp32[row['model']]:.2f} (export.int8_max_drop {max_drop:g})"
            )
    return lines


def _batches(session: Session, dataset: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`dataset`'s (images, labels) in order, as numpy, normalised as the run's evaluation sees them."""
    options = session.loader_options(dataset)
    options.update(persistent_workers=False, pin_memory=False)
    in_memory = options["collate_fn"] is whole_batch
    loader = DataLoader(WholeBatches(dataset) if in_memory else dataset, batch_size=batch_size, **options)
    transform = loader.dataset.device_transform if in_memory else None
    for x, y in loader:
        x = transform(x) if transform is not None else x
        yield x.float().cpu().numpy(), y.cpu().numpy()


def calibration_set(session: Session) -> Any:
    """`export.calibration_images` training images through the validation transform, a fixed random choice."""
    images = session.data.train_eval if session.data.train_eval is not None else session.data.train
    n = min(session.cfg.export.calibration_images, len(images))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    return Subset(images, sorted(order[:n].tolist()))


@dataclass
class Deploy:
    """What `write_deploy` did: the files it wrote (names), the report's deploy section, and the warnings it gave."""

    written: list[str] = field(default_factory=list)
    section: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _warn(message: str, deploy: Deploy) -> None:
    warnings.warn(message, stacklevel=3)
    deploy.notes.append(message)


def write_deploy(session: Session, teacher: nn.Module | None, student: nn.Module, repair: bool) -> Deploy:
    """With `onnx_int8` among export.formats: write model_pruned_int8.onnx and measure teacher and student (fp32
    and int8 ONNX; rows in report.json's `deploy`). A step that fails is one warning; the other files stay.

    `repair` (a resumed finished run): a loading int8 file and the deploy section of the existing report are kept."""
    cfg, run_dir, deploy = session.cfg, session.run_dir, Deploy()
    if ONNX_INT8 not in cfg.export.formats:
        return deploy
    path = run_dir / INT8_FILE
    deploy.section = _previous_section(run_dir) if repair and onnx_loads(path) else None
    if deploy.section is None:
        deploy.section = _build(session, teacher, student, deploy)
    for line in drops(deploy.section["rows"] if deploy.section else [], cfg.export.int8_max_drop):
        _warn(line, deploy)
    return deploy


def _build(session: Session, teacher: nn.Module | None, student: nn.Module, deploy: Deploy) -> dict[str, Any] | None:
    """Quantize the student (and the teacher) and measure both; None, with a warning, where a step fails."""
    cfg, path, example, batch = session.cfg, session.run_dir / INT8_FILE, session.example, session.cfg.data.batch_size
    calibration = calibration_set(session)
    calibrate = lambda: (x for x, _ in _batches(session, calibration, cfg.data.eval_batch_size))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="aip-deploy-") as work:
        work = Path(work)
        try:
            fp32 = session.run_dir / ONNX_FILE
            if not ("onnx" in cfg.export.formats and onnx_loads(fp32)):
                fp32 = export_onnx(student, example, work / ONNX_FILE)
            quantize_int8(fp32, path, calibrate())
        except Exception as exc:  # noqa: BLE001 - any exporter or quantizer failure: the other formats stay
            _warn(f"export: onnx_int8 ({INT8_FILE}) not written: {_reason(exc)}", deploy)
            return None
        deploy.written.append(INT8_FILE)
        try:
            files = {"student": (fp32, path)}
            if teacher is not None:
                t32 = export_onnx(teacher, example, work / "teacher.onnx")
                t8 = quantize_int8(t32, work / "teacher_int8.onnx", calibrate())
                files = {"teacher": (t32, t8), **files}
            val = lambda: _batches(session, session.data.val, cfg.data.eval_batch_size)  # noqa: E731
            rows = measure(files, val, tuple(example.shape[1:]), batch)
        except Exception as exc:  # noqa: BLE001 - the int8 file is written; only the measurement is missing
            _warn(f"deploy: not measured: {_reason(exc)}", deploy)
            return None
    return {
        "provider": "CPUExecutionProvider",
        "intra_op_threads": THREADS,
        "batch_size": batch,
        "calibration_images": len(calibration),
        "quantization": "onnxruntime quantize_static: QDQ, per-channel int8 weights, int8 activations, MinMax",
        "rows": rows,
    }


def _previous_section(run_dir: Path) -> dict[str, Any] | None:
    """The deploy section of the run's existing report.json, if it has one."""
    try:
        return json.loads((run_dir / "report.json").read_text()).get("deploy")
    except (OSError, ValueError, AttributeError):
        return None
