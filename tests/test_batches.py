"""The input pipeline: in-memory sets fetched as whole uint8 batches and augmented on the device, seeded per batch;
the number of loader workers; the per-epoch seed reaching persistent workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from aip import batches
from aip.batches import BatchTransform, MemoryImages, fetch_batch, resolve_workers, whole_batch
from aip.config import ConfigError, DataConfig, config_from_dict
from aip.data import build_data
from aip.seeding import SeededBatches
from aip.session import Session
from tests.conftest import tiny_run


def _reference(x: torch.Tensor, pad: int, rows: list[int], cols: list[int], flips: list[bool]) -> torch.Tensor:
    """Crop and flip written out sample by sample: pad with zeros, slice, reverse the columns."""
    h, w = x.shape[-2:]
    out = []
    for image, i, j, flip in zip(x, rows, cols, flips, strict=True):
        crop = F.pad(image, (pad,) * 4)[:, i : i + h, j : j + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def test_crop_and_flip_match_a_hand_made_reference() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    identity = BatchTransform((0.0,) * 3, (1 / 255,) * 3, pad=2, flip=True)  # (x / 255 - 0) * 255: the pixels
    for rows, cols, flips in (
        ([0, 4], [4, 0], [False, True]),
        ([2, 1], [3, 2], [True, False]),
        ([2, 2], [2, 2], [0, 0]),
    ):
        got = identity.apply(x, torch.tensor(rows), torch.tensor(cols), torch.tensor(flips, dtype=torch.bool))
        want = _reference(x, 2, rows, cols, [bool(f) for f in flips]).float()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    corner = identity.apply(x, torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([False, False]))
    assert corner[0, 0, :2].abs().max() < 1e-4 and corner[0, 0, 2, 2] == pytest.approx(0.0, abs=1e-4)
    assert corner[0, 0, 3, 4] == pytest.approx(float(x[0, 0, 1, 2]), abs=1e-4)  # shifted down and right by 2


def test_normalisation_per_channel() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = BatchTransform((0.5, 0.2, 0.0), (0.5, 0.1, 2.0))(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    want = torch.tensor([(0 - 0.5) / 0.5, (0.2 - 0.2) / 0.1, (1.0 - 0.0) / 2.0])
    torch.testing.assert_close(out[:, :, 0, 0], want.expand(2, 3))


def test_augmentation_is_determined_by_the_batch_seed() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    t = BatchTransform((0.5,) * 3, (0.25,) * 3, pad=4, flip=True)
    first = t(x, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global stream plays no part
    assert torch.equal(first, t(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, t(x, torch.Generator().manual_seed(8)))
    rows, cols, flips = t.draw(64, torch.Generator().manual_seed(7))
    assert torch.equal(first, t.apply(x, rows, cols, flips))
    assert rows.min() == 0 and rows.max() == 8 and 0 < flips.sum() < 64  # every offset in 0..2*pad, both flips
    manual = _reference(x, 4, rows.tolist(), cols.tolist(), flips.tolist()).float() / 255
    torch.testing.assert_close(first, (manual - 0.5) / 0.25)


def test_a_whole_batch_is_what_the_samples_are_one_by_one() -> None:
    """Fetched whole (through a Subset, as data.train_subset leaves it) and normalised on the device, a batch holds
    the images indexing gives one at a time: what calibration passes and ACP's measurements read."""
    data = build_data(DataConfig(name="synthetic", train_size=100, train_subset=40, batch_size=8, augment=False))
    assert isinstance(data.train, Subset) and isinstance(data.train.dataset, MemoryImages)
    indices = [3, 0, 39, 17]
    images, labels = fetch_batch(data.train, indices)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    singles = [data.train[i] for i in indices]
    torch.testing.assert_close(batches.device_transform(data.train)(images), torch.stack([s[0] for s in singles]))
    assert labels.tolist() == [s[1] for s in singles]
    eval_images = torch.stack([data.train_eval[i][0] for i in indices])
    torch.testing.assert_close(eval_images, torch.stack([s[0] for s in singles]))


def test_the_eval_view_of_an_augmented_set_is_not_augmented() -> None:
    data = build_data(DataConfig(name="synthetic", train_size=64, batch_size=8))
    assert data.train.transform.flip and not data.train_eval.transform.random
    assert data.train_eval.images is data.train.images  # a view: the images are shared
    x = data.train_eval[5][0]
    assert all(torch.equal(data.train_eval[5][0], x) for _ in range(10))
    seen = {bool(torch.equal(data.train[5][0], x)) for _ in range(40)}
    assert seen == {True, False}


def test_synthetic_images_round_to_uint8_but_keep_their_raw_scale() -> None:
    data = build_data(DataConfig(name="synthetic", train_size=512, val_size=8, augment=False))
    assert data.train.images.dtype == torch.uint8
    x = torch.stack([data.train[i][0] for i in range(512)])
    assert 1.8 < x.std() < 2.8 and abs(x.mean()) < 0.3  # raw values: templates plus noise of std 2
    assert (x.unique().diff().min() - 20 / 255).abs() < 1e-4  # steps of 20/255 over -10..10
    scaled = build_data(
        DataConfig(name="synthetic", train_size=512, val_size=8, augment=False, mean=[1.0] * 3, std=[2.0] * 3)
    )
    torch.testing.assert_close(scaled.train[3][0], (data.train[3][0] - 1.0) / 2.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("setting", "in_memory", "cpus", "processes", "want"),
    [
        ("auto", True, 16, 1, 0),
        ("auto", False, 16, 1, 8),
        ("auto", False, 6, 1, 6),
        ("auto", False, 6, 2, 3),
        ("auto", False, 1, 4, 1),
        (3, True, 16, 1, 3),
        (0, False, 16, 1, 0),
    ],
)
def test_num_workers_auto_resolves_to_the_cpus_given(
    monkeypatch: pytest.MonkeyPatch, setting: int | str, in_memory: bool, cpus: int, processes: int, want: int
) -> None:
    monkeypatch.setattr(batches.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert resolve_workers(setting, in_memory, processes) == want


@pytest.mark.parametrize(("value", "fragment"), [("many", "a count >= 0 or auto, got 'many'"), (-1, "must be >= 0")])
def test_a_bad_num_workers_is_a_one_line_config_error(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"num_workers": value}})
    assert str(info.value).startswith("data.num_workers: ") and fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert config_from_dict({}).data.num_workers == "auto"


class _Noise(Dataset):
    """Each sample one number from the global stream: what a random per-sample augmentation draws."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(())


def _epochs(workers: int) -> list[torch.Tensor]:
    seeded = SeededBatches(_Noise())
    loader = DataLoader(seeded, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    out = []
    for seed in (1, 2, 1):
        seeded.seed = seed
        out.append(torch.cat(list(loader)))
    return out


def test_persistent_workers_see_each_epochs_seed() -> None:
    alone, workers = _epochs(0), _epochs(1)
    for a, b in zip(alone, workers, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(workers[0], workers[2]) and not torch.equal(workers[0], workers[1])


def test_the_session_trains_on_uint8_batches_augmented_per_batch_seed(tmp_path: Path, fresh_accelerator_state) -> None:
    cfg = config_from_dict(tiny_run(**{"logging.report_to": []}))
    session = Session(cfg, tmp_path / "run")
    loader = session.train_loader()
    assert loader.num_workers == 0 and loader.collate_fn is whole_batch and not loader.pin_memory

    def first_batch(stage: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        session.seed(stage, epoch)
        x, y = next(iter(loader))
        return x, session.train_inputs(x, index)

    raw, a = first_batch(1, 0, 0)
    assert raw.dtype == torch.uint8 and raw.shape == (32, 3, 16, 16) and a.dtype == torch.float32
    raw_again, b = first_batch(1, 0, 0)
    assert torch.equal(raw, raw_again) and torch.equal(a, b)
    assert not torch.equal(first_batch(1, 0, 1)[1], a)  # another batch index: other flips
    plain = session.data.train.transform.without_augmentation()(raw)
    flipped = (a == plain).flatten(1).all(1) | (a == plain.flip(-1)).flatten(1).all(1)
    assert flipped.all() and not (a == plain).all()
    val = session.val_loader()
    x, _ = next(iter(val))
    assert x.dtype == torch.uint8 and val.dataset.device_transform is not None
    session.close()
