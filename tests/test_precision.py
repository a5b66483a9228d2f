"""Mixed precision and what the run measures: under `train.mixed_precision: bf16` the teacher computes in fp32 whether
it was trained in the run or loaded, and a latency target times the student in the teacher's precision (its own fp32
forward, not Accelerate's autocast wrapper), so the two are compared alike."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from aip.accel import plain_forward, strip_autocast
from aip.config import config_from_dict
from aip.methods.aip import latency_ms
from aip.methods.train import train_supervised
from aip.session import Session
from tests.conftest import IMAGES, tiny_run


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps one mixed-precision setting per process; bf16 here must not leak into other tests."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _session(tmp_path: Path, **overrides: object) -> Session:
    cfg = tiny_run(**{"train.mixed_precision": "bf16", "data.train_size": 64, **overrides})
    return Session(config_from_dict(cfg), tmp_path / "run")


def test_a_teacher_trained_in_a_bf16_run_computes_in_fp32(tmp_path: Path) -> None:
    session = _session(tmp_path)
    teacher = train_supervised(session, session.new_model(), 1, "teacher").eval()
    twin = session.new_model().eval()
    twin.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(teacher(IMAGES), twin(IMAGES), rtol=0, atol=0)


def test_plain_forward_undoes_the_autocast_wrapper_for_its_duration_only(tmp_path: Path) -> None:
    session = _session(tmp_path)
    model = session.new_model().eval()
    reference = copy.deepcopy(model)
    prepared = session.prepare(model)
    with torch.no_grad():
        wrapped = prepared(IMAGES)
        with plain_forward(prepared) as plain:
            torch.testing.assert_close(plain(IMAGES), reference(IMAGES), rtol=0, atol=0)
        assert not torch.equal(prepared(IMAGES), reference(IMAGES))  # the wrapper is back: bf16 again
        torch.testing.assert_close(prepared(IMAGES), wrapped, rtol=0, atol=0)
    assert "forward" not in vars(strip_autocast(prepared))  # the class's own forward, no instance attribute left


def test_prepared_again_a_student_is_wrapped_once(tmp_path: Path) -> None:
    session = _session(tmp_path)
    model = session.new_model()
    for _ in range(3):  # one prepare per stage
        model = session.accelerator.unwrap_model(session.prepare(model))
    original = vars(model)["_original_forward"]
    assert original.__func__ is type(model).forward  # the model's own forward, not an earlier stage's wrapper


def test_the_latency_of_a_bf16_student_is_timed_in_the_teachers_precision(tmp_path: Path) -> None:
    session = _session(tmp_path, **{"data.batch_size": 64})
    teacher = session.new_model().eval().requires_grad_(False)
    student = session.prepare(copy.deepcopy(teacher).requires_grad_(True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratio = latency_ms(session, student, teacher, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert 0.6 < ratio < 1.6  # the same network in the same precision; bf16 against fp32 on a CPU reads 3-8x
