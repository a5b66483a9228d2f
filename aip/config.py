"""Run configuration: dataclasses, YAML loading, dotted overrides and validation with one-line errors.

Every key a YAML file or `--set key=value` may name is a field below; anything else is refused before any work
starts, with the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key and what is allowed."""


@dataclass
class ModelConfig:
    # A registered name, `torchvision:<name>`, `timm:<name>`, or `package.module:callable` (your own class).
    name: str = "cifar_resnet20"
    # Keyword arguments of `package.module:callable`; num_classes (and in_channels) are added when it takes them.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Local checkpoint of a trained teacher (a state dict, or a run's teacher.pt); none: `mode: aip` trains one.
    teacher_checkpoint: str | None = None
    # Unpickle a teacher checkpoint that holds Python objects besides tensors (only for a file you trust).
    trust_checkpoint: bool = False
    # Substring renames of the teacher checkpoint's keys, applied in order, e.g. {".downsample.": ".shortcut."}.
    checkpoint_rename: dict[str, str] = field(default_factory=dict)
    # Module names whose outputs feed attention transfer; none: the family's stage ends, found automatically.
    taps: list[str] | None = None


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True
    # Use only a fixed random choice of N training samples (the same every run, for quick runs); none: all of them.
    train_subset: int | None = None
    # Per-channel normalisation; none: the data set's own (the synthetic set has none: mean 0, std 1).
    mean: list[float] | None = None
    std: list[float] | None = None
    # Synthetic data set only.
    num_classes: int = 10
    image_size: int = 32
    train_size: int = 2048
    val_size: int = 512


@dataclass
class TrainConfig:
    epochs: int = 10
    teacher_epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    grad_accum_steps: int = 1
    # Evaluate every N epochs of plain training (the last epoch always); on a CPU a full test set can cost as much
    # as a training epoch.
    eval_every: int = 1
    # `no`, `fp16` or `bf16`; null: whatever the launcher says (`accelerate launch --mixed_precision`), else `no`.
    mixed_precision: str | None = None
    log_every: int = 20


@dataclass
class HybridConfig:
    """`prune.criterion: hybrid`: a saliency criterion first, a similarity criterion once the switch is reached."""

    saliency: str = "l1"
    similarity: str = "similarity"
    # Switch at this interval (1-based), or once this fraction of the total reduction is reached; set one of them.
    switch_interval: int | None = None
    switch_fraction: float | None = 0.5


@dataclass
class SimilarityConfig:
    # What `similarity` compares: the channels' filters, or their feature maps on calibration batches.
    source: str = "weights"


@dataclass
class ActivationConfig:
    """`prune.criterion: activation`: how much each interval removes."""

    # `fraction`: the schedule's share of the target, lowest relative activation first, like any criterion;
    # `threshold`: every channel under `threshold` of its layer's 0.9-quantile (the authors' rule), never past the target.
    mode: str = "fraction"
    threshold: float = 0.1


@dataclass
class CapacityConfig:
    """Effective filter analysis: per-layer caps from the effective rank of the layer's output-gradient matrix."""

    enabled: bool = False
    # Effective rank: the fewest singular values holding this fraction of the energy sum(s^2).
    tau: float = 0.99
    # Max prunable ratio = (1 - effective_rank / width) * safety.
    safety: float = 0.9
    batches: int = 8
    # `cap`: limits only; `hierarchical`: also prune the most redundant layer groups first, group by group.
    mode: str = "cap"


@dataclass
class PruneConfig:
    criterion: str = "l1"
    target_flops_ratio: float | None = 0.5
    target_params_ratio: float | None = None
    intervals: int = 3
    epochs_between: int = 1
    finetune_epochs: int = 1
    schedule: str = "geometric"
    # No layer group may lose more than this fraction of its original channels.
    max_layer_ratio: float = 0.8
    # Batches of training data used by data-dependent criteria (taylor, activation, similarity on features).
    calibration_batches: int = 4
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)


@dataclass
class SwarmConfig:
    """Particle swarm over width vectors (ACP); defaults from the authors' code as read in METHOD.md."""

    particles: int = 10
    iterations: int = 8
    # Our choice: Clerc's constriction form (inertia 1 inside it). METHOD.md's inertia falling from 0.6 inside the
    # constriction collapses the swarm early: a 4-d integer quadratic (10 particles, 30 iterations, init_spread 1)
    # was solved exactly in 6 of 20 seeds with 0.6 -> 0.2, 10 of 20 with 0.6, 20 of 20 with 1.0.
    inertia_start: float = 1.0
    inertia_end: float = 1.0
    c1: float = 2.0
    c2: float = 2.0
    constriction: float = 0.729
    velocity_clip: float = 2.0  # channels per step
    init_spread: float = 0.2  # offsets of particles 1.. as a fraction of each group's range
    penalty: float = 10.0  # fitness lost per unit of relative excess over the budget


@dataclass
class AcpConfig:
    """`mode: acp`: cluster channels, search per-group widths with a particle swarm, then recover."""

    # DBSCAN on correlation distance of channel responses; a larger eps merges more channels (stronger start).
    eps: float = 0.1
    min_samples: int = 5
    calibration_images: int = 200
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    # Fitness: top-1 on a held-out part of the training set after this many training steps of the candidate.
    recovery_steps: int = 200
    holdout_size: int = 1000
    distill: bool = True
    # The final recovery of the best structure: the AIP losses, or plain cross-entropy fine-tuning.
    final: str = "aip"
    # Process-group timeout of an ACP run: every process waits at each swarm iteration for the slowest one's share.
    timeout_minutes: float = 120.0


@dataclass
class WeightedLoss:
    weight: float = 1.0


@dataclass
class KDLoss:
    weight: float = 0.3
    temperature: float = 4.0
    kind: str = "kl"


@dataclass
class LossConfig:
    ce: WeightedLoss = field(default_factory=lambda: WeightedLoss(0.7))
    kd: KDLoss = field(default_factory=KDLoss)
    # Attention transfer as in Zagoruyko & Komodakis, whose beta of 1000 fits this loss's per-position mean: with
    # weight 1 the term measured ~7e-4 on the debug run against ~0.1 for CE, i.e. it did nothing.
    at: WeightedLoss = field(default_factory=lambda: WeightedLoss(1000.0))
    adv: WeightedLoss = field(default_factory=lambda: WeightedLoss(1.0))


@dataclass
class DiscriminatorConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 256, 128])
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # What D sees of the network output: raw logits or their softmax.
    input: str = "logits"


@dataclass
class CheckpointConfig:
    keep: int = 0  # end-of-stage checkpoints to keep (0: all)
    # Also checkpoint every N optimizer steps inside a stage (only the newest such one is kept); none: stage ends only.
    every_n_steps: int | None = None


@dataclass
class Config:
    mode: str = "aip"
    seed: int = 0
    name: str = "run"
    out: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    acp: AcpConfig = field(default_factory=AcpConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SEED_MAX = 2**32 - 1
MODES = ("aip", "train", "acp", "eval")
ACP_FINAL = ("aip", "finetune")
SCHEDULERS = ("cosine", "step", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
PRUNE_SCHEDULES = ("geometric", "linear")
KD_KINDS = ("kl", "mse")
DISC_INPUTS = ("logits", "softmax")
SIMILARITY_SOURCES = ("weights", "features")
CAPACITY_MODES = ("cap", "hierarchical")
ACTIVATION_MODES = ("fraction", "threshold")


def _describe(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_describe(key)} to {_describe(value)}"
    if tp is Any:
        return "any value"
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints pass as floats. Raises ConfigError naming `key`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp)
            return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    elif typing.get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads a number without a dot, such as 1e-2, as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; allowed here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=0.05", "prune.intervals=4"]` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, for example train.lr=0.05")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply dotted overrides, then validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file; the recipes are in configs/")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--config {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML ({' '.join(str(exc).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: the top level must be a mapping of sections")
        data = loaded or {}
        data.setdefault("name", path.stem)
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (possibly partial) nested dict."""
    cfg = _build(Config, data)
    for section, key in (("data", "root"), ("model", "teacher_checkpoint")):
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            setattr(getattr(cfg, section), key, str(Path(value).expanduser()))
    validate(cfg)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number of the config (in lists too) must be finite: `.nan` or `.inf` would pass each range check."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, float) and not math.isfinite(item):
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise ConfigError(f"{where}: must be a finite number, got {item}")


def validate(cfg: Config) -> None:
    """Refuse impossible values and unknown registry names before any work is done."""
    from aip.data import DATASETS
    from aip.models import check_model_name
    from aip.prune.importance import IMPORTANCES
    from aip.registry import UnknownNameError

    _check_finite(cfg)
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed: must lie in 0..{SEED_MAX} (what NumPy's seeding takes), got {cfg.seed}")
    _choice("mode", cfg.mode, MODES)
    _choice("train.scheduler", cfg.train.scheduler, SCHEDULERS)
    if cfg.train.mixed_precision is not None:
        _choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    _choice("prune.schedule", cfg.prune.schedule, PRUNE_SCHEDULES)
    _choice("loss.kd.kind", cfg.loss.kd.kind, KD_KINDS)
    _choice("disc.input", cfg.disc.input, DISC_INPUTS)
    try:
        check_model_name(cfg.model.name)
    except UnknownNameError as exc:
        raise ConfigError(f"model.name: {exc}") from None
    _choice("data.name", cfg.data.name, DATASETS.names())
    _choice("prune.criterion", cfg.prune.criterion, IMPORTANCES.names())

    for key, ratio in (
        ("prune.target_flops_ratio", cfg.prune.target_flops_ratio),
        ("prune.target_params_ratio", cfg.prune.target_params_ratio),
    ):
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ConfigError(f"{key}: must lie in (0, 1), the fraction of the teacher to keep; got {ratio}")
    if cfg.mode in ("aip", "acp"):
        if (cfg.prune.target_flops_ratio is None) == (cfg.prune.target_params_ratio is None):
            raise ConfigError(
                "prune: set exactly one of target_flops_ratio and target_params_ratio (the other to null)"
            )
    if not 0.0 < cfg.prune.max_layer_ratio < 1.0:
        raise ConfigError(f"prune.max_layer_ratio: must lie in (0, 1); got {cfg.prune.max_layer_ratio}")
    _positive("prune.intervals", cfg.prune.intervals)
    _positive("prune.epochs_between", cfg.prune.epochs_between, zero_ok=True)
    _positive("prune.finetune_epochs", cfg.prune.finetune_epochs, zero_ok=True)
    _positive("prune.calibration_batches", cfg.prune.calibration_batches)
    saliency = [n for n in IMPORTANCES.names() if n not in ("hybrid", "similarity", "fpgm")]
    _choice("prune.hybrid.saliency", cfg.prune.hybrid.saliency, saliency)
    _choice("prune.hybrid.similarity", cfg.prune.hybrid.similarity, ("similarity", "fpgm"))
    hybrid = cfg.prune.hybrid
    if (hybrid.switch_interval is None) == (hybrid.switch_fraction is None):
        raise ConfigError("prune.hybrid: set exactly one of switch_interval and switch_fraction (the other to null)")
    if hybrid.switch_interval is not None:
        _positive("prune.hybrid.switch_interval", hybrid.switch_interval)
    if hybrid.switch_fraction is not None and not 0.0 <= hybrid.switch_fraction <= 1.0:
        raise ConfigError(f"prune.hybrid.switch_fraction: must lie in [0, 1]; got {hybrid.switch_fraction}")
    _choice("prune.similarity.source", cfg.prune.similarity.source, SIMILARITY_SOURCES)
    _choice("prune.activation.mode", cfg.prune.activation.mode, ACTIVATION_MODES)
    if not 0.0 < cfg.prune.activation.threshold < 1.0:
        raise ConfigError(
            f"prune.activation.threshold: must lie in (0, 1), a fraction of the layer's 0.9-quantile channel; "
            f"got {cfg.prune.activation.threshold}"
        )
    cap = cfg.prune.capacity
    _choice("prune.capacity.mode", cap.mode, CAPACITY_MODES)
    if not 0.0 < cap.tau <= 1.0:
        raise ConfigError(f"prune.capacity.tau: must lie in (0, 1]; got {cap.tau}")
    if not 0.0 < cap.safety <= 1.0:
        raise ConfigError(f"prune.capacity.safety: must lie in (0, 1]; got {cap.safety}")
    _positive("prune.capacity.batches", cap.batches)
    _positive("train.lr", cfg.train.lr)
    _positive("train.epochs", cfg.train.epochs, zero_ok=True)
    _positive("train.teacher_epochs", cfg.train.teacher_epochs, zero_ok=True)
    _positive("train.weight_decay", cfg.train.weight_decay, zero_ok=True)
    _positive("train.grad_accum_steps", cfg.train.grad_accum_steps)
    _positive("train.log_every", cfg.train.log_every)
    _positive("train.eval_every", cfg.train.eval_every)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("data.eval_batch_size", cfg.data.eval_batch_size)
    _positive("data.num_workers", cfg.data.num_workers, zero_ok=True)
    if cfg.data.train_subset is not None:
        _positive("data.train_subset", cfg.data.train_subset)
    _positive("data.num_classes", cfg.data.num_classes)
    _positive("loss.kd.temperature", cfg.loss.kd.temperature)
    for term in ("ce", "kd", "at", "adv"):
        _positive(f"loss.{term}.weight", getattr(cfg.loss, term).weight, zero_ok=True)
    _positive("disc.lr", cfg.disc.lr)
    if not cfg.disc.hidden or any(h <= 0 for h in cfg.disc.hidden):
        raise ConfigError(f"disc.hidden: a non-empty list of positive widths, got {cfg.disc.hidden}")
    acp = cfg.acp
    _choice("acp.final", acp.final, ACP_FINAL)
    _positive("acp.eps", acp.eps)
    for key in ("min_samples", "calibration_images", "recovery_steps", "holdout_size", "timeout_minutes"):
        _positive(f"acp.{key}", getattr(acp, key))
    for key in ("particles", "iterations", "velocity_clip", "constriction"):
        _positive(f"acp.swarm.{key}", getattr(acp.swarm, key))
    if not 0.0 <= acp.swarm.init_spread <= 1.0:
        raise ConfigError(f"acp.swarm.init_spread: must lie in [0, 1]; got {acp.swarm.init_spread}")
    if cfg.mode == "acp" and cfg.data.name == "synthetic" and acp.holdout_size >= cfg.data.train_size:
        raise ConfigError(
            f"acp.holdout_size: {acp.holdout_size} leaves no training data of data.train_size={cfg.data.train_size}"
        )
    _positive("checkpoint.keep", cfg.checkpoint.keep, zero_ok=True)
    if cfg.checkpoint.every_n_steps is not None:
        _positive("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)
    if cfg.model.teacher_checkpoint is not None and not Path(cfg.model.teacher_checkpoint).is_file():
        raise ConfigError(
            f"model.teacher_checkpoint: no file at {cfg.model.teacher_checkpoint!r}; give a local path, "
            "or null to train a teacher first"
        )
    _validate_user_model(cfg)
    DATASETS.get(cfg.data.name).validate(cfg.data)


def _validate_user_model(cfg: Config) -> None:
    """The keys of your own model, checkpoint and normalisation that need no data to check."""
    from aip.models.user import is_import_path

    if cfg.model.kwargs and not is_import_path(cfg.model.name):
        raise ConfigError(
            f"model.kwargs: only used with model.name: package.module:callable, not {cfg.model.name!r}; set it to {{}}"
        )
    if any(old == "" for old in cfg.model.checkpoint_rename):
        raise ConfigError("model.checkpoint_rename: an empty key renames nothing; give the substring to replace")
    if cfg.mode == "eval" and cfg.model.teacher_checkpoint is None:
        raise ConfigError("model.teacher_checkpoint: required in mode eval (the weights to evaluate)")
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if values is not None and not values:
            raise ConfigError(f"data.{key}: one number per image channel, or null for the data set's own; got []")
    if cfg.data.std is not None and any(v <= 0 for v in cfg.data.std):
        raise ConfigError(f"data.std: every value must be > 0, got {cfg.data.std}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
