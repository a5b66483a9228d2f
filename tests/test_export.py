"""The export: fp32 without Accelerate's autocast after a bf16 run, written atomically, and repaired (only) by a
resume of a finished run whose export is missing or damaged; the ONNX file runs in onnxruntime like the student, and
a format that fails is one warning while the others are written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn

from aip import checkpoint as ckpt
from aip import export as exporting
from aip.checks import check_names
from aip.config import ConfigError, config_from_dict
from aip.export import EXPORT_FILE, ONNX_FILE, export_loads, export_model, onnx_loads, write_exports
from aip.models import classifier_of, create_model
from aip.prune.pruner import ChannelPruner
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent
IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process; bf16 here must not leak into other tests."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny AIP run under bf16 autocast on the CPU (its own process: Accelerate's state is global)."""
    tmp = tmp_path_factory.mktemp("bf16")
    overrides = {"train.mixed_precision": "bf16", "train.teacher_epochs": 1, "prune.intervals": 1}
    (tmp / "c.yaml").write_text(yaml.safe_dump(tiny_run(**overrides)))
    cmd = [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(tmp / "c.yaml"), "--out", str(tmp / "run")]
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def _student(run_dir: Path) -> nn.Module:
    """The final student from the run's last stage checkpoint, in fp32 with its class's own forward."""
    path = ckpt.latest_valid(run_dir)
    history, _ = ckpt.read(path)
    model = create_model("cifar_resnet8", 4, 3)
    ChannelPruner(model, IMAGES[:1], [classifier_of(model)]).replay(history)
    model.load_state_dict(load_file(str(path / ckpt.STATE_DIR / "model.safetensors")))
    return model.eval()


def _exported(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(path).module()(IMAGES)


def test_a_bf16_run_exports_the_fp32_student(bf16_run: Path) -> None:
    assert yaml.safe_load((bf16_run / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    student = _student(bf16_run)
    with torch.no_grad():
        want = student(IMAGES)
    torch.testing.assert_close(_exported(bf16_run / EXPORT_FILE), want, atol=1e-5, rtol=0)


def test_export_of_a_model_prepared_for_bf16_drops_the_autocast_wrapper(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 14 * 14, 4))
    prepared = accelerator.prepare(model)
    with torch.no_grad():
        want = nn.Sequential.forward(model, IMAGES)
        assert (prepared(IMAGES) - want).abs().max() > 1e-4  # autocast is really on
    export_model(accelerator.unwrap_model(prepared), IMAGES[:1], tmp_path / "m.pt2")
    torch.testing.assert_close(_exported(tmp_path / "m.pt2"), want, atol=1e-5, rtol=0)
    assert "forward" in model.__dict__  # the live model keeps its wrapper: only the exported copy is plain


def test_a_failed_export_leaves_the_previous_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    path = export_model(model, IMAGES[:1], tmp_path / EXPORT_FILE)
    before = path.read_bytes()

    def killed(program, file, *args, **kwargs) -> None:
        Path(file).write_bytes(b"half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, IMAGES[:1], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [EXPORT_FILE]
    (tmp_path / "empty.pt2").write_bytes(b"")
    assert export_loads(path) and not export_loads(tmp_path / "empty.pt2") and not export_loads(tmp_path / "none")


def _snapshot(run_dir: Path) -> dict[str, int]:
    """Modification times of the checkpoints, the teacher and the stage table: a retrained run changes them."""
    files = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()] + [run_dir / "teacher.pt"]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files}


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage"])
def test_resume_of_a_finished_run_repairs_only_its_export(bf16_run: Path, tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bf16_run, run_dir)
    want = _exported(run_dir / EXPORT_FILE)
    report = (run_dir / "report.json").read_text()
    before = _snapshot(run_dir)
    export = run_dir / EXPORT_FILE
    if damage == "missing":
        export.unlink()
    else:
        export.write_bytes(b"" if damage == "empty" else os.urandom(4096))
    assert main(["--resume", str(run_dir)]) == 0
    torch.testing.assert_close(_exported(export), want, atol=1e-6, rtol=0)
    assert _snapshot(run_dir) == before  # nothing was trained again
    assert (run_dir / "report.json").read_text() == report


def test_resume_of_a_finished_run_with_a_good_export_leaves_it_alone(bf16_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bf16_run, run_dir)
    stamps = [(run_dir / name).stat().st_mtime_ns for name in (EXPORT_FILE, ONNX_FILE)]
    assert main(["--resume", str(run_dir)]) == 0
    assert [(run_dir / name).stat().st_mtime_ns for name in (EXPORT_FILE, ONNX_FILE)] == stamps


def _onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    return torch.from_numpy(logits)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_onnx_file_runs_in_onnxruntime_like_the_student(bf16_run: Path, batch: int) -> None:
    student = _student(bf16_run)
    images = IMAGES[:batch]
    with torch.no_grad():
        want = student(images)
    session = ort.InferenceSession(str(bf16_run / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].shape[0] == "batch"
    torch.testing.assert_close(_onnx(bf16_run / ONNX_FILE, images), want, atol=1e-4, rtol=0)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 4)).eval()


def _fails(*args, **kwargs):
    raise RuntimeError("no exporter today\nsecond line of the traceback text")


@pytest.mark.parametrize("broken", ["onnx", "pt2"])
def test_a_format_that_fails_is_one_warning_and_the_other_is_written(tmp_path: Path, monkeypatch, broken: str) -> None:
    model, name = _tiny(), {"onnx": ONNX_FILE, "pt2": EXPORT_FILE}[broken]
    monkeypatch.setattr(*((torch.onnx, "export") if broken == "onnx" else (torch.export, "save")), _fails)
    with pytest.warns(UserWarning) as caught:
        written = write_exports(model, IMAGES[:1], tmp_path, ["pt2", "onnx"])
    messages = [str(w.message) for w in caught if "export:" in str(w.message)]
    assert messages == [f"export: {broken} ({name}) not written: RuntimeError: no exporter today"]
    assert written == [f for f in ("pt2", "onnx") if f != broken]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({EXPORT_FILE, ONNX_FILE} - {name})  # no temporary
    with torch.no_grad():
        want = model(IMAGES[:3])
    if broken == "pt2":
        torch.testing.assert_close(_onnx(tmp_path / ONNX_FILE, IMAGES[:3]), want, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(_exported(tmp_path / EXPORT_FILE)[:3], want, atol=1e-5, rtol=0)


def test_an_onnx_file_whose_outputs_differ_from_the_model_is_not_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(exporting, "ONNX_TOLERANCE", -1.0)  # no difference passes: as if the exporter were wrong
    with pytest.warns(UserWarning, match=r"onnx \(model_pruned.onnx\) not written: .*at batch 1 differ from"):
        assert write_exports(_tiny(), IMAGES[:1], tmp_path, ["onnx"]) == []
    assert list(tmp_path.iterdir()) == []


def test_a_model_torch_export_cannot_trace_writes_nothing_and_warns_for_each_format(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :4] if x.sum() > 0 else -x.flatten(1)[:, :4]

    with pytest.warns(UserWarning) as caught:
        assert write_exports(DataDependent(), IMAGES[:1], tmp_path, ["onnx", "pt2"]) == []
    messages = [str(w.message) for w in caught if "export:" in str(w.message)]
    assert [m.split(" not written: ")[0] for m in messages] == [
        "export: pt2 (model_pruned.pt2)",
        "export: onnx (model_pruned.onnx)",
    ]
    assert all("\n" not in m for m in messages) and list(tmp_path.iterdir()) == []


def test_resume_of_a_finished_run_repairs_a_damaged_onnx_file_only(bf16_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bf16_run, run_dir)
    (run_dir / ONNX_FILE).write_bytes((run_dir / ONNX_FILE).read_bytes()[:1000])  # truncated
    assert not onnx_loads(run_dir / ONNX_FILE)
    stamp, before = (run_dir / EXPORT_FILE).stat().st_mtime_ns, _snapshot(run_dir)
    assert main(["--resume", str(run_dir)]) == 0
    assert onnx_loads(run_dir / ONNX_FILE) and (run_dir / EXPORT_FILE).stat().st_mtime_ns == stamp
    assert _snapshot(run_dir) == before
    student = _student(run_dir)
    with torch.no_grad():
        want = student(IMAGES[:3])
    torch.testing.assert_close(_onnx(run_dir / ONNX_FILE, IMAGES[:3]), want, atol=1e-4, rtol=0)


def test_a_run_whose_onnx_export_fails_ends_normally_with_the_pt2_file(
    bf16_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bf16_run, run_dir)
    for name in (EXPORT_FILE, ONNX_FILE):
        (run_dir / name).unlink()
    monkeypatch.setattr(torch.onnx, "export", _fails)
    with pytest.warns(UserWarning, match=r"^export: onnx \(model_pruned.onnx\) not written: RuntimeError: no exporter"):
        assert main(["--resume", str(run_dir)]) == 0
    assert export_loads(run_dir / EXPORT_FILE) and not (run_dir / ONNX_FILE).exists()
    assert "model_pruned.pt2 missing or damaged" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("formats", "fragment"),
    [
        (["pt2", "tflite"], "export.formats[1]: 'tflite' is not allowed; choose one of: pt2, onnx"),
        (["onnx", "onnx"], "each format once"),
    ],
)
def test_export_formats_are_checked(formats: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"export": {"formats": formats}})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_no_export_formats_is_allowed() -> None:
    cfg = config_from_dict({"export": {"formats": []}})
    check_names(cfg)
    assert cfg.export.formats == [] and config_from_dict({}).export.formats == ["pt2", "onnx"]
