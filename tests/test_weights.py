"""Checkpoints as people have them (aip/models/weights.py): formats, wrappers, prefixes, trust, renames, errors."""

from __future__ import annotations

import argparse
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import torch.serialization as serialization
from safetensors.torch import save_file
from torch import nn

from aip.config import ConfigError
from aip.models import create_model
from aip.models.weights import load_into, load_state_dict_file


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    model = _net()
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer, update BN statistics
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(path: Path, fragment: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_state_dict_file(path, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


def test_bare_state_dict(tmp_path: Path, state: dict) -> None:
    torch.save(state, tmp_path / "bare.pt")
    assert _same(load_state_dict_file(tmp_path / "bare.pt"), state)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net", "ema"])
def test_wrapped_under_each_key(tmp_path: Path, state: dict, key: str) -> None:
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}, key: state}, tmp_path / "wrapped.pth")
    assert _same(load_state_dict_file(tmp_path / "wrapped.pth"), state)


def test_ours_with_a_model_name_string_beside_the_weights(tmp_path: Path, state: dict) -> None:
    torch.save({"model": "cifar_resnet20", "num_classes": 10, "state_dict": state}, tmp_path / "teacher.pt")
    assert _same(load_state_dict_file(tmp_path / "teacher.pt"), state)


def test_nested_once(tmp_path: Path, state: dict) -> None:
    torch.save({"model": {"state_dict": state}, "epoch": 1}, tmp_path / "nested.pt")
    assert _same(load_state_dict_file(tmp_path / "nested.pt"), state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_data_parallel_and_compile_prefixes(tmp_path: Path, state: dict, prefix: str) -> None:
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, tmp_path / "p.pt")
    assert _same(load_state_dict_file(tmp_path / "p.pt"), state)


def test_a_prefix_on_only_some_keys_is_kept(tmp_path: Path, state: dict) -> None:
    """A real submodule called `module` is not a DataParallel prefix."""
    mixed = {("module." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(mixed, tmp_path / "m.pt")
    assert list(load_state_dict_file(tmp_path / "m.pt")) == list(mixed)


def test_safetensors_by_suffix_and_by_content(tmp_path: Path, state: dict) -> None:
    save_file(state, str(tmp_path / "w.safetensors"))
    assert _same(load_state_dict_file(tmp_path / "w.safetensors"), state)
    (tmp_path / "w.safetensors").rename(tmp_path / "w.bin")
    assert _same(load_state_dict_file(tmp_path / "w.bin"), state)


def test_legacy_format_saved_on_a_gpu(tmp_path: Path, state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-zip file whose storages are tagged cuda:0, exactly as torch.save writes them on a GPU machine."""
    cuda_tag = (0, lambda _storage: "cuda:0", lambda _obj, _loc: None)
    monkeypatch.setattr(serialization, "_package_registry", [cuda_tag, *serialization._package_registry])
    path = tmp_path / "legacy.pth"
    torch.save({"net": state}, path, _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    raw = path.read_bytes()
    assert not raw.startswith(b"PK") and b"cuda:0" in raw
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a plain load does on a CPU-only machine
    assert _same(load_state_dict_file(path), state)


def test_training_checkpoint_with_a_namespace_needs_trust(tmp_path: Path, state: dict) -> None:
    path = tmp_path / "timm_style.pth.tar"
    torch.save({"epoch": 3, "arch": "net", "state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    message = _one_line_error(path, "holds Python objects besides tensors (argparse.Namespace)")
    assert "model.trust_checkpoint: true" in message
    assert _same(load_state_dict_file(path, trust=True), state)


def test_a_pickled_module_loads_with_trust(tmp_path: Path, state: dict) -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    model.load_state_dict(state)
    torch.save({"model": model}, tmp_path / "whole.pt")
    _one_line_error(tmp_path / "whole.pt", "model.trust_checkpoint: true")
    assert _same(load_state_dict_file(tmp_path / "whole.pt", trust=True), state)


def test_rename_substrings_in_order(tmp_path: Path, state: dict) -> None:
    torch.save({f"body.{k}": v for k, v in state.items()}, tmp_path / "r.pt")
    loaded = load_state_dict_file(tmp_path / "r.pt", rename={"body.": "", "1.running": "1.moving"})
    assert "1.moving_mean" in loaded and "1.running_mean" not in loaded
    assert torch.equal(loaded["0.weight"], state["0.weight"])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"hello, this is a text file\n", "not a readable PyTorch checkpoint"),
        (b"", "not a readable PyTorch checkpoint"),
    ],
)
def test_text_and_empty_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "x.pt").write_bytes(content)
    _one_line_error(tmp_path / "x.pt", fragment)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_files(tmp_path: Path, state: dict, legacy: bool) -> None:
    full = tmp_path / "full.pt"
    torch.save(state, full, _use_new_zipfile_serialization=not legacy)
    raw = full.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    message = _one_line_error(tmp_path / "cut.pt", "not a readable PyTorch checkpoint", trust=True)
    assert "trust_checkpoint" not in message  # damage is not blamed on trust


def test_truncated_safetensors(tmp_path: Path, state: dict) -> None:
    save_file(state, str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[: len(raw) - 20])
    _one_line_error(tmp_path / "w.safetensors", "not a readable safetensors file")


def test_no_state_dict_inside(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    _one_line_error(tmp_path / "opt.pt", "holds no state dict (keys ['epoch', 'optimizer'])")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, state: dict, bad: float) -> None:
    state["1.weight"][2] = bad
    torch.save(state, tmp_path / "nan.pt")
    _one_line_error(tmp_path / "nan.pt", "1.weight holds 1 non-finite values (NaN or Inf)")


def test_load_into_is_strict_and_names_what_differs(state: dict) -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    load_into(model, state)
    assert _same(model.state_dict(), state)

    changed = {("0.kernel" if k == "0.weight" else k): v for k, v in state.items()}
    changed["3.weight"] = torch.zeros(2, 5)
    with pytest.raises(ConfigError) as info:
        load_into(model, changed, "model.teacher_checkpoint 'x.pt'")
    message = str(info.value)
    assert message.startswith("model.teacher_checkpoint 'x.pt' does not fit the model: ")
    assert "1 missing (0.weight)" in message and "1 unexpected (0.kernel)" in message
    assert "shape differs at 3.weight: (2, 5) in the file, (2, 64) in the model" in message
    assert "model.checkpoint_rename" in message and "\n" not in message


def test_old_files_without_num_batches_tracked_load(state: dict) -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    load_into(model, {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    assert torch.equal(model.state_dict()["1.running_mean"], state["1.running_mean"])


def test_published_layout_loads_into_our_resnet_after_a_rename(tmp_path: Path) -> None:
    """pytorch-cifar-models names shortcuts `downsample`; with the rename they load strictly into cifar_resnet20."""
    ours = create_model("cifar_resnet20", 10).state_dict()
    theirs = {k.replace(".shortcut.", ".downsample."): v for k, v in ours.items()}
    torch.save(theirs, tmp_path / "theirs.pth")
    with pytest.raises(ConfigError, match=r"missing \(layer2.0.shortcut.0.weight"):
        load_into(create_model("cifar_resnet20", 10), load_state_dict_file(tmp_path / "theirs.pth"))
    model = create_model("cifar_resnet20", 10)
    load_into(model, load_state_dict_file(tmp_path / "theirs.pth", rename={".downsample.": ".shortcut."}))
    assert _same(model.state_dict(), ours)


def _member_data_offset(path: Path, member: str) -> int:
    """Where the stored bytes of zip member `member` start: after its local header, name and extra field."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    with path.open("rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len


def test_a_flipped_bit_in_a_stored_tensor_names_its_member(tmp_path: Path, state: dict) -> None:
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path) as archive:
        member = next(n for n in archive.namelist() if n.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    raw[_member_data_offset(path, member)] ^= 0x04  # the lowest byte of a float32: a finite, slightly other weight
    path.write_bytes(bytes(raw))
    flipped = torch.load(path, weights_only=True)  # torch.load itself reads the flipped weight without a word
    assert sorted(flipped) == sorted(state) and not _same(flipped, state)
    message = _one_line_error(path, f"member {member!r} fails its CRC-32 check")
    assert message.startswith(f"model.teacher_checkpoint {str(path)!r}: ")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_weights_where_the_model_has_floats_are_refused(state: dict, dtype: torch.dtype) -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    state["1.running_var"] = state["1.running_var"].round().to(dtype)
    with pytest.raises(ConfigError) as info:
        load_into(model, state, "model.teacher_checkpoint 'x.pt'")
    message = str(info.value)
    assert f"1.running_var holds {dtype} values where the model has torch.float32" in message
    assert "\n" not in message
    load_into(model, {**state, "1.running_var": state["1.running_var"].float()})  # num_batches_tracked: int64 both


def test_a_file_saved_without_checksums_still_loads(tmp_path: Path, state: dict) -> None:
    """torch.save under set_crc32_options(False) records CRC 0 for every member: nothing to check, not damage."""
    before = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "nocrc.pt")
    finally:
        serialization.set_crc32_options(before)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    assert _same(load_state_dict_file(tmp_path / "nocrc.pt"), state)
