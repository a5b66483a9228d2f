"""The config's sections and keys, with each key's default and one-line meaning.

Every key a YAML file or `--set key=value` may name is a field below, with its one-line meaning (`option`); anything
else is refused before any work starts, with the key and what is allowed (`aip.config` loads and validates). This
module imports nothing of aip.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
        {},
        "keyword arguments of package.module:callable; num_classes (and in_channels) are added when it takes them; "
        "with model.pretrained, a torchvision: model takes {weights: <name>} (e.g. IMAGENET1K_V1)",
    )
    pretrained: bool = option(
        False,
        "timm: and torchvision: models start from the library's pretrained weights (its cache; downloaded there "
        "when online); a head of another class count is replaced",
    )
    pretrained_file: str | None = option(
        None,
        "local file of a timm: or torchvision: model's pretrained weights, loaded as the library loads its own "
        "(implies model.pretrained)",
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
    num_workers: int | str = option(
        "auto",
        "DataLoader worker processes (0: load in the main process); auto: none for in-memory sets (CIFAR, "
        "FashionMNIST, synthetic: augmented on the device), else the CPUs given to each process, at most 8",
    )
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
    num_classes: int = option(10, "synthetic only: number of classes (task detection: object classes, at most 12)")
    image_size: int = option(
        32, "synthetic only: image height and width in pixels (task detection: every image's longer side)"
    )
    eval_resize: int | None = option(
        None,
        "imagefolder only: the shorter side validation images are resized to before the centre crop; null: "
        "8/7 of the crop (a pretrained model's own ratio with model.pretrained)",
    )
    train_size: int = option(2048, "synthetic only: training images")
    val_size: int = option(512, "synthetic only: validation images")
    options: dict[str, Any] = option(
        {}, "task detection: the data set's own options, e.g. {val_size: 50} (pennfudan), {max_objects: 3} (synthetic)"
    )


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
    eval_each_epoch: bool = option(
        False,
        "pruning modes: also evaluate right after each prune and after every recovery epoch (report.json 'curve')",
    )
    compile: bool = option(
        False,
        "train under torch.compile (inductor; needs a C++ compiler), compiled afresh after each prune; checkpoints "
        "and exports hold the plain model",
    )


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
class SparsityConfig:
    """Sparsity training before the first prune: Torch-Pruning's group-norm regularisation (DepGraph)."""

    epochs: int = option(
        0, "mode aip: epochs of sparsity training of the unpruned student before the first prune (0: none)"
    )
    weight: float = option(5e-4, "the regularisation's coefficient (GroupNormPruner's reg)")


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
    target_latency_ratio: float | None = option(
        None,
        "mode aip: fraction of the teacher's measured latency to keep (eval, data.batch_size, this run's device); "
        "instead of the FLOPs or parameter target",
    )
    intervals: int = option(3, "pruning intervals (stages) to reach the target in")
    epochs_between: int = option(1, "recovery epochs after each pruning interval")
    finetune_epochs: int = option(1, "fine-tuning epochs after the last interval")
    schedule: str = option(
        "geometric", "steps towards the target: geometric (same fraction of what is left) or linear (same share)"
    )
    max_layer_ratio: float = option(0.8, "no layer group may lose more than this fraction of its original channels")
    round_to: int | str | None = option(
        None,
        "keep every pruned group's width a multiple of N (a group narrower than N stays whole); auto: the run "
        "device's channel block (16 on AVX-512 CPUs, 8 on AVX2 CPUs and CUDA tensor cores); null: any width",
    )
    calibration_batches: int = option(
        4, "training batches used by data-dependent criteria (taylor, activation, similarity on features)"
    )
    hybrid: HybridConfig = option(HybridConfig, "criterion hybrid")
    similarity: SimilarityConfig = option(SimilarityConfig, "criterion similarity")
    activation: ActivationConfig = option(ActivationConfig, "criterion activation")
    capacity: CapacityConfig = option(CapacityConfig, "effective filter analysis: per-layer pruning limits")
    sparsity: SparsityConfig = option(SparsityConfig, "sparsity training before the first prune")


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
    """`mode: acp`: cluster channels, search per-group widths with a particle swarm, then cut towards them over the
    intervals, recovering each stage."""

    eps: float = option(0.1, "DBSCAN eps on correlation distance of channel responses; larger merges more channels")
    min_samples: int = option(5, "DBSCAN min_samples: channels that make a cluster")
    calibration_images: int = option(200, "images whose channel responses are clustered")
    swarm: SwarmConfig = option(SwarmConfig, "the particle swarm over per-group widths")
    recovery_steps: int = option(200, "training steps of each candidate before its fitness is measured")
    criterion: str = option(
        "l1", "which channels a group keeps at a searched width (forward passes only: not taylor or hybrid)"
    )
    fill_budget: bool = option(
        True, "widen each searched candidate (a common share, then width steps) until it fills the budget"
    )
    holdout_size: int = option(1000, "training images held out to measure fitness on (top-1; mAP@.5 for detection)")
    distill: bool = option(True, "distil the candidates' recovery steps from the teacher")
    final: str = option("aip", "recovery of every stage: aip (the AIP losses) or finetune (the task loss alone)")
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
class ATLoss:
    """Attention transfer (Zagoruyko & Komodakis) at the taps."""

    # The paper's beta of 1000 fits this loss's per-position mean: with weight 1 the term measured ~7e-4 on the debug
    # run against ~0.1 for CE, i.e. it did nothing.
    weight: float = option(1000.0, "weight of the term in the student's loss (the paper's beta; 0: off)")
    # after_prune: +1.89 over constant at 30% FLOPs (a paired win), level at 50%, in the quality benchmark's ablations
    # (benchmarks/results/ablations-t0.*-after-prune.md). Its fine-tune warms up (full weight at half the stage): at
    # full weight from the fine-tune's first step the tiny synthetic run of tests/test_run.py lost what it had gained.
    schedule: str = option(
        "after_prune",
        "after_prune: ramp in the stages that begin with a prune, warmup in the others (the fine-tune); constant; "
        "lr: the weight follows the learning rate's schedule within each stage (full right after a prune, fading as "
        "the student settles); ramp: its mirror (none right after a prune, full at the stage's end); warmup: ramp "
        "twice as fast, full from half the stage on",
    )


@dataclass
class LossConfig:
    """The student's loss: weighted sum of cross-entropy, distillation, attention transfer and adversarial terms."""

    ce: WeightedLoss = option(
        WeightedLoss(0.7),
        "cross-entropy on the labels (1 - a with a = loss.kd.weight); task detection: the detector's own losses",
    )
    kd: KDLoss = option(KDLoss, "distillation on the teacher's outputs")
    at: ATLoss = option(ATLoss, "attention transfer at the ends of the stages")
    adv: WeightedLoss = option(WeightedLoss(1.0), "adversarial term: the student learns to fool the discriminator")
    teacher: str = option(
        "original",
        "who teaches each stage (KD, attention transfer, the discriminator's real side): original (the frozen "
        "teacher) or assistant (from the second stage on, the student as the previous stage left it, frozen: a "
        "teacher assistant with a smaller capacity gap; mode aip)",
    )


@dataclass
class DiscriminatorConfig:
    """The fully-connected discriminator that tells teacher outputs from student outputs."""

    hidden: list[int] = option([128, 256, 128], "widths of its hidden layers")
    lr: float = option(1e-4, "Adam learning rate")
    beta1: float = option(0.5, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    input: str = option(
        "attention",
        "what it sees: attention (each tap's attention map pooled to 4x4, independent of the pruned widths; task"
        " detection always uses it), logits or softmax",
    )
    steps: int = option(1, "discriminator updates per student update (the update ratio)")


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
        ["pt2", "onnx"],
        "pt2 (torch.export: model_pruned.pt2), onnx (model_pruned.onnx) and/or onnx_int8 (model_pruned_int8.onnx, "
        "ONNX Runtime static int8; the report's deploy table: top-1 and CPU latency of teacher and student, fp32 and "
        "int8; classification only); []: none",
    )
    calibration_images: int = option(256, "onnx_int8: training images (validation transform) calibrating int8 ranges")
    int8_max_drop: float = option(
        1.0, "onnx_int8: warn when a model's int8 top-1 is more than this many points below its fp32 ONNX top-1"
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
        "aip", "aip (prune + distill), acp (width search, then intervals of cuts and recovery), train or eval"
    )
    seed: int = option(0, "seeds everything; each stage and epoch re-seeds from it, which makes resume exact")
    name: str = option("run", "run name: runs/<name>-<time>; a --config file's stem unless set")
    out: str | None = option(None, "run directory; null: runs/<name>-<time> (the --out flag wins)")
    task: str = option(
        "classification",
        "classification or detection (data.name a detection set: pennfudan, voc, coco, synthetic; model.name a "
        "detector: tiny_ssd, ssdlite320_mobilenet_v3_large, fasterrcnn_mobilenet_v3_large_320_fpn, ... or your own)",
    )
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
