"""Config loading, overrides and the one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aip.checks import check_names
from aip.config import ConfigError, config_from_dict, load_config, parse_overrides, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_debug_config_loads_and_takes_overrides() -> None:
    cfg = load_config(CONFIGS / "debug.yaml", ["train.lr=0.01", "prune.target_flops_ratio=0.4", "prune.intervals=2"])
    assert cfg.name == "debug"
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.prune.target_flops_ratio == pytest.approx(0.4)
    assert cfg.prune.intervals == 2
    assert cfg.model.name == "cifar_resnet20"


def test_parse_overrides_nests_and_parses_yaml_scalars() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=null", "e=[1, 2]"]) == {
        "a": {"b": 1, "c": "x"},
        "d": None,
        "e": [1, 2],
    }


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "debug.yaml", ["loss.at.weight=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.lrr=0.1"], "unknown key 'train.lrr'"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["prune.intervals=2.5"], "prune.intervals: expected an integer"),
        (["prune.target_flops_ratio=1.5"], "prune.target_flops_ratio: must lie in (0, 1)"),
        (["prune.target_flops_ratio=0"], "prune.target_flops_ratio: must lie in (0, 1)"),
        (["model.name=resnet9000"], "model.name: unknown model 'resnet9000'"),
        (["prune.criterion=magic"], "prune.criterion: 'magic' is not allowed; choose one of: "),
        (["data.name=mnist2"], "data.name: 'mnist2' is not allowed"),
        (["data.name=cifar10", "data.root=/no/such/dir"], "data.root"),
        (["data.name=cifar10"], "data.root"),
        (["mode=distill"], "mode: 'distill' is not allowed; choose one of: "),
        (["train.lr=-1"], "train.lr: must be > 0"),
        (["train.eval_every=0"], "train.eval_every: must be > 0"),
        (["prune.hybrid.switch_interval=2"], "prune.hybrid: set exactly one of switch_interval and switch_fraction"),
        (["prune.capacity.tau=1.5"], "prune.capacity.tau: must lie in (0, 1]"),
        (["mode=acp", "acp.holdout_size=5000"], "acp.holdout_size: 5000 leaves no training data"),
        (["model.teacher_checkpoint=/no/such.pt"], "model.teacher_checkpoint: no file"),
        (["prune.target_params_ratio=0.5"], "set exactly one of target_flops_ratio, target_params_ratio and"),
        (["prune.target_latency_ratio=0.5"], "set exactly one of target_flops_ratio, target_params_ratio and"),
        (["prune.target_latency_ratio=1.5"], "prune.target_latency_ratio: must lie in (0, 1)"),
        (
            ["mode=acp", "prune.target_flops_ratio=null", "prune.target_latency_ratio=0.5"],
            "prune.target_latency_ratio: mode acp searches under a FLOPs or parameter budget",
        ),
        (["bogus"], "expected key=value"),
        (["prune.round_to=0"], "prune.round_to: must be > 0"),
        (["prune.round_to=fast"], "prune.round_to: a channel multiple > 0, auto or null, got 'fast'"),
        (["disc.steps=0"], "disc.steps: must be > 0"),
        (["disc.steps=2", "train.grad_accum_steps=2"], "disc.steps: more than one discriminator update per step"),
        (["disc.input=features"], "disc.input: 'features' is not allowed; choose one of: logits, softmax, attention"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_names(load_config(CONFIGS / "debug.yaml", overrides))  # as a run checks it: values, then names
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'optim'; allowed here: mode, seed"):
        config_from_dict({"optim": {"lr": 1}})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["seed=-1"], "seed: must lie in 0..4294967295"),
        (["seed=4294967296"], "seed: must lie in 0..4294967295"),
        (["train.lr=.nan"], "train.lr: must be a finite number, got nan"),
        (["train.momentum=.inf"], "train.momentum: must be a finite number, got inf"),
        (["prune.target_flops_ratio=.nan"], "prune.target_flops_ratio: must be a finite number"),
        (["loss.kd.weight=-.inf"], "loss.kd.weight: must be a finite number, got -inf"),
        (["train.lr=nan"], "train.lr: must be a finite number"),
    ],
)
def test_seed_range_and_non_finite_numbers_are_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "debug.yaml", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_largest_seed_is_accepted() -> None:
    assert load_config(CONFIGS / "debug.yaml", [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_numbers_yaml_reads_as_strings_are_accepted_for_float_keys(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-2\n  weight_decay: 5E-4\ndisc:\n  lr: '2e-4'\n")
    cfg = load_config(path, ["loss.kd.temperature=3e0"])
    assert cfg.train.lr == 0.01 and cfg.train.weight_decay == 0.0005 and cfg.disc.lr == 0.0002
    assert cfg.loss.kd.temperature == 3.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="prune.intervals: expected an integer, got '1e1'"):
        load_config(path, ["prune.intervals='1e1'"])


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not UTF-8 text" in str(info.value) and "latin1.yaml" in str(info.value)


@pytest.mark.parametrize("overrides", [[], ["train.lr=0.1"], ["train={lr: 0.1}"]])
def test_a_section_given_as_a_scalar_is_refused_with_or_without_set(tmp_path: Path, overrides: list[str]) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value) == "train: expected a mapping of keys, got 5"
    path.write_text("prune:\n  hybrid: fast\n")
    with pytest.raises(ConfigError, match="^prune.hybrid: expected a mapping of keys, got 'fast'$"):
        load_config(path, ["prune.hybrid.switch_fraction=0.4"])
    with pytest.raises(ConfigError, match="^train: expected a mapping of keys, got 5$"):
        load_config(None, ["train=5"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "duplicate key 'lr' at line 4 (first at line 2)"),
        ("train: {lr: 0.1}\nseed: 1\ntrain: {epochs: 2}\n", "duplicate key 'train' at line 3 (first at line 1)"),
        ("model:\n  checkpoint_rename: {a.: b., a.: c.}\n", "duplicate key 'a.' at line 2 (first at line 2)"),
    ],
    ids=["in-a-section", "a-section", "in-a-flow-mapping"],
)
def test_duplicate_keys_are_refused_naming_the_key_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"--config {str(path)!r}: {fragment}; give it once"
    with pytest.raises(ConfigError, match=r"^--set 'model.kwargs=\{a: 1, a: 2\}': duplicate key 'a' at line 1"):
        load_config(None, ["model.kwargs={a: 1, a: 2}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("train: &base {lr: 0.1, epochs: 3}\ndisc:\n  lr: 0.2\nloss:\n  kd: {weight: 0.5, temperature: 2}\n")
    assert load_config(path).train.lr == 0.1
    path.write_text("train: {<<: {lr: 0.1, epochs: 3}, lr: 0.2}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.2 and cfg.train.epochs == 3


def test_a_whole_mapping_set_replaces_it_and_dotted_keys_merge_into_it(tmp_path: Path) -> None:
    path = tmp_path / "det.yaml"
    path.write_text(
        "task: detection\ndata:\n  options: {val_size: 50, max_objects: 3}\n"
        "model:\n  checkpoint_rename: {.downsample.: .shortcut., bn: norm}\n  kwargs: {a: {b: 1, c: 2}}\n"
    )
    cfg = load_config(path, ["data.options={max_objects: 2}", "model.checkpoint_rename={}", "model.kwargs={a: {b: 5}}"])
    assert cfg.data.options == {"max_objects": 2}
    assert cfg.model.checkpoint_rename == {} and cfg.model.kwargs == {"a": {"b": 5}}
    dotted = ["data.options.max_objects=2", "model.checkpoint_rename.bn=batchnorm", "model.kwargs.a.b=5"]
    cfg = load_config(path, dotted)
    assert cfg.data.options == {"val_size": 50, "max_objects": 2}
    assert cfg.model.checkpoint_rename == {".downsample.": ".shortcut.", "bn": "batchnorm"}
    assert cfg.model.kwargs == {"a": {"b": 5, "c": 2}}
    cfg = load_config(path, ["model={kwargs: {d: 1}}", "train={lr: 0.01}"])  # a section merges, its mappings replace
    assert cfg.model.kwargs == {"d": 1} and cfg.model.checkpoint_rename == {".downsample.": ".shortcut.", "bn": "norm"}
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 10


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_round_trips_through_to_dict(recipe: Path) -> None:
    """What `aip.run` re-checks a Config object by: its dict gives the same Config back."""
    cfg = load_config(recipe)
    assert config_from_dict(cfg.to_dict()) == cfg
