"""Run configuration: dataclasses, YAML loading, dotted overrides and validation with one-line errors.

Every key a YAML file or `--set key=value` may name is a field below, with its one-line meaning (`option`); anything
else is refused before any work starts, with the key and what is allowed. This module imports no registry: the
names they hold are checked by `aip.checks`, which sits above both.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aip.errors import ConfigError as ConfigError  # re-exported: it lived here before aip/errors.py


def option(default: Any, help: str) -> Any:
    """A config field with its one-line meaning in `metadata["help"]` (what `--print-config` prints beside it).

    A section class becomes its default factory; a list, dict or section instance is copied for every instance.
    """
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help})
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The network: teacher and student are the same architecture."""

    name: str = option(
        "cifar_resnet20",
        "a registered name (cifar_resnet8/20/32/56/110, vgg16_bn), torchvision:<name>, timm:<name>, or your own "
        "package.module:callable",
    )
    kwargs: dict[str, Any] = option(
        {}, "keyword arguments of package.module:callable; num_classes (and in_channels) are added when it takes them"
    )
    teacher_checkpoint: str | None = option(
        None, "local file of a trained teacher (a state dict, .safetensors, or a run's teacher.pt); null: train one"
    )
    trust_checkpoint: bool = option(
        False, "unpickle a teacher checkpoint that holds Python objects besides tensors (only a file you trust)"
    )
    checkpoint_rename: dict[str, str] = option(
        {}, "substring renames of the teacher checkpoint's keys, in order, e.g. {'.downsample.': '.shortcut.'}"
    )
    taps: list[str] | None = option(
        None, "module names whose outputs feed attention transfer; null: the ends of the network's stages, found"
    )


@dataclass
class DataConfig:
    """The data set, its loading and its normalisation."""

    name: str = option("synthetic", "data set: synthetic, cifar10, cifar100, fashion_mnist or imagefolder")
    root: str | None = option(None, "local directory that holds the data set's files (synthetic: unused)")
    download: bool = option(False, "fetch a torchvision data set into data.root when it is missing")
    batch_size: int = option(64, "training batch size of each process")
    eval_batch_size: int = option(256, "evaluation batch size of each process (does not change any result)")
    num_workers: int = option(0, "DataLoader worker processes (0: load in the main process)")
    augment: bool = option(True, "augment training images (pad-crop and flip; imagefolder: random resized crop)")
    train_subset: int | None = option(
        None, "train on a fixed random choice of N samples (the same in every run); null: all of them"
    )
    mean: list[float] | None = option(
        None, "per-channel normalisation mean replacing the data set's own; null: its own (synthetic: none)"
    )
    std: list[float] | None = option(
        None, "per-channel normalisation std replacing the data set's own; null: its own (synthetic: none)"
    )
    num_classes: int = option(10, "synthetic only: number of classes")
    image_size: int = option(32, "synthetic only: image height and width in pixels")
    train_size: int = option(2048, "synthetic only: training images")
    val_size: int = option(512, "synthetic only: validation images")


@dataclass
class TrainConfig:
    """Optimisation shared by every training phase (SGD with momentum, one schedule per stage)."""

    epochs: int = option(10, "epochs of mode train")
    teacher_epochs: int = option(10, "epochs of training a teacher when model.teacher_checkpoint is null")
    lr: float = option(0.05, "SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    scheduler: str = option(
        "cosine", "learning-rate schedule over each training phase: cosine, step (x0.1 at 1/2 and 3/4) or constant"
    )
    grad_accum_steps: int = option(1, "batches whose gradients are accumulated into one optimizer step")
    eval_every: int = option(
        1, "evaluate every N epochs of plain training (the last epoch always); a full test set can cost an epoch"
    )
    mixed_precision: str | None = option(
        None, "no, fp16 or bf16; null: what the launcher says (accelerate launch --mixed_precision), else no"
    )
    log_every: int = option(20, "write the loss terms to TensorBoard every N steps")


@dataclass
class HybridConfig:
    """`prune.criterion: hybrid`: a saliency criterion first, a similarity criterion once the switch is reached."""

    saliency: str = option("l1", "criterion of the early intervals (not hybrid, similarity or fpgm)")
    similarity: str = option("similarity", "criterion from the switch on: similarity or fpgm")
    switch_interval: int | None = option(
        None, "switch at this interval (1-based); set this or switch_fraction, the other to null"
    )
    switch_fraction: float | None = option(
        0.5, "switch once this fraction of the total reduction is reached; set this or switch_interval"
    )


@dataclass
class SimilarityConfig:
    """`prune.criterion: similarity`: what near-identical channels are found by."""

    source: str = option(
        "weights", "what similarity compares: the channels' filters (weights) or their feature maps (features)"
    )


@dataclass
class ActivationConfig:
    """`prune.criterion: activation`: how much each interval removes."""

    mode: str = option(
        "fraction",
        "fraction: the schedule's share of the target, lowest relative activation first; threshold: every channel "
        "under activation.threshold, never past the target",
    )
    threshold: float = option(0.1, "mode threshold: remove channels under this fraction of the layer's 0.9-quantile")


@dataclass
class CapacityConfig:
    """Effective filter analysis: per-layer caps from the effective rank of the layer's output-gradient matrix."""

    enabled: bool = option(False, "cap each layer group's pruning by its effective rank, found before the first prune")
    tau: float = option(0.99, "effective rank: the fewest singular values holding this fraction of sum(s^2)")
    safety: float = option(0.9, "max prunable ratio = (1 - effective_rank / width) * safety")
    batches: int = option(8, "calibration batches whose per-sample gradients form the matrix")
    mode: str = option("cap", "cap: limits only; hierarchical: also prune the most redundant groups first, in turn")


@dataclass
class PruneConfig:
    """Channel pruning: criterion, target, schedule and limits."""

    criterion: str = option("l1", "channel ranking: l1, l2, bn_scale, taylor, activation, fpgm, similarity or hybrid")
    target_flops_ratio: float | None = option(
        0.5, "fraction of the teacher's FLOPs to keep; set this or target_params_ratio, the other to null"
    )
    target_params_ratio: float | None = option(
        None, "fraction of the teacher's parameters to keep; set this or target_flops_ratio"
    )
    intervals: int = option(3, "pruning intervals (stages) to reach the target in")
    epochs_between: int = option(1, "recovery epochs after each pruning interval")
    finetune_epochs: int = option(1, "fine-tuning epochs after the last interval (mode acp: the recovery)")
    schedule: str = option(
        "geometric", "steps towards the target: geometric (same fraction of what is left) or linear (same share)"
    )
    max_layer_ratio: float = option(0.8, "no layer group may lose more than this fraction of its original channels")
    calibration_batches: int = option(
        4, "training batches used by data-dependent criteria (taylor, activation, similarity on features)"
    )
    hybrid: HybridConfig = option(HybridConfig, "criterion hybrid")
    similarity: SimilarityConfig = option(SimilarityConfig, "criterion similarity")
    activation: ActivationConfig = option(ActivationConfig, "criterion activation")
    capacity: CapacityConfig = option(CapacityConfig, "effective filter analysis: per-layer pruning limits")


@dataclass
class SwarmConfig:
    """Particle swarm over width vectors (ACP); defaults from the authors' code as read in METHOD.md."""

    particles: int = option(10, "particles (candidate width vectors) of the swarm")
    iterations: int = option(8, "swarm iterations")
    # Our choice: Clerc's constriction form (inertia 1 inside it). METHOD.md's inertia falling from 0.6 inside the
    # constriction collapses the swarm early: a 4-d integer quadratic (10 particles, 30 iterations, init_spread 1)
    # was solved exactly in 6 of 20 seeds with 0.6 -> 0.2, 10 of 20 with 0.6, 20 of 20 with 1.0.
    inertia_start: float = option(1.0, "inertia inside the constriction at the first iteration")
    inertia_end: float = option(1.0, "inertia at the last iteration (linear in between)")
    c1: float = option(2.0, "pull towards each particle's own best")
    c2: float = option(2.0, "pull towards the swarm's best")
    constriction: float = option(0.729, "Clerc's constriction factor chi")
    velocity_clip: float = option(2.0, "largest velocity component, in channels per step")
    init_spread: float = option(0.2, "offsets of particles 1.. from the clustering start, a fraction of each range")
    penalty: float = option(10.0, "fitness lost per unit of relative excess over the budget")


@dataclass
class AcpConfig:
    """`mode: acp`: cluster channels, search per-group widths with a particle swarm, then recover."""

    eps: float = option(0.1, "DBSCAN eps on correlation distance of channel responses; larger merges more channels")
    min_samples: int = option(5, "DBSCAN min_samples: channels that make a cluster")
    calibration_images: int = option(200, "images whose channel responses are clustered")
    swarm: SwarmConfig = option(SwarmConfig, "the particle swarm over per-group widths")
    recovery_steps: int = option(200, "training steps of each candidate before its fitness is measured")
    holdout_size: int = option(1000, "training images held out to measure fitness (top-1) on")
    distill: bool = option(True, "distil the candidates' recovery steps from the teacher")
    final: str = option("aip", "recovery of the best structure: aip (the AIP losses) or finetune (cross-entropy)")
    timeout_minutes: float = option(
        120.0, "process-group timeout: each process waits at every swarm iteration for the slowest one's share"
    )


@dataclass
class WeightedLoss:
    """One loss term and its weight in the student's loss."""

    weight: float = option(1.0, "weight of this term in the student's loss (0: off)")


@dataclass
class KDLoss:
    """Distillation on the teacher's outputs."""

    weight: float = option(0.3, "weight a of T^2 * KL(teacher || student) in the student's loss (0: off)")
    temperature: float = option(4.0, "softmax temperature T of the distillation")
    kind: str = option("kl", "kl (on softened outputs) or mse (on logits)")


@dataclass
class LossConfig:
    """The student's loss: weighted sum of cross-entropy, distillation, attention transfer and adversarial terms."""

    ce: WeightedLoss = option(WeightedLoss(0.7), "cross-entropy on the labels (1 - a with a = loss.kd.weight)")
    kd: KDLoss = option(KDLoss, "distillation on the teacher's outputs")
    # Attention transfer as in Zagoruyko & Komodakis, whose beta of 1000 fits this loss's per-position mean: with
    # weight 1 the term measured ~7e-4 on the debug run against ~0.1 for CE, i.e. it did nothing.
    at: WeightedLoss = option(WeightedLoss(1000.0), "attention transfer at the ends of the stages (the paper's beta)")
    adv: WeightedLoss = option(WeightedLoss(1.0), "adversarial term: the student learns to fool the discriminator")


@dataclass
class DiscriminatorConfig:
    """The fully-connected discriminator that tells teacher outputs from student outputs."""

    hidden: list[int] = option([128, 256, 128], "widths of its hidden layers")
    lr: float = option(1e-4, "Adam learning rate")
    beta1: float = option(0.5, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    input: str = option("logits", "what it sees of the network output: logits or softmax")


@dataclass
class CheckpointConfig:
    """Stage checkpoints: resume and --from-stage read them."""

    keep: int = option(0, "end-of-stage checkpoints to keep, newest first (0: all)")
    every_n_steps: int | None = option(
        None, "also checkpoint every N optimizer steps inside a stage (only the newest kept); null: stage ends only"
    )


@dataclass
class ExportConfig:
    """The files the final pruned model is written as, beside the report."""

    formats: list[str] = option(
        ["pt2", "onnx"], "pt2 (torch.export: model_pruned.pt2) and/or onnx (model_pruned.onnx); []: none"
    )


@dataclass
class LoggingConfig:
    """Where the scalars go (every loss term, lr, accuracy, params and FLOPs per stage), through Accelerate."""

    report_to: list[str] = option(
        ["tensorboard"],
        "Accelerate trackers: tensorboard (event files in <run>/tb/), wandb, mlflow, aim, comet_ml, clearml, "
        "dvclive, swanlab, trackio (each needs its package installed); []: none",
    )


@dataclass
class Config:
    """A run: what it does, with which model, data, losses and pruning."""

    mode: str = option(
        "aip", "aip (prune + distill), acp (width search, then recovery), train (supervised) or eval (measure)"
    )
    seed: int = option(0, "seeds everything; each stage and epoch re-seeds from it, which makes resume exact")
    name: str = option("run", "run name: runs/<name>-<time>; a --config file's stem unless set")
    out: str | None = option(None, "run directory; null: runs/<name>-<time> (the --out flag wins)")
    model: ModelConfig = option(ModelConfig, "the network")
    data: DataConfig = option(DataConfig, "the data set")
    train: TrainConfig = option(TrainConfig, "optimisation")
    prune: PruneConfig = option(PruneConfig, "channel pruning")
    loss: LossConfig = option(LossConfig, "the student's loss terms")
    disc: DiscriminatorConfig = option(DiscriminatorConfig, "the discriminator of the adversarial term")
    acp: AcpConfig = option(AcpConfig, "mode acp: the width search")
    checkpoint: CheckpointConfig = option(CheckpointConfig, "stage checkpoints")
    export: ExportConfig = option(ExportConfig, "the exported pruned model")
    logging: LoggingConfig = option(LoggingConfig, "experiment trackers")

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
EXPORT_FORMATS = ("pt2", "onnx")
# Accelerate's trackers (accelerate.utils.LoggerType less "all") and the pip package each needs.
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "aim": "aim",
    "comet_ml": "comet-ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


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
    """Read a YAML file (or start from defaults), apply dotted overrides, then validate the values.

    Registry names are not checked here: a caller that runs the config calls `aip.checks.check_names` too."""
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
    """Build and validate a Config from a plain (possibly partial) nested dict (registry names: `aip.checks`)."""
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
    """Refuse impossible values before any work is done.

    Names that registries hold (model, data set, criteria) and data-set specific keys are checked by
    `aip.checks.check_names`, above the registries: this module imports none of them, so they can import it.
    """
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
    for i, fmt in enumerate(cfg.export.formats):
        _choice(f"export.formats[{i}]", fmt, EXPORT_FORMATS)
    if len(set(cfg.export.formats)) < len(cfg.export.formats):
        raise ConfigError(f"export.formats: each format once, got {cfg.export.formats}")
    for i, tracker in enumerate(cfg.logging.report_to):
        _choice(f"logging.report_to[{i}]", tracker, tuple(TRACKERS))
    if len(set(cfg.logging.report_to)) < len(cfg.logging.report_to):
        raise ConfigError(f"logging.report_to: each tracker once, got {cfg.logging.report_to}")

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


def _validate_user_model(cfg: Config) -> None:
    """The keys of your own model, checkpoint and normalisation that need no data to check."""
    if any(old == "" for old in cfg.model.checkpoint_rename):
        raise ConfigError("model.checkpoint_rename: an empty key renames nothing; give the substring to replace")
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if values is not None and not values:
            raise ConfigError(f"data.{key}: one number per image channel, or null for the data set's own; got []")
    if cfg.data.std is not None and any(v <= 0 for v in cfg.data.std):
        raise ConfigError(f"data.std: every value must be > 0, got {cfg.data.std}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
