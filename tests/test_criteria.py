"""The papers' criteria: similarity (redundant pairs first), hybrid switching, effective-filter capacity limits."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from aip.analyze import main as analyze_main
from aip.config import ActivationConfig, PruneConfig, SimilarityConfig
from aip.prune.capacity import effective_rank, estimate_capacity
from aip.prune.cost import model_cost
from aip.prune.criteria.similarity import redundancy_scores
from aip.prune.criteria.taylor import TaylorImportance
from aip.prune.importance import IMPORTANCES, create_importance, needs_features, prune_threshold
from aip.prune.pruner import ChannelPruner, PruningError
from aip.prune.schedule import criterion_for_interval
from aip.train import main
from tests.test_prune import Residual
from tests.test_run import _config, _report


def _with_twin_filters() -> Residual:
    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():  # channel 9 of conv b duplicates channel 4; BN biases tell the channels apart later
        model.b.weight[9] = model.b.weight[4]
        model.bn_b.bias.copy_(torch.arange(32.0))
        model.bn_b.bias[9] = 4.0
    return model


def test_redundancy_scores_drop_one_twin_first_and_keep_the_other() -> None:
    torch.manual_seed(0)
    v = torch.randn(10, 30)
    v[7] = 0.5 * v[2]  # same direction, weaker
    scores = redundancy_scores(v)
    order = scores.argsort().tolist()
    assert order[0] == 7
    assert scores[2] > scores.sort().values[1]  # the survivor is not next in line


@pytest.mark.parametrize("source", ["weights", "features"])
def test_similarity_removes_a_planted_duplicate_before_any_distinct_filter(source: str) -> None:
    model = _with_twin_filters()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    importance = create_importance("similarity", PruneConfig(similarity=SimilarityConfig(source)))
    base = model_cost(model, example).flops

    def calibrate(m: nn.Module) -> None:
        assert not torch.is_grad_enabled()  # feature maps only: forward passes, no backward
        m(torch.randn(16, 3, 16, 16))

    one_channel_of_b = 2 * 16 * 3 * 3 * 16 * 16  # FLOPs of one output channel of conv b
    log = pruner.prune_to(base - one_channel_of_b / 2, "flops", importance, calibrate)
    assert log.widths_after == {**log.widths_before, "b": 31}  # one channel went, and it was from b
    assert model.bn_b.bias.detach().tolist().count(4.0) == 1  # one twin went, the other stays


def _planted_rank_model(k: int, width: int = 16) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(12, width)
    proj = torch.linalg.qr(torch.randn(width, k))[0].T  # k orthonormal rows: gradients live in their span
    model = nn.Sequential(layer)
    return model, layer, proj


@pytest.mark.parametrize("k", [3, 7])
def test_capacity_reports_the_planted_rank(k: int) -> None:
    model, layer, proj = _planted_rank_model(k)

    def run(m: nn.Module) -> None:
        for _ in range(4):
            h = m(torch.randn(64, 12))
            ((h @ proj.T) ** 2).sum().backward()

    found = estimate_capacity(model, {"fc": layer}, run, tau=0.999, safety=1.0)["fc"]
    assert found.effective_rank == k
    assert found.max_ratio == pytest.approx(1 - k / 16)


def test_effective_rank_threshold() -> None:
    s = torch.tensor([10.0, 1.0, 0.1])
    assert effective_rank(s, 0.99) == 1  # 100 / 101.01 of the energy
    assert effective_rank(s, 0.999) == 2
    assert effective_rank(torch.zeros(3)) == 1


def test_capacity_caps_hold_and_hierarchical_goes_group_by_group() -> None:
    model = Residual()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc], max_layer_ratio=0.9)
    caps = {name: 0.25 for name in pruner.widths()}
    pruner.set_capacity(caps)
    with pytest.raises(PruningError, match="capacity limits"):
        pruner.prune_to(0.2 * model_cost(model, example).flops, "flops", create_importance("l1"))
    for name, width in pruner.widths().items():
        assert width >= math.ceil(pruner.original_widths[name] * 0.75)

    model = Residual()
    pruner = ChannelPruner(model, example, [model.fc], max_layer_ratio=0.9)
    names = sorted(pruner.widths())
    assert names == ["a", "b"]  # the stem and block are one coupled group, rooted at a
    pruner.set_capacity({"a": 0.5, "b": 0.5}, order={"b": 0.2, "a": 0.9})  # b is the more redundant
    # b alone can give 20% of the FLOPs (16 channels of 73.7K), so a stays whole
    log = pruner.prune_to(0.8 * model_cost(model, example).flops, "flops", create_importance("l1"))
    assert log.widths_after["a"] == 16 and 16 <= log.widths_after["b"] < 32
    log = pruner.prune_to(0.6 * model_cost(model, example).flops, "flops", create_importance("l1"))
    assert log.widths_after["b"] == 16 and log.widths_after["a"] < 16  # b at its cap, then a


def test_hybrid_switch_rules() -> None:
    cfg = PruneConfig(criterion="hybrid")
    cfg.hybrid.switch_interval, cfg.hybrid.switch_fraction = 3, None
    assert [criterion_for_interval(cfg, i, 0.0) for i in (1, 2, 3, 4)] == ["l1", "l1", "similarity", "similarity"]
    cfg.hybrid.switch_interval, cfg.hybrid.switch_fraction = None, 0.5
    cfg.hybrid.saliency, cfg.hybrid.similarity = "bn_scale", "fpgm"
    assert [criterion_for_interval(cfg, 1, r) for r in (0.0, 0.49, 0.5, 0.9)] == [
        "bn_scale",
        "bn_scale",
        "fpgm",
        "fpgm",
    ]
    assert criterion_for_interval(PruneConfig(criterion="taylor"), 5, 1.0) == "taylor"


def test_hybrid_is_a_known_name_but_no_importance_and_only_activation_threshold_has_a_prune_threshold() -> None:
    assert "hybrid" in IMPORTANCES.names()
    with pytest.raises(TypeError, match="^hybrid is a schedule of criteria: call criterion_for_interval"):
        create_importance("hybrid")
    threshold = PruneConfig(activation=ActivationConfig(mode="threshold", threshold=0.3))
    assert prune_threshold(create_importance("activation", threshold)) == 0.3
    assert prune_threshold(create_importance("activation")) is None  # mode fraction: the schedule's share
    others = [n for n in IMPORTANCES.names() if n not in ("hybrid", "activation")]
    assert all(prune_threshold(create_importance(n, threshold)) is None for n in others)


def test_hybrid_with_capacity_caps_reaches_its_target_and_logs_the_switch(tmp_path: Path) -> None:
    overrides = {
        "prune.criterion": "hybrid",
        "prune.intervals": 3,
        "prune.target_flops_ratio": 0.75,
        "prune.finetune_epochs": 0,
        "prune.hybrid": {"switch_interval": 3, "switch_fraction": None},
        "prune.capacity": {"enabled": True, "mode": "hierarchical", "batches": 8},
    }
    run_dir = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path, **overrides)), "--out", str(run_dir)]) == 0
    report = _report(run_dir)
    assert 0.75 * 0.95 <= report["stages"][-1]["flops"] / report["teacher"]["flops"] <= 0.75
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert [e["criterion"] for e in log] == ["l1", "l1", "similarity"]
    assert json.loads((run_dir / "checkpoints/stage-03/history.json").read_text())
    capacity = json.loads((run_dir / "checkpoints/stage-03/meta.json").read_text())["state"]["capacity"]
    for name, width in log[-1]["widths"].items():
        orig, limit = capacity[name]["width"], min(0.8, capacity[name]["max_ratio"])
        assert width >= math.ceil(orig * (1 - limit) - 1e-9), name

    out = tmp_path / "analysis"
    assert (
        analyze_main(
            ["--config", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir / "teacher.pt"), "--out", str(out)]
        )
        == 0
    )
    table = (out / "capacity.md").read_text()
    assert "| layer3.0.conv1 | 64 |" in table and "estimated maximum compression" in table
    assert (out / "capacity.png").stat().st_size > 1000
    analysis = json.loads((out / "capacity.json").read_text())
    assert 0.0 < analysis["max_compression"]["flops"] < 1.0


def _with_quiet_channels(quiet: list[int]) -> Residual:
    """Conv b's BN silences the `quiet` channels (scale and shift near 0); biases 10..41 name the others."""
    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        model.bn_b.bias.copy_(torch.arange(10.0, 42.0))
        for i in quiet:
            model.bn_b.weight[i] = 0.0
            model.bn_b.bias[i] = 0.01 * (i + 1)
    return model.eval()


def _calibrate(m: nn.Module) -> None:
    m(torch.randn(16, 3, 16, 16))


def _scores_of(importance: object, model: nn.Module, layer: nn.Module) -> torch.Tensor:
    """The criterion's scores for every output channel of `layer`'s group (built by Torch-Pruning directly)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 16, 16))
    return importance(graph.get_pruning_group(layer, tp.prune_conv_out_channels, list(range(layer.out_channels))))


def test_activation_scores_are_relative_to_the_layer_quantile_and_silent_channels_go_first() -> None:
    model = _with_quiet_channels([3, 20])
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    importance = create_importance("activation")
    with importance.recording(model):
        _calibrate(model)
    scores = _scores_of(importance, model, model.b)
    assert scores.min() >= 0.0
    assert torch.quantile(scores, 0.9) == pytest.approx(1.0)  # one consumer (fc): its 0.9-quantile is 1
    assert set(scores.argsort()[:2].tolist()) == {3, 20}
    assert scores[3] < 0.01 and scores[20] < 0.01

    one_channel_of_b = 2 * 16 * 3 * 3 * 16 * 16
    base = model_cost(model, example).flops
    log = pruner.prune_to(base - one_channel_of_b * 1.5, "flops", importance, _calibrate)
    assert log.widths_after == {**log.widths_before, "b": 30}
    assert model.bn_b.bias.min() >= 10.0  # both quiet channels (biases 0.04 and 0.21) went, the others stay


@pytest.mark.parametrize("bias", [-100.0, 100.0])
def test_activation_scores_what_the_next_layer_sees_and_one_outlier_leaves_the_others_above_threshold(
    bias: float,
) -> None:
    """BN bias -100: the channel is dead after the ReLU (it used to score 1.0, the strongest); +100: an outlier that,
    under max normalisation, pushed every live channel under the threshold. BatchNorm on batch statistics (train
    mode) gives the other channels unit-variance, zero-mean inputs to the ReLU: all alive, all alike."""
    torch.manual_seed(0)
    model = Residual().train()
    with torch.no_grad():
        model.bn_b.bias[5] = bias
    importance = create_importance("activation")
    with importance.recording(model):
        _calibrate(model)
    scores = _scores_of(importance, model, model.b)
    live = torch.cat([scores[:5], scores[6:]])
    assert live.min() >= ActivationConfig().threshold
    if bias < 0:
        assert int(scores.argmin()) == 5 and scores[5] == 0.0
    else:
        assert int(scores.argmax()) == 5


def test_activation_threshold_removes_exactly_the_quiet_channels_and_respects_the_floor() -> None:
    example = torch.randn(1, 3, 16, 16)
    model = _with_quiet_channels([1, 7, 30])
    pruner = ChannelPruner(model, example, [model.fc])
    base = model_cost(model, example).flops
    log = pruner.prune_below(0.1, 0.1 * base, "flops", create_importance("activation"), _calibrate)
    assert log.widths_after == {**log.widths_before, "b": 29}
    assert sorted(model.bn_b.bias.tolist()) == [float(v) for v in range(10, 42) if v not in (11, 17, 40)]

    model = _with_quiet_channels([1, 7, 30])
    pruner = ChannelPruner(model, example, [model.fc])
    one_channel_of_b = 2 * 16 * 3 * 3 * 16 * 16
    log = pruner.prune_below(0.1, base - one_channel_of_b, "flops", create_importance("activation"), _calibrate)
    assert log.widths_after["b"] == 31  # one quiet channel fits above the floor, the other two stay
    assert log.cost_after >= 0.98 * (base - one_channel_of_b)


def test_activation_threshold_run_logs_its_rule_and_never_passes_the_target(tmp_path: Path) -> None:
    overrides = {
        "prune.criterion": "activation",
        "prune.activation": {"mode": "threshold", "threshold": 0.95},
        "prune.target_flops_ratio": 0.7,
        "prune.finetune_epochs": 0,
    }
    run_dir = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path, **overrides)), "--out", str(run_dir)]) == 0
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert [e["criterion"] for e in log] == ["activation", "activation"]
    assert log[0]["ratio_after"] < 1.0  # a 2-epoch teacher has channels under 0.95 of their layer's 0.9-quantile
    assert all(e["ratio_after"] >= 0.7 * 0.98 and e["target_ratio"] == pytest.approx(0.7) for e in log)


def test_taylor_squares_each_batch_sum_where_accumulated_gradients_cancel() -> None:
    """Hand-computed: 1x1 conv, filters (1, 2) and (1, 1), input ones, loss t_b . output on batches t = (2, 1) and
    (-2, 1). Per batch the filters' sums of w * g are (6, 2) and (-6, 2): Molchanov 2019 scores (36 + 36) / 2 = 36 and
    4, so filter 1 goes first. Summed |w * g| on the accumulated gradients (0, 2) gives 0 and 4: filter 0 would."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [1.0, 1.0]]).view(2, 2, 1, 1))
    model = nn.Sequential(conv)
    x = torch.ones(1, 2, 1, 1)
    group = (
        tp.DependencyGraph()
        .build_dependency(model, example_inputs=x)
        .get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 1])
    )
    importance = create_importance("taylor")

    def calibrate(m: nn.Module) -> None:
        for t in ([2.0, 1.0], [-2.0, 1.0]):
            (m(x).flatten() * torch.tensor(t)).sum().backward()

    with importance.recording(model) if needs_features(importance) else contextlib.nullcontext():  # as the pruner
        calibrate(model)
    assert importance(group).tolist() == pytest.approx([36 / 20, 4 / 20])  # normalised to mean 1
    assert tp.importance.GroupTaylorImportance()(group).argmin() == 0  # the summed-|w * g| form ranks the other way


def test_taylor_sums_every_parameter_a_channel_takes_with_it_per_batch() -> None:
    """Group b of the residual model: conv b's filter and bias, BatchNorm scale and shift, fc's input column."""
    torch.manual_seed(0)
    model = Residual()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(3)]
    expected = torch.zeros(32)
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        z = sum((p * p.grad).reshape(32, -1).sum(1) for p in (model.b.weight, model.b.bias))
        z = z + model.bn_b.weight * model.bn_b.weight.grad + model.bn_b.bias * model.bn_b.bias.grad
        expected += (z + (model.fc.weight * model.fc.weight.grad).sum(0)).detach() ** 2
    expected /= expected.mean()
    calls = []
    importance = TaylorImportance(gather=lambda t: calls.append(t) or t)
    model.zero_grad()
    with importance.recording(model):
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y).backward()
    scores = _scores_of(importance, model, model.b)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert len(calls) == 1  # all statistics gathered from the processes in one call


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:regnet_x_400mf"])
@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_scores_equal_torch_prunings_group_magnitude(name: str, p: int) -> None:
    """`l1`/`l2` are Torch-Pruning's GroupMagnitudeImportance(normalizer="mean", no bias), value for value, on every
    group of a residual network and of one with grouped convolutions (whose in-channel scores repeat per group)."""
    from aip.models import classifier_of, create_model
    from aip.prune.criteria.magnitude import MagnitudeImportance

    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 2.0)  # not all ones: BatchNorm's scale takes part in the score
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    ours = MagnitudeImportance(p)
    theirs = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean", bias=False)
    groups = list(graph.get_all_groups(ignored_layers=[classifier_of(model)]))
    assert len(groups) > 10
    for group in groups:
        torch.testing.assert_close(ours(group), theirs(group), rtol=1e-5, atol=1e-7)
