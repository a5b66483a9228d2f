"""ACP: clustering keeps one channel per group of duplicates; PSO finds a known optimum, resumes, respects budgets."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aip import checks
from aip.config import ConfigError, PruneConfig, SimilarityConfig, SwarmConfig, config_from_dict
from aip.data import build_data
from aip.models import classifier_of, create_model
from aip.prune.cost import model_cost
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner, PruningError
from aip.prune.widths import WidthCost
from aip.search import fitness
from aip.search.acp import ParticleSwarm, cluster_channels, dbscan, scale_to_budget
from aip.search.fitness import SearchData, channel_responses, cut_to_widths, split_search_data
from aip.search.widths import search_widths
from aip.tasks.classification import ClassificationTask
from aip.train import main
from tests.conftest import tiny_run
from tests.test_run import _config, _report


def test_clustering_counts_one_channel_per_group_of_identical_channels() -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 50)
    responses = torch.stack([a] * 6 + [2.0 * b] * 5 + [c])  # scale does not matter: correlation distance
    width, labels = cluster_channels(responses, eps=0.05, min_samples=5)
    assert width == 3  # two clusters and one noise channel
    assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:11].tolist())) == 1
    assert labels[0] != labels[6] and labels[11] == -1


def test_dbscan_border_points_join_but_do_not_extend() -> None:
    pts = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.3, 0.45, 5.0])
    labels = dbscan((pts[:, None] - pts[None]).abs(), eps=0.16, min_samples=4)
    assert labels.tolist() == [0, 0, 0, 0, 0, -1, -1]  # 0.3 is a border point: 0.45 stays out


def test_materialising_a_clustered_width_keeps_one_of_each_duplicate_group() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    example = torch.randn(1, 3, 6, 6)
    model(example)
    with torch.no_grad():  # filters 0-3 identical, 4-6 identical, 7 alone
        model[0].weight[1:4] = model[0].weight[0]
        model[0].weight[5:7] = model[0].weight[4]
        model[0].bias[1:4] = model[0].bias[0]
        model[0].bias[5:7] = model[0].bias[4]
    original = model[0].weight.detach().clone()
    pruner = ChannelPruner(model, example, [model[3]], max_layer_ratio=0.9)
    pruner.prune_to_widths({"0": 3}, create_importance("similarity"))
    kept = model[0].weight.detach()
    assert kept.shape[0] == 3
    for rows in ([0, 1, 2, 3], [4, 5, 6], [7]):
        assert sum(any(torch.equal(k, original[r]) for r in rows) for k in kept) == 1


def test_pso_finds_a_known_optimum() -> None:
    target = [5, 17, 23, 9]
    calls = []

    def fitness(w: list[int]) -> float:
        calls.append(w)
        return -float(sum((a - b) ** 2 for a, b in zip(w, target, strict=True)))

    cfg = SwarmConfig(particles=10, iterations=30, velocity_clip=4.0, init_spread=1.0)
    swarm = ParticleSwarm([2] * 4, [30] * 4, fitness, lambda w: [round(x) for x in w], cfg, seed=0)
    assert swarm.run([2, 2, 2, 2]) == target
    assert len(calls) == 10 * 31


def test_pso_resumes_from_its_saved_state(tmp_path: Path) -> None:
    def fitness(w: list[int]) -> float:
        return -float(sum((a - 11) ** 2 for a in w))

    def swarm(iterations: int, path: Path) -> ParticleSwarm:
        cfg = SwarmConfig(particles=5, iterations=iterations)
        return ParticleSwarm([1] * 3, [20] * 3, fitness, lambda w: [round(x) for x in w], cfg, 3, path, key="k")

    whole = swarm(4, tmp_path / "a.json").run([1, 1, 1])
    swarm(2, tmp_path / "b.json").run([1, 1, 1])  # stops after 2 iterations, as if killed
    assert json.loads((tmp_path / "b.json").read_text())["iteration"] == 2
    resumed = swarm(4, tmp_path / "b.json")
    assert resumed.run([1, 1, 1]) == whole
    assert resumed.state.history == json.loads((tmp_path / "a.json").read_text())["history"]


def test_every_candidate_respects_coupling_and_the_budget() -> None:
    model = create_model("cifar_resnet20", 10)
    example = torch.randn(1, 3, 32, 32)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9)
    names = list(pruner.widths())
    wc = WidthCost(pruner)
    base = wc.of(pruner.widths(), "flops")
    budget = 0.5 * base
    lower = [pruner.min_width(n) for n in names]
    upper = [pruner.original_widths[n] for n in names]
    seen = []

    def cost(w: list[int]) -> float:
        return wc.of(dict(zip(names, w, strict=True)), "flops")

    def fitness(w: list[int]) -> float:
        seen.append(w)
        return float(torch.rand(1))

    cfg = SwarmConfig(particles=6, iterations=3, velocity_clip=8.0, init_spread=0.5)
    best = ParticleSwarm(lower, upper, fitness, lambda w: scale_to_budget(w, lower, cost, budget), cfg).run(upper)
    assert len(seen) == 6 * 4 and all(cost(w) <= budget for w in seen)
    assert all(lo <= x <= hi for w in seen for x, lo, hi in zip(w, lower, upper, strict=True))
    pruner.prune_to_widths(dict(zip(names, best, strict=True)), create_importance("l1"))
    assert model_cost(model, example).flops == cost(best) <= budget
    # coupled layers share one width: the stem and every block output of a stage
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == model.layer1[2].conv2.out_channels


def test_acp_mode_end_to_end_meets_the_flops_target(tmp_path: Path) -> None:
    overrides = {
        "mode": "acp",
        "acp": {
            "holdout_size": 64,
            "recovery_steps": 5,
            "calibration_images": 64,
            "swarm": {"particles": 3, "iterations": 2},
        },
    }
    run_dir = tmp_path / "acp"
    assert main(["--config", str(_config(tmp_path, **overrides)), "--out", str(run_dir)]) == 0
    report = _report(run_dir)
    assert [s["kind"] for s in report["stages"]] == ["acp", "acp", "finetune"]  # tiny_run: 2 intervals + fine-tune
    ratios = [s["flops"] / report["teacher"]["flops"] for s in report["stages"]]
    assert ratios[0] > ratios[1] and 0.3 < ratios[1] <= 0.6 and ratios[2] == ratios[1]
    log = json.loads((run_dir / "pruning_log.json").read_text())
    # geometric over 2 intervals, down to the searched widths' cost: the first cut keeps its square root
    assert log[0]["target_ratio"] == pytest.approx(log[1]["ratio_after"] ** 0.5)
    assert log[0]["ratio_after"] <= log[0]["target_ratio"] and log[1]["target_ratio"] == 0.6
    searched = log[0]["searched_widths"]
    assert log[1]["searched_widths"] == searched and log[1]["widths"] == searched  # the last cut: the search's
    assert "search_seconds" in log[0] and "search_seconds" not in log[1]  # searched once, before the first cut
    for name, width in log[0]["widths"].items():  # the first cut lies between the teacher's and the searched
        assert searched[name] <= width
    swarm = json.loads((run_dir / "acp_swarm.json").read_text())
    assert swarm["iteration"] == 2 and len(swarm["positions"]) == 3
    assert (run_dir / "model_pruned.pt2").is_file()


def test_pso_scoring_a_whole_iteration_at_once_finds_the_same() -> None:
    def fitness(w: list[int]) -> float:
        return -float(sum((a - b) ** 2 for a, b in zip(w, [5, 17, 23, 9], strict=True)))

    batches = []

    def evaluate_many(candidates: list[list[int]]) -> list[float]:
        batches.append(len(candidates))
        return [fitness(w) for w in candidates]

    cfg = SwarmConfig(particles=6, iterations=5, velocity_clip=4.0, init_spread=1.0)
    one = ParticleSwarm([2] * 4, [30] * 4, fitness, lambda w: [round(x) for x in w], cfg, seed=1)
    many = ParticleSwarm([2] * 4, [30] * 4, None, lambda w: [round(x) for x in w], cfg, 1, evaluate_many=evaluate_many)
    assert many.run([2, 2, 2, 2]) == one.run([2, 2, 2, 2])
    assert many.state.history == one.state.history and batches == [6] * 6


def test_acp_measures_training_images_through_the_validation_transform() -> None:
    """Held-out fitness and channel responses read un-augmented images: the same whatever the random state."""
    cfg = config_from_dict(tiny_run(mode="acp", acp={"holdout_size": 64}))
    assert cfg.data.augment
    data = split_search_data(build_data(cfg.data), 64, seed=0)
    model = create_model("cifar_resnet8", 4)
    roots = ChannelPruner(model, torch.randn(1, 3, 16, 16), [classifier_of(model)]).root_modules()
    seen = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        images = torch.stack([data.holdout[i][0] for i in range(32)] + [data.train[i][0] for i in range(32)])
        seen.append((images, channel_responses(model, roots, data.calibration, 64, 32, torch.device("cpu"))))
    (first, r1), (second, r2) = seen
    assert torch.equal(first[:32], second[:32]) and not torch.equal(first[32:], second[32:])  # training: flipped
    assert r1.keys() == r2.keys() and all(torch.equal(r1[k], r2[k]) for k in r1)
    subset = build_data(config_from_dict(tiny_run(**{"data.train_subset": 64})).data)
    assert [subset.train_eval[i][1] for i in range(64)] == [subset.train[i][1] for i in range(64)]


def test_feature_similarity_cuts_to_widths_keeping_one_of_each_duplicate_group() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    example = torch.randn(1, 3, 6, 6)
    model(example)
    with torch.no_grad():  # filters 0-3 identical, 4-6 scaled copies (same feature maps up to scale), 7 alone
        model[0].weight[1:4] = model[0].weight[0]
        model[0].bias[1:4] = model[0].bias[0]
        model[0].weight[4:7] = model[0].weight[4] * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
        model[0].bias[4:7] = model[0].bias[4] * torch.tensor([1.0, 2.0, 3.0])
    original = model[0].weight.detach().clone()
    pruner = ChannelPruner(model, example, [model[3]], max_layer_ratio=0.9)
    images = torch.utils.data.TensorDataset(torch.randn(64, 3, 6, 6), torch.zeros(64, dtype=torch.long))
    features = PruneConfig(similarity=SimilarityConfig(source="features"), calibration_batches=2)
    cut_to_widths(pruner, {"0": 3}, features, images, 16, torch.device("cpu"), criterion="similarity")
    kept = model[0].weight.detach()
    assert kept.shape[0] == 3
    for rows in ([0, 1, 2, 3], [4, 5, 6], [7]):
        assert sum(any(torch.equal(k, original[r]) for r in rows) for k in kept) == 1


def test_acp_mode_with_feature_similarity(tmp_path: Path) -> None:
    overrides = {
        "mode": "acp",
        "train.teacher_epochs": 1,
        "prune.similarity": {"source": "features"},
        "prune.finetune_epochs": 0,
        "acp": {"holdout_size": 64, "recovery_steps": 2, "calibration_images": 64, "swarm": {"particles": 2}},
        "acp.swarm.iterations": 1,
    }
    run_dir = tmp_path / "acp"
    assert main(["--config", str(_config(tmp_path, **overrides)), "--out", str(run_dir)]) == 0
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert log[-1]["ratio_after"] <= 0.6 and log[0]["evaluations_per_process"] == [4]
    assert log[0]["round_to"] == 1  # kept in the log, as mode aip's entries keep it


def _grouped_search(tmp_path: Path) -> tuple[SimpleNamespace, nn.Module, ChannelPruner, SearchData, float]:
    """A session stand-in (one process, CPU) for an ACP search on toy_grouped: the session, teacher, the student's
    pruner, the data and a budget of half the FLOPs."""
    overrides = {
        "acp": {"holdout_size": 16, "recovery_steps": 1, "calibration_images": 16},
        "acp.swarm": {"particles": 4, "iterations": 2, "init_spread": 0.5},
        "data.batch_size": 16,
    }
    cfg = config_from_dict(tiny_run(mode="acp", **overrides))
    torch.manual_seed(0)
    teacher = create_model("toy_grouped", 4).eval()
    example = torch.randn(1, 3, 16, 16)
    student = copy.deepcopy(teacher)
    pruner = ChannelPruner(student, example, [student.fc], max_layer_ratio=0.9)
    images = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,)))
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    session = SimpleNamespace(
        accelerator=acc,
        cfg=cfg,
        task=ClassificationTask(),
        example=example,
        print=lambda *_: None,
        log=lambda *_: None,
        run_dir=tmp_path,
        main=True,
    )
    budget = 0.5 * model_cost(student, example).flops
    return session, teacher, pruner, SearchData(images, images, images), budget


def test_acp_on_grouped_convolutions_keeps_every_candidate_and_the_cut_within_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session, teacher, pruner, data, budget = _grouped_search(tmp_path)
    cuts = []
    real_cut = fitness.cut_to_widths

    def cut(candidate: ChannelPruner, widths: dict[str, int], *args: object, **kwargs: object) -> dict[str, int]:
        reached = real_cut(candidate, widths, *args, **kwargs)
        cuts.append((dict(widths), candidate.widths(), model_cost(candidate.model, session.example).flops / budget))
        return reached

    monkeypatch.setattr(fitness, "cut_to_widths", cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best, evaluations = search_widths(session, teacher, pruner, budget, "flops", data)
    assert evaluations == len(cuts) == 4 * 3
    assert all(ratio <= 1 + 1e-9 for *_, ratio in cuts), max(ratio for *_, ratio in cuts)
    assert all(asked == got for asked, got, _ in cuts)  # the widths priced are the widths cut
    assert all(w % pruner.units[n] == 0 for n, w in best.items()) and max(pruner.units.values()) == 8
    images, batch = data.calibration, session.cfg.data.batch_size
    monkeypatch.undo()
    reached = cut_to_widths(pruner, best, session.cfg.prune, images, batch, torch.device("cpu"), budget=budget)
    assert reached == best == pruner.widths()
    assert model_cost(pruner.model, session.example).flops <= budget


def test_a_cut_to_widths_off_the_unit_grid_rounds_down_and_an_overshoot_is_an_error() -> None:
    model = create_model("toy_grouped", 10).eval()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    assert pruner.units["features.1.0"] == 4
    reached = pruner.prune_to_widths({"features.1.0": 23}, create_importance("l1"))
    assert model.features[2][0].in_channels == 20  # never wider than asked: 23 channels in units of 4 keep 20
    assert reached == {"features.1.0": 20}
    budget = 0.5 * pruner.cost("flops")
    with pytest.raises(PruningError, match="of the budget"):
        cut_to_widths(pruner, {"features.1.0": 16}, PruneConfig(), [], 16, torch.device("cpu"), budget=budget)


def test_a_task_without_a_width_search_refuses_mode_acp_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Task.search` None: the config check (before any work) and the search itself stop with one line."""

    class NoSearch(ClassificationTask):
        name = "nosearch"
        search = None

    message = "mode acp: task nosearch has no width search; use mode aip"
    monkeypatch.setattr(checks, "task_for", lambda cfg: NoSearch())
    with pytest.raises(ConfigError, match=message):
        checks.check_names(config_from_dict({"mode": "acp"}), dataset=False)
    checks.check_names(config_from_dict({"mode": "aip"}), dataset=False)
    with pytest.raises(ConfigError, match=message):
        split_search_data(SimpleNamespace(train=[], train_eval=None), 4, 0, NoSearch())


def test_scale_to_budget_grows_widths_under_the_budget_until_no_group_s_next_width_fits() -> None:
    cost = lambda w: float(sum(w))  # noqa: E731
    assert scale_to_budget([2.0, 4.0], [1, 1], cost, 12.0) == [2, 4]  # without `upper`, under budget is kept
    grown = scale_to_budget([2.0, 4.0], [1, 1], cost, 14.0, upper=[10, 12])
    assert grown == [6, 8]  # half of each group's room: the budget exactly, by the common factor alone
    # the common factor stops at [5, 7] (the next floors give [6, 8], over 13); the top-up steps the group grown
    # least: group 0 has 3/8 of its room, group 1 3/8 too, so the lower index
    assert scale_to_budget([2.0, 4.0], [1, 1], cost, 13.0, upper=[10, 12]) == [6, 7]
    pricey = lambda w: 5.0 * w[0] + w[1]  # noqa: E731
    assert scale_to_budget([2.0, 2.0], [1, 1], pricey, 20.0, upper=[4, 20]) == [2, 10]  # common factor alone
    assert scale_to_budget([2.0, 4.0], [1, 1], cost, 100.0, upper=[10, 10]) == [10, 10]  # never over `upper`
    assert scale_to_budget([20.0, 20.0], [1, 1], cost, 12.0, upper=[20, 20]) == [6, 6]  # over budget: shrinks
    # shrunk by a common factor to [6, 6] (11 of 13 with the floors: [6.5, 6.5] is not a width), then topped up
    assert scale_to_budget([20.0, 20.0], [1, 1], cost, 13.0, upper=[20, 20]) == [7, 6]
    assert scale_to_budget([20.0, 20.0], [1, 1], cost, 13.0) == [6, 6]  # without `upper`: the shrink alone


def test_an_acp_cut_keeps_the_channels_its_criterion_ranks_highest() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    example = torch.randn(1, 3, 6, 6)
    model(example)
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(1.0, 9.0).view(8, 1, 1, 1))  # filter i's norm grows with i
    original = model[0].weight.detach().clone()
    pruner = ChannelPruner(model, example, [model[3]], max_layer_ratio=0.9)
    cut_to_widths(pruner, {"0": 3}, PruneConfig(), [], 16, torch.device("cpu"))  # acp.criterion's default: l1
    assert torch.equal(model[0].weight.detach(), original[5:])


def test_acp_criterion_refuses_one_that_needs_gradients_or_a_schedule_in_one_line() -> None:
    for name in ("taylor", "hybrid"):
        with pytest.raises(ConfigError, match=f"acp.criterion: '{name}' is not allowed"):
            checks.check_names(config_from_dict({"mode": "acp", "acp": {"criterion": name}}), dataset=False)
    checks.check_names(config_from_dict({"mode": "acp", "acp": {"criterion": "similarity"}}), dataset=False)
