"""export.formats onnx_int8: the int8 file, the report's deploy table, the drop warning, refusals and failures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from aip.config import ConfigError, config_from_dict
from aip.data import build_data
from aip.deploy import INT8_FILE, drops, is_int8, session_for, write_deploy
from aip.export import EXPORT_FILE, ONNX_FILE, write_exports
from aip.models import create_model
from aip.session import Session
from aip.train import main
from tests.conftest import tiny_run

FORMATS = ["pt2", "onnx", "onnx_int8"]


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny AIP run exporting all three formats, its drop limit out of reach (no warning may come)."""
    tmp = tmp_path_factory.mktemp("int8")
    cfg = tiny_run(**{"export.formats": FORMATS, "export.int8_max_drop": 100.0, "logging.report_to": []})
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--config", str(tmp / "tiny.yaml"), "--out", str(tmp / "run")]) == 0
    assert not [w for w in caught if "deploy" in str(w.message) or "onnx_int8" in str(w.message)]
    return tmp / "run"


def _val(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = build_data(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).data)
    images = np.stack([data.val[i][0].numpy() for i in range(len(data.val))])
    return images, np.array([data.val[i][1] for i in range(len(data.val))])


def test_the_run_writes_the_int8_file_and_the_deploy_table(int8_run: Path) -> None:
    for name in (EXPORT_FILE, ONNX_FILE, INT8_FILE):
        assert (int8_run / name).is_file(), name
    report = json.loads((int8_run / "report.json").read_text())
    deploy = report["deploy"]
    assert [(r["model"], r["format"]) for r in deploy["rows"]] == [
        ("teacher", "onnx"),
        ("teacher", "onnx_int8"),
        ("student", "onnx"),
        ("student", "onnx_int8"),
    ]
    assert deploy["batch_size"] == 32 and deploy["intra_op_threads"] == 1 and deploy["calibration_images"] == 256
    for row in deploy["rows"]:
        assert row["latency_ms_batch1"] > 0 and row["latency_ms_batch32"] > 0 and row["size_mb"] > 0
    assert "notes" not in report
    md = (int8_run / "report.md").read_text()
    assert "## Deploy" in md and "| teacher | onnx_int8 |" in md and "| student | onnx_int8 |" in md


def test_fp32_onnx_top1_is_aips_top1_on_the_same_validation_set(int8_run: Path) -> None:
    report = json.loads((int8_run / "report.json").read_text())
    rows = {(r["model"], r["format"]): r["top1"] for r in report["deploy"]["rows"]}
    one_image = 100.0 / 128  # onnxruntime's and torch's kernels may break one near-tie differently, no more
    assert abs(rows[("student", "onnx")] - report["stages"][-1]["top1"]) <= one_image
    assert abs(rows[("teacher", "onnx")] - report["teacher"]["top1"]) <= one_image


def test_the_int8_model_is_quantized_and_agrees_with_the_fp32_one(int8_run: Path) -> None:
    path = int8_run / INT8_FILE
    assert is_int8(path) and not is_int8(int8_run / ONNX_FILE)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in int8) > 10_000  # the conv weights themselves, not a stray constant
    images, labels = _val(int8_run)
    fp32 = session_for(int8_run / ONNX_FILE, None).run(None, {"images": images})[0]
    q = session_for(path, None).run(None, {"images": images})[0]
    # Per-channel int8 weights and calibrated int8 activations cost each layer about 1% of its range; through
    # nine layers a few % of the logits' range. On this barely trained 4-class model many images are near-ties
    # (median top-2 margin ~0.7 in logits up to ~9), so a few predictions may flip, never most of them.
    assert np.abs(q - fp32).max() <= 0.1 * np.abs(fp32).max()
    assert (q.argmax(1) == fp32.argmax(1)).mean() >= 0.85
    assert abs((q.argmax(1) == labels).mean() - (fp32.argmax(1) == labels).mean()) <= 0.1


def _session(tmp_path: Path, **overrides) -> tuple[Session, torch.nn.Module, torch.nn.Module]:
    """A session on tiny_run's data (no training) and two untrained ResNet-8s as teacher and student."""
    cfg = config_from_dict(tiny_run(**{"export.formats": FORMATS, "logging.report_to": [], **overrides}))
    session = Session(cfg, tmp_path)
    teacher, student = (create_model("cifar_resnet8", 4, 3, {}, session.example) for _ in range(2))
    return session, teacher.eval(), student.eval()


def test_a_drop_beyond_int8_max_drop_warns(tmp_path: Path, monkeypatch, fresh_accelerator_state) -> None:
    session, teacher, student = _session(tmp_path)
    # Measured top-1: 80 for an fp32 file, 80 - 1.5 for an int8 one (the limit is 1.0 point).
    monkeypatch.setattr("aip.deploy.onnx_top1", lambda path, batches: 78.5 if "int8" in Path(path).name else 80.0)
    write_exports(student, session.example, tmp_path, ["onnx"])
    with pytest.warns(UserWarning, match=r"int8 ONNX top-1 78.50 is 1.50 points below") as caught:
        deploy = write_deploy(session, teacher, student, repair=False)
    named = [str(w.message) for w in caught if "points below" in str(w.message)]
    assert len(named) == 2 and "teacher's" in named[0] and "student's" in named[1]
    assert deploy.notes == named and deploy.written == [INT8_FILE]


def test_drops_within_the_limit_do_not_warn() -> None:
    rows = [
        {"model": "student", "format": "onnx", "top1": 80.0},
        {"model": "student", "format": "onnx_int8", "top1": 79.0},
    ]
    assert drops(rows, 1.0) == [] and len(drops(rows, 0.5)) == 1


def test_a_quantization_failure_warns_and_keeps_the_other_formats(
    tmp_path: Path, monkeypatch, fresh_accelerator_state
) -> None:
    import onnxruntime.quantization

    session, teacher, student = _session(tmp_path)

    def fails(*args, **kwargs):
        raise RuntimeError("no quantizer here")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fails)
    assert write_exports(student, session.example, tmp_path, FORMATS) == ["pt2", "onnx"]
    with pytest.warns(UserWarning, match=r"^export: onnx_int8 \(model_pruned_int8.onnx\) not written: RuntimeError"):
        deploy = write_deploy(session, teacher, student, repair=False)
    assert deploy.section is None and deploy.written == []
    assert (tmp_path / EXPORT_FILE).is_file() and (tmp_path / ONNX_FILE).is_file()
    assert not list(tmp_path.glob("*int8*"))


@pytest.mark.parametrize(
    ("export", "fragment"),
    [
        ({"calibration_images": 0}, "export.calibration_images: must be > 0"),
        ({"calibration_images": -5}, "export.calibration_images: must be > 0"),
        ({"int8_max_drop": -1.0}, "export.int8_max_drop: must lie in 0..100"),
        ({"int8_max_drop": 101}, "export.int8_max_drop: must lie in 0..100"),
        ({"int8_max_drop": ".nan"}, "export.int8_max_drop"),
    ],
)
def test_int8_settings_are_checked(export: dict, fragment: str) -> None:
    if export.get("int8_max_drop") == ".nan":
        export = {"int8_max_drop": float("nan")}
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        config_from_dict({"export": export})


def test_onnx_int8_is_refused_for_detection() -> None:
    with pytest.raises(ConfigError, match="onnx_int8 is not supported yet with task detection"):
        config_from_dict(
            {
                "task": "detection",
                "model": {"name": "tiny_ssd"},
                "data": {"name": "synthetic"},
                "export": {"formats": ["onnx_int8"]},
            }
        )


def test_the_int8_defaults() -> None:
    cfg = config_from_dict({})
    assert cfg.export.calibration_images == 256 and cfg.export.int8_max_drop == 1.0
    assert config_from_dict({"export": {"formats": ["onnx_int8"]}}).export.formats == ["onnx_int8"]
