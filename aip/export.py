"""The final pruned model as standalone files that load and run without aip installed: `torch.export` and ONNX.

Each file is written under a temporary name and renamed into place, so a run killed while exporting leaves either
the previous file or none, never a truncated one beside a finished report. The model is exported in fp32 without
the autocast wrapper Accelerate puts on a model prepared for mixed precision. `write_exports` writes every
configured format and turns a format that fails into one warning line: a run that trained for hours keeps the
files that could be written instead of ending in a traceback.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXPORT_FILE = "model_pruned.pt2"
ONNX_FILE = "model_pruned.onnx"
FILES = {"pt2": EXPORT_FILE, "onnx": ONNX_FILE}  # in the order they are written
# onnxruntime's outputs on the check batch must match the model's to this, relative to the largest output.
ONNX_TOLERANCE = 1e-3


def plain_fp32(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in fp32 on the CPU, in eval mode, with its class's own `forward`.

    Accelerate's mixed precision replaces `forward` by an instance attribute (autocast plus a cast of the outputs
    to fp32) and keeps the original as `_original_forward`; both are dropped, or the export would carry autocast.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if module is model or "_original_forward" in module.__dict__:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_original_forward", None)
    return model.float().cpu().eval()


def _program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of the plain fp32 copy of `model`, batch dimension dynamic (both formats start from it)."""
    model = plain_fp32(model)
    example = example.float().cpu()
    if example.shape[0] < 2:  # a batch of 1 would be specialised; 2 lets the dimension stay symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _tmp(path: Path) -> Path:
    """The temporary name `path` is written under before the rename (same folder, same suffix)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # torch.export wants the suffix


def _save_pt2(program: torch.export.ExportedProgram, path: Path) -> Path:
    tmp = _tmp(path)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` in eval mode on the CPU, batch dimension dynamic, to `path` (`.pt2`), atomically.

    Load it with `torch.export.load(path).module()`; the graph holds plain aten ops, no aip classes.
    """
    return _save_pt2(_program(model, example), Path(path))


def _check_batches(example: torch.Tensor) -> list[torch.Tensor]:
    """One image and three different ones (it and its flips): the ONNX file must run at any batch size."""
    one = example[:1].float().cpu()
    return [one, torch.cat([one, one.flip(-1), one.flip(-2)])]


def _save_onnx(program: torch.export.ExportedProgram, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Convert `program` with torch's dynamo-based exporter, check it in onnxruntime against `model`, rename it in.

    The input is `images` and the output `logits`, both with a dynamic `batch` dimension; the weights are inside the
    file (one file, under protobuf's 2 GB limit). A file whose outputs differ from the model's is not kept.
    """
    import onnxruntime as ort

    onnx_program = torch.onnx.export(
        program,
        (program.example_inputs[0][0],),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: "batch"},),
        dynamo=True,
        verbose=False,
    )
    model = plain_fp32(model)
    tmp = _tmp(path)
    try:
        onnx_program.save(tmp, external_data=False)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are not ours
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        for batch in _check_batches(example):
            with torch.no_grad():
                want = model(batch).numpy()
            (got,) = session.run(None, {"images": batch.numpy()})
            error = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            if not error <= ONNX_TOLERANCE * max(1.0, float(np.abs(want).max())):
                raise RuntimeError(
                    f"onnxruntime's outputs at batch {len(batch)} differ from the model's (max difference {error:.3g})"
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` (fp32, eval, CPU) to the ONNX file `path`, batch dimension dynamic, checked, atomically.

    Run it with `onnxruntime.InferenceSession(path).run(None, {"images": images})`.
    """
    return _save_onnx(_program(model, example), model, example, Path(path))


def export_loads(path: str | Path) -> bool:
    """Whether `path` holds an export that `torch.export.load` reads (a missing, empty or damaged file does not)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - whatever a damaged archive raises, it is not a usable export
        return False
    return True


def onnx_loads(path: str | Path) -> bool:
    """Whether `path` holds an ONNX model that parses and passes `onnx.checker` (a damaged file does not)."""
    import onnx

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        onnx.checker.check_model(onnx.load(path), full_check=False)
    except Exception:  # noqa: BLE001 - a truncated or foreign file fails in protobuf or in the checker
        return False
    return True


LOADS = {"pt2": export_loads, "onnx": onnx_loads}


def _reason(exc: BaseException) -> str:
    """`Type: first line` of an exception and of its root cause, on one line (exporters nest the real reason)."""
    parts, seen = [], exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    for e in (exc, seen) if seen is not exc else (exc,):
        text = str(e).strip().splitlines()
        parts.append(f"{type(e).__name__}: {text[0].strip()}" if text else type(e).__name__)
    line = " <- ".join(parts)
    return line if len(line) <= 400 else line[:397] + "..."


def write_exports(
    model: nn.Module, example: torch.Tensor, run_dir: str | Path, formats: list[str], only_stale: bool = False
) -> list[str]:
    """Write `model` as each of `formats` (`pt2`, `onnx`) into `run_dir`; return the formats written.

    One `torch.export` trace serves both. A format that fails is left out with one warning line naming it and the
    reason, and the others are still written. `only_stale`: write only the formats whose file is missing or does
    not load (the repair of a finished run's exports).
    """
    run_dir = Path(run_dir)
    wanted = [f for f in FILES if f in formats and not (only_stale and LOADS[f](run_dir / FILES[f]))]
    if not wanted:
        return []
    try:
        program, traced = _program(model, example), None
    except Exception as exc:  # noqa: BLE001 - reported below for every format; the run must still end
        program, traced = None, exc
    written = []
    for fmt in wanted:
        path = run_dir / FILES[fmt]
        try:
            if program is None:
                raise traced
            if fmt == "pt2":
                _save_pt2(program, path)
            else:
                _save_onnx(program, model, example, path)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: keep what was written, say what was not
            warnings.warn(f"export: {fmt} ({path.name}) not written: {_reason(exc)}", stacklevel=2)
            continue
        written.append(fmt)
    return written
