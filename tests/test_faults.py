"""Fault injection: a run killed at any point resumes, with `--resume DIR`, to the unbroken run's result.

Each case runs the same seeded tiny AIP run (its teacher trained first, a mid-stage checkpoint every 3 optimizer
steps) into a fresh directory and "kills" it in-process at one point: a patched function raises `Killed`, a
BaseException, so no `except Exception` of the trainer sees it, as none sees a SIGKILL. The case checks that the
run stopped where it says (what is on disk), resumes it as a user would, and asserts exit 0, the unbroken run's
report.json (every row: params, FLOPs, top-1, top-5), pruning log widths and exported outputs (pt2 and ONNX,
bit for bit: the runs are seeded and one-threaded), that the resume redid only the work after the point it went on
from, and that no temporary file or directory is left in the run directory. A damaged checkpoint (truncated, a bit
flipped, manifest or meta edited, NaN or wrong-shape weights under a re-recorded manifest) in a copy of the finished
run is refused in one line when named, and skipped with a warning by `--resume DIR`, which then finishes.

The tiny run: a ResNet-8 teacher trained for 2 epochs of 8 steps (16 SGD steps), then 3 stages (prune, prune,
finetune) of one 8-step epoch each: 24 distillation steps, global steps 1-8, 9-16, 17-24, checkpointed at every
third step and at each stage end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate.checkpointing
import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file

from aip import checkpoint as ckpt
from aip.distill.step import DistillStep
from aip.prune.pruner import ChannelPruner
from aip.train import main
from tests.conftest import IMAGES, exported_outputs, tiny_run

TEACHER_STEPS = 16  # 2 epochs x 8 batches
DISTILL_STEPS = 24  # 3 stages x 1 epoch x 8 batches


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so the trainer's `except Exception` clauses let it through."""


@dataclass
class Calls:
    """Work done by a run: SGD steps (teacher and student) and distillation steps."""

    sgd: int = 0
    distill: int = 0


def _count(patch: pytest.MonkeyPatch, kill_sgd: int | None = None, kill_distill: int | None = None) -> Calls:
    """Count SGD and DistillStep calls; raise Killed at the `kill_sgd`-th SGD step or `kill_distill`-th DistillStep
    call, before it does anything."""
    calls = Calls()
    sgd_step, distill_call = torch.optim.SGD.step, DistillStep.__call__

    def counted_sgd(self, *args, **kwargs):
        calls.sgd += 1
        if calls.sgd == kill_sgd:
            raise Killed
        return sgd_step(self, *args, **kwargs)

    def counted_distill(self, *args, **kwargs):
        calls.distill += 1
        if calls.distill == kill_distill:
            raise Killed
        return distill_call(self, *args, **kwargs)

    counted_sgd.hooked = True  # torch wraps an unhooked `step` in its profiling hook on the next optimizer built
    patch.setattr(torch.optim.SGD, "step", counted_sgd)
    patch.setattr(DistillStep, "__call__", counted_distill)
    return calls


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _widths(run_dir: Path) -> list:
    return [entry["widths"] for entry in json.loads((run_dir / "pruning_log.json").read_text())]


def _onnx_outputs(run_dir: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(run_dir / "model_pruned.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": IMAGES.numpy()})[0]


def _temporaries(run_dir: Path) -> list[str]:
    """Whatever a write under a temporary name left: `*.tmp*` files and directories, `*.old` checkpoints."""
    return sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run(**{"checkpoint.every_n_steps": 3})))
    return path


@pytest.fixture(scope="module")
def unbroken(config: Path) -> Path:
    """The reference: the same run, never interrupted."""
    run_dir = config.parent / "unbroken"
    with pytest.MonkeyPatch.context() as patch:
        calls = _count(patch)
        assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    assert calls == Calls(sgd=TEACHER_STEPS + DISTILL_STEPS, distill=DISTILL_STEPS)  # the arithmetic above holds
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["stage-01", "stage-02", "stage-03"]
    assert _temporaries(run_dir) == []
    return run_dir


# ---------------------------------------------------------------------------------------------- the kill points
# Each installs its kill on `patch` and returns a check of what the killed run left on disk, which proves the kill
# happened where it says (and may add what a SIGKILL there leaves that an in-process exception does not).


def _during_teacher_training(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    _count(patch, kill_sgd=11)  # epoch 2, step 3 of the teacher's supervised training

    def check() -> None:
        assert (run_dir / "config.yaml").is_file()
        assert not (run_dir / "teacher.pt").exists()
        assert ckpt.list_checkpoints(run_dir) == []

    return check


def _after_teacher_before_first_checkpoint(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    def killed(*args, **kwargs):
        raise Killed

    patch.setattr(ChannelPruner, "prune_to", killed)  # the first prune, of stage 1

    def check() -> None:
        assert (run_dir / "teacher.pt").is_file()
        assert ckpt.list_checkpoints(run_dir) == []
        assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())

    return check


def _during_recovery_epoch(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    _count(patch, kill_distill=14)  # global step 14: stage 2, batch 6 of 8, after the step-12 checkpoint

    def check() -> None:
        assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, 2, 12)
        meta = json.loads((ckpt.stage_dir(run_dir, 2, 12) / "meta.json").read_text())
        assert meta["partial"] == {"stage": 2, "epoch": 0, "batch": 4}

    return check


def _during_checkpoint_commit(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    write_manifest = ckpt.write_manifest

    def killed(root: Path) -> None:  # stage 2's end: state/, history.json and meta.json are written, no manifest
        if Path(root).name == ckpt.temporary(run_dir, 2).name:
            raise Killed
        write_manifest(root)

    patch.setattr(ckpt, "write_manifest", killed)

    def check() -> None:
        tmp = ckpt.temporary(run_dir, 2)
        assert (tmp / "history.json").is_file() and (tmp / "meta.json").is_file()
        assert (tmp / ckpt.STATE_DIR / "model.safetensors").is_file() and not (tmp / ckpt.MANIFEST).exists()
        assert not ckpt.stage_dir(run_dir, 2).exists()
        assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, 2, 15)

    return check


def _during_state_save(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    save = accelerate.checkpointing.save
    target = ckpt.temporary(run_dir, 1, 6) / ckpt.STATE_DIR / "model_1.safetensors"  # the discriminator's weights

    def killed(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if Path(path) == target:  # Accelerate's save_state of the step-6 checkpoint, half-way through this file
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
            raise Killed

    patch.setattr(accelerate.checkpointing, "save", killed)

    def check() -> None:
        assert target.is_file() and not (target.parent / "optimizer.bin").exists()
        assert not ckpt.stage_dir(run_dir, 1, 6).exists()
        assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, 1, 3)

    return check


def _during_export(patch: pytest.MonkeyPatch, run_dir: Path) -> Callable[[], None]:
    written: list[Path] = []

    def killed(program, path, *args, **kwargs) -> None:
        Path(path).write_bytes(b"PK\x03\x04 the first bytes of a zip archive, and then nothing")
        written.append(Path(path))
        raise Killed

    patch.setattr(torch.export, "save", killed)

    def check() -> None:
        assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, 3)
        assert not (run_dir / "model_pruned.pt2").exists() and not (run_dir / "report.json").exists()
        (tmp,) = written
        assert tmp.parent == run_dir and ".tmp" in tmp.name
        # A SIGKILL runs no `finally`: the half-written temporary stays, named after the killed process's pid,
        # which is not the pid of the process that resumes (here both are this one, so rename it to another).
        tmp.with_name(tmp.name.replace(f".{os.getpid()}.", f".{os.getpid() + 1}.")).write_bytes(b"PK\x03\x04")
        assert _temporaries(run_dir)

    return check


# kill point -> (inject, the work the resume must redo: (teacher trained again, distillation steps))
KILL_POINTS = {
    "teacher_training": (_during_teacher_training, (True, DISTILL_STEPS)),
    "after_teacher_pt": (_after_teacher_before_first_checkpoint, (False, DISTILL_STEPS)),
    "recovery_epoch": (_during_recovery_epoch, (False, DISTILL_STEPS - 12)),
    "checkpoint_commit": (_during_checkpoint_commit, (False, DISTILL_STEPS - 15)),
    "checkpoint_state_save": (_during_state_save, (False, DISTILL_STEPS - 3)),
    "export": (_during_export, (False, 0)),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_the_unbroken_result(point: str, config: Path, unbroken: Path, tmp_path: Path) -> None:
    inject, (teacher_again, distill_again) = KILL_POINTS[point]
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        check = inject(patch, run_dir)
        with pytest.raises(Killed):
            main(["--config", str(config), "--out", str(run_dir)])
    GradientState._reset_state()  # the killed run's data loaders never finished their iteration
    AcceleratorState._reset_state()
    assert not (run_dir / "report.json").exists()
    check()

    with pytest.MonkeyPatch.context() as patch:
        calls = _count(patch)
        assert main(["--resume", str(run_dir)]) == 0
    assert calls.distill == distill_again
    assert calls.sgd == (TEACHER_STEPS if teacher_again else 0) + distill_again

    assert _report(run_dir) == _report(unbroken)  # teacher and stage rows, exactly
    assert _widths(run_dir) == _widths(unbroken)
    torch.testing.assert_close(exported_outputs(run_dir), exported_outputs(unbroken), rtol=0, atol=0)
    np.testing.assert_array_equal(_onnx_outputs(run_dir), _onnx_outputs(unbroken))
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["stage-01", "stage-02", "stage-03"]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(run_dir))
    assert _temporaries(run_dir) == []


# ---------------------------------------------------------------------------------------- damaged checkpoints
# Each damages the newest checkpoint (stage-03) of a copy of the finished run, as a disk or a tool would. Naming that
# checkpoint stops with one `error:` line; `--resume DIR` skips it with a warning naming what is wrong and redoes
# stage 3 from stage-02, to the unbroken run's result. "Rehashed" damage re-records the manifest after the change
# (as a tool that knows the format would), so that the checks beyond the checksums must catch it.


def _weights(path: Path) -> Path:
    return path / ckpt.STATE_DIR / "model.safetensors"


def _truncate(path: Path) -> None:
    data = _weights(path).read_bytes()
    _weights(path).write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(_weights(path).read_bytes())
    data[len(data) // 2] ^= 0x10
    _weights(path).write_bytes(bytes(data))


def _edit_json(path: Path, name: str, edit: Callable[[Any], object], rehash: bool = True) -> None:
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))
    if rehash:
        ckpt.write_manifest(path)


def _manifest_size(path: Path) -> None:
    _edit_json(path, ckpt.MANIFEST, lambda m: m["meta.json"].update(size=m["meta.json"]["size"] + 1), rehash=False)


def _manifest_entry_dropped(path: Path) -> None:  # the file it vouched for is then rewritten unchecked
    _edit_json(path, ckpt.MANIFEST, lambda m: m.pop("state/optimizer.bin"), rehash=False)
    (path / ckpt.STATE_DIR / "optimizer.bin").write_bytes(b"not a pickle")


def _meta_stage(path: Path) -> None:
    _edit_json(path, "meta.json", lambda m: (m.update(stage=2), m["state"].update(stage=2)))


def _history(path: Path) -> None:  # the last prune of layer3.0.shortcut.0 forgotten: another architecture
    _edit_json(path, "history.json", lambda h: h.pop())


def _tensor(path: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(str(_weights(path)))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(_weights(path)), metadata={"format": "pt"})
    ckpt.write_manifest(path)


def _nan_weights(path: Path) -> None:
    _tensor(path, "conv1.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))


def _wrong_shape(path: Path) -> None:
    _tensor(path, "layer1.0.conv1.weight", lambda t: torch.cat([t, t[:1]]))


# damage -> what the warning and the error say
DAMAGE = {
    "truncated": (_truncate, r"state/model.safetensors has \d+ bytes, the manifest says \d+"),
    "bit_flip": (_flip_bit, "state/model.safetensors does not match its checksum"),
    "manifest_size": (_manifest_size, r"meta.json has \d+ bytes, the manifest says \d+"),
    "manifest_entry_dropped": (_manifest_entry_dropped, "state/optimizer.bin is not in the manifest"),
    "meta_stage_rehashed": (_meta_stage, "meta.json says stage 2, the checkpoint is of stage 3"),
    "history_rehashed": (_history, "history.json is not the pruning history the weights were saved with"),
    "nan_weights_rehashed": (_nan_weights, "state/model.safetensors: conv1.weight holds NaN or infinite values"),
    "wrong_shape_rehashed": (
        _wrong_shape,
        r"state/model.safetensors: layer1.0.conv1.weight is F32 \[\d+, \d+, 3, 3\], the architecture has F32 \[\d+, "
        r"\d+, 3, 3\]",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_fails_in_one_line_or_is_skipped_and_the_run_finishes(
    damage: str, unbroken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inject, reason = DAMAGE[damage]
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    for name in ("report.json", "model_pruned.pt2"):  # as if the run had died after committing stage 3
        (run_dir / name).unlink()
    newest = ckpt.stage_dir(run_dir, 3)
    inject(newest)

    capsys.readouterr()
    assert main(["--resume", str(newest)]) == 2  # named: it is refused, with its reason, in one line
    GradientState._reset_state()
    AcceleratorState._reset_state()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert re.fullmatch(f"error: checkpoint '{re.escape(str(newest))}' is damaged: {reason}", err.strip()), err

    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match=f"stage-03: {reason}"):
        calls = _count(patch)
        assert main(["--resume", str(run_dir), "--set", "export.formats=[pt2]"]) == 0
    assert calls.distill == DISTILL_STEPS // 3  # stage 3 again, from stage-02
    assert _report(run_dir) == _report(unbroken)
    torch.testing.assert_close(exported_outputs(run_dir), exported_outputs(unbroken), rtol=0, atol=0)
    assert ckpt.latest_valid(run_dir) == newest and ckpt.verify(newest) is None  # rewritten whole
    assert _temporaries(run_dir) == []


def _garbage_optimizer(path: Path) -> None:
    (path / ckpt.STATE_DIR / "optimizer.bin").write_bytes(b"not a pickle")
    ckpt.write_manifest(path)


def _unknown_state_key(path: Path) -> None:
    _edit_json(path, "meta.json", lambda m: m["state"].update(from_the_future=1))


@pytest.mark.parametrize(
    ("inject", "reason"),
    [
        (_garbage_optimizer, "does not load into the run"),
        (_unknown_state_key, "unknown run-state keys from_the_future"),
    ],
)
def test_a_rehashed_checkpoint_that_does_not_load_stops_in_one_line(
    inject: Callable[[Path], None], reason: str, unbroken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Damage the checks cannot see (valid hashes, well-formed files) still ends in one line, not a traceback."""
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    inject(ckpt.stage_dir(run_dir, 3))
    capsys.readouterr()
    assert main(["--resume", str(ckpt.stage_dir(run_dir, 3))]) == 2
    GradientState._reset_state()
    AcceleratorState._reset_state()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and reason in err, err
