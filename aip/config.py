"""Run configuration: loading (the YAML side: `aip.config_yaml`), coercion and validation with one-line errors.

The sections and keys, with each key's default and one-line meaning, are the dataclasses of `aip.schema` (re-exported
here); anything else is refused before any work starts, with the key and what is allowed. This module imports no
registry: the names they hold are checked by `aip.checks`, which sits above both.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from aip.config_yaml import merge, read_recipe
from aip.config_yaml import parse_overrides as parse_overrides  # re-exported: it lived here
from aip.errors import ConfigError as ConfigError  # re-exported: it lived here before aip/errors.py

# The sections and keys, re-exported: they lived here before aip/schema.py.
from aip.schema import AcpConfig as AcpConfig
from aip.schema import ActivationConfig as ActivationConfig
from aip.schema import ATLoss as ATLoss
from aip.schema import CapacityConfig as CapacityConfig
from aip.schema import CheckpointConfig as CheckpointConfig
from aip.schema import Config as Config
from aip.schema import DataConfig as DataConfig
from aip.schema import DiscriminatorConfig as DiscriminatorConfig
from aip.schema import ExportConfig as ExportConfig
from aip.schema import HybridConfig as HybridConfig
from aip.schema import KDLoss as KDLoss
from aip.schema import LoggingConfig as LoggingConfig
from aip.schema import LossConfig as LossConfig
from aip.schema import ModelConfig as ModelConfig
from aip.schema import PruneConfig as PruneConfig
from aip.schema import SimilarityConfig as SimilarityConfig
from aip.schema import SparsityConfig as SparsityConfig
from aip.schema import SwarmConfig as SwarmConfig
from aip.schema import TrainConfig as TrainConfig
from aip.schema import WeightedLoss as WeightedLoss
from aip.schema import option as option

SEED_MAX = 2**32 - 1
ACP_FINAL = ("aip", "finetune")
SCHEDULERS = ("cosine", "step", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
PRUNE_SCHEDULES = ("geometric", "linear")
KD_KINDS = ("kl", "mse")
DISC_INPUTS = ("logits", "softmax", "attention")
TEACHERS = ("original", "assistant")
AT_SCHEDULES = ("constant", "lr", "ramp", "warmup", "after_prune")
SIMILARITY_SOURCES = ("weights", "features")
CAPACITY_MODES = ("cap", "hierarchical")
ACTIVATION_MODES = ("fraction", "threshold")
EXPORT_FORMATS = ("pt2", "onnx", "onnx_int8")
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
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply dotted overrides, then validate the values.

    Registry names are not checked here: a caller that runs the config calls `aip.checks.check_names` too."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_recipe(path)
        data.setdefault("name", path.stem)
    return config_from_dict(merge(data, parse_overrides(overrides or [])))


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

    Names that registries hold (task, mode, model, data set, criteria) and data-set specific keys are checked by
    `aip.checks.check_names`, above the registries: this module imports none of them, so they can import it.
    """
    _check_finite(cfg)
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed: must lie in 0..{SEED_MAX} (what NumPy's seeding takes), got {cfg.seed}")
    _validate_task(cfg)
    _choice("train.scheduler", cfg.train.scheduler, SCHEDULERS)
    if cfg.train.mixed_precision is not None:
        _choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    _choice("prune.schedule", cfg.prune.schedule, PRUNE_SCHEDULES)
    _choice("loss.kd.kind", cfg.loss.kd.kind, KD_KINDS)
    _choice("disc.input", cfg.disc.input, DISC_INPUTS)
    _choice("loss.teacher", cfg.loss.teacher, TEACHERS)
    _choice("loss.at.schedule", cfg.loss.at.schedule, AT_SCHEDULES)
    if cfg.loss.at.schedule in ("ramp", "warmup", "after_prune") and cfg.train.scheduler == "constant":
        raise ConfigError(
            f"loss.at.schedule: {cfg.loss.at.schedule} ramps attention transfer as the learning rate falls, which "
            "train.scheduler constant never does (it would stay off); use cosine or step, or loss.at.schedule constant"
        )
    for i, fmt in enumerate(cfg.export.formats):
        _choice(f"export.formats[{i}]", fmt, EXPORT_FORMATS)
    if len(set(cfg.export.formats)) < len(cfg.export.formats):
        raise ConfigError(f"export.formats: each format once, got {cfg.export.formats}")
    _positive("export.calibration_images", cfg.export.calibration_images)
    if not 0 <= cfg.export.int8_max_drop <= 100:
        raise ConfigError(f"export.int8_max_drop: must lie in 0..100 (top-1 points), got {cfg.export.int8_max_drop}")
    for i, tracker in enumerate(cfg.logging.report_to):
        _choice(f"logging.report_to[{i}]", tracker, tuple(TRACKERS))
    if len(set(cfg.logging.report_to)) < len(cfg.logging.report_to):
        raise ConfigError(f"logging.report_to: each tracker once, got {cfg.logging.report_to}")

    p = cfg.prune
    targets = {
        "prune.target_flops_ratio": p.target_flops_ratio,
        "prune.target_params_ratio": p.target_params_ratio,
        "prune.target_latency_ratio": p.target_latency_ratio,
    }
    for key, ratio in targets.items():
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ConfigError(f"{key}: must lie in (0, 1), the fraction of the teacher to keep; got {ratio}")
    if cfg.mode in ("aip", "acp"):
        if sum(ratio is not None for ratio in targets.values()) != 1:
            raise ConfigError(
                "prune: set exactly one of target_flops_ratio, target_params_ratio and target_latency_ratio "
                "(the others to null)"
            )
        if p.target_latency_ratio is not None and cfg.mode == "acp":
            raise ConfigError("prune.target_latency_ratio: mode acp searches under a FLOPs or parameter budget")
        if p.target_latency_ratio is not None and p.activation.mode == "threshold":
            raise ConfigError("prune.target_latency_ratio: activation.mode threshold needs a FLOPs or params target")
        if cfg.loss.teacher == "assistant" and cfg.mode == "acp":
            raise ConfigError("loss.teacher: assistant is mode aip's; under mode acp set loss.teacher: original")
        if p.sparsity.epochs > 0 and cfg.mode == "acp":
            raise ConfigError("prune.sparsity.epochs: sparsity training is mode aip's; under mode acp set it to 0")
    if not 0.0 < cfg.prune.max_layer_ratio < 1.0:
        raise ConfigError(f"prune.max_layer_ratio: must lie in (0, 1); got {cfg.prune.max_layer_ratio}")
    _positive("prune.intervals", cfg.prune.intervals)
    _positive("prune.epochs_between", cfg.prune.epochs_between, zero_ok=True)
    _positive("prune.finetune_epochs", cfg.prune.finetune_epochs, zero_ok=True)
    _positive("prune.sparsity.epochs", cfg.prune.sparsity.epochs, zero_ok=True)
    _positive("prune.sparsity.weight", cfg.prune.sparsity.weight)
    _positive("prune.calibration_batches", cfg.prune.calibration_batches)
    if isinstance(cfg.prune.round_to, str) and cfg.prune.round_to != "auto":
        raise ConfigError(f"prune.round_to: a channel multiple > 0, auto or null, got {cfg.prune.round_to!r}")
    if isinstance(cfg.prune.round_to, int):
        _positive("prune.round_to", cfg.prune.round_to)
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
    if isinstance(cfg.data.num_workers, str) and cfg.data.num_workers != "auto":
        raise ConfigError(f"data.num_workers: a count >= 0 or auto, got {cfg.data.num_workers!r}")
    if isinstance(cfg.data.num_workers, int):
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
    _positive("disc.steps", cfg.disc.steps)
    if cfg.disc.steps > 1 and cfg.train.grad_accum_steps > 1:
        raise ConfigError("disc.steps: more than one discriminator update per step needs train.grad_accum_steps: 1")
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
    if cfg.train.compile and cxx_compiler() is None:
        raise ConfigError(
            "train.compile: torch.compile's inductor needs a C++ compiler and none was found (set $CXX or install "
            "g++), or set train.compile=false"
        )
    _validate_user_model(cfg)


def _validate_task(cfg: Config) -> None:
    """What task detection does not support yet, and the keys only it takes (the task's name: `aip.checks`)."""
    if cfg.task == "classification":
        if cfg.data.options:
            raise ConfigError("data.options: only task detection takes a data set's own options; set it to {}")
        return
    if cfg.task != "detection":
        return
    if cfg.prune.target_latency_ratio is not None:
        raise ConfigError("prune.target_latency_ratio: not supported yet with task detection; use a FLOPs target")
    if cfg.prune.capacity.enabled:
        raise ConfigError("prune.capacity.enabled: not supported yet with task detection; set it to false")
    if cfg.train.compile:
        raise ConfigError("train.compile: not supported yet with task detection; set it to false")
    if "onnx_int8" in cfg.export.formats:
        raise ConfigError("export.formats: onnx_int8 is not supported yet with task detection; remove it")


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would use ($CXX, else g++; clang++ on macOS), if it is installed."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


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
    if cfg.data.eval_resize is not None:
        _positive("data.eval_resize", cfg.data.eval_resize)
    _validate_pretrained(cfg.model)


def _validate_pretrained(m: ModelConfig) -> None:
    """model.pretrained and model.pretrained_file: library models only, and a file that exists."""
    if not (m.pretrained or m.pretrained_file is not None):
        return
    key = "model.pretrained_file" if m.pretrained_file is not None else "model.pretrained"
    if not m.name.startswith(("timm:", "torchvision:")):
        raise ConfigError(
            f"{key}: only timm: and torchvision: models have library weights, not {m.name!r}; give trained weights "
            "of your own model as model.teacher_checkpoint instead"
        )
    if m.pretrained_file is not None and not Path(m.pretrained_file).is_file():
        raise ConfigError(f"model.pretrained_file: no file at {m.pretrained_file!r}; give a local weights file")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
