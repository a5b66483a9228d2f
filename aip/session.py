"""The Accelerate session of one run: the Accelerator and its trackers, data loaders, (re-)prepare, evaluation,
weights and checkpoints, logging and printing. The methods (`aip/methods/`) train through it.

The teacher is never prepared: it stays frozen in eval mode and is moved to the device by hand. After each prune the
student is unwrapped, pruned in place, given fresh optimizers and prepared again (`prepare` frees what Accelerate had
registered first, so that no stale model or optimizer is saved with the next checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aip import checkpoint as ckpt
from aip.accel import CPU_ONLY, local_process_count, mixed_precision, process_group_kwargs, strip_autocast
from aip.batches import WholeBatches, device_transform, resolve_workers, whole_batch
from aip.checks import check_batches, check_names
from aip.config import Config, ConfigError, save_config
from aip.data import DataBundle
from aip.deploy import write_deploy
from aip.export import EXPORT_FILE
from aip.export import FILES as EXPORT_FILES
from aip.guards import check_modules, check_state
from aip.models.pretrained import architecture_only
from aip.models.user import given_name
from aip.models.weights import load_into, load_state_dict_file
from aip.prune.restore import load_weights
from aip.pruned import RECORD, model_record
from aip.report import write_report
from aip.seeding import SeededBatches, derive_seed, seeded
from aip.tasks import task_for
from aip.tasks.base import ExportTarget

TRACKER_RUN = "tb"  # trackers log under the run directory: TensorBoard's event files in <run>/tb/


@dataclass
class RunState:
    """What the loop carries from stage to stage and stores in every checkpoint's meta."""

    stage: int = 0
    global_step: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)  # train.eval_each_epoch: top-1 per recovery epoch
    pruning_log: list[dict[str, Any]] = field(default_factory=list)
    capacity: dict[str, dict[str, Any]] = field(default_factory=dict)
    searched_widths: dict[str, int] = field(default_factory=dict)  # mode acp: the search's final widths
    round_to: int | None = None  # prune.round_to as the run's first process resolved it (auto), kept on resume
    notes: list[str] = field(default_factory=list)  # what the run decided in the user's place, for the report

    @classmethod
    def restored(cls, saved: dict[str, Any], **now: Any) -> RunState:
        """The run state a checkpoint's meta stored, with `now`'s values in place of the saved ones; a key this
        version does not know is refused (a meta written by another version, or edited), never dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ckpt.CheckpointError(
                f"checkpoint meta: unknown run-state keys {', '.join(unknown)} (written by another aip version, or "
                "edited); resume it with the version that wrote it, or from an earlier checkpoint"
            )
        return cls(**{**saved, **now})


def output_classes(model: nn.Module, example: torch.Tensor) -> int:
    """The class count of a classifier: the width of its output on one example (a probe on a copy, in eval mode)."""
    probe = copy.deepcopy(model).eval()
    device = next((p.device for p in probe.parameters()), example.device)  # a model the user left on a GPU
    with torch.no_grad():
        out = probe(example.unsqueeze(0).to(device))
    if not (torch.is_tensor(out) and out.dim() == 2):
        raise ConfigError(f"teacher: must return (N, classes) logits, got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


def _tracker_config(cfg: Config) -> dict[str, Any]:
    """The config as flat scalars, what every tracker's hyperparameter store takes."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (bool, int, float, str)) else str(node)

    walk(cfg.to_dict(), "")
    return out


@dataclass
class Outcome:
    """What a method hands back: the report (report.json's dict) and the model it made (the recovered student)."""

    report: dict[str, Any]
    model: nn.Module
    run_dir: Path | None = None


class Session:
    """One run's Accelerator, data and run directory; `model` and `data` (objects) take the place of the config's
    names when given: the model is deep-copied, never modified."""

    def __init__(
        self, cfg: Config, run_dir: Path, data: DataBundle | None = None, model: nn.Module | None = None
    ) -> None:
        check_names(cfg, dataset=data is None)  # the registry names before any work, for every caller
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        group = process_group_kwargs(cfg)
        trackers = list(cfg.logging.report_to)
        self.accelerator = Accelerator(
            cpu=CPU_ONLY,
            mixed_precision=mixed_precision(cfg),
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            kwargs_handlers=[InitProcessGroupKwargs(**group)] if group else None,
            log_with=trackers or None,
            project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(non_blocking=not CPU_ONLY),  # from pinned memory, on a GPU
        )
        self.main = self.accelerator.is_main_process
        set_seed(cfg.seed)
        self.task = task_for(cfg)
        self.data: DataBundle = data if data is not None else self.task.build_data(cfg)
        self.example = self.task.example(self.data)
        check_batches(cfg, len(self.data.train), model is not None or cfg.model.teacher_checkpoint is not None)
        self.model = copy.deepcopy(model) if model is not None else None
        given = model is not None and self.task.probes_classes  # a detector's classes are not probed
        classes = output_classes(model, self.example[0]) if given else self.data.num_classes
        if classes != self.data.num_classes:
            raise ConfigError(
                f"teacher: returns {classes} classes, the data has {self.data.num_classes} "
                "(data.num_classes, or give train_data and val_data)"
            )
        if self.model is not None and self.accelerator.num_processes > 1:
            with torch.no_grad():  # rank 0's weights on every process: each built its instance on its own
                for tensor in self.model.state_dict().values():
                    tensor.copy_(broadcast(tensor.to(self.accelerator.device)))
        if self.main:  # a run directory's config is written once, by the run that starts it; resume keeps it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "config.yaml").exists():
                save_config(cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self.tracking = bool(trackers)
        if self.tracking:
            self.accelerator.init_trackers(TRACKER_RUN)
            for tracker in self.accelerator.trackers:  # the config as hyperparameters; TensorBoard has config.yaml
                if tracker.name != "tensorboard":
                    tracker.store_init_configuration(_tracker_config(cfg))
        self.state = RunState()
        self._loader_gen = torch.Generator()
        self._batches = SeededBatches(self.data.train)  # each batch fetched with seeds of its own: see seed

    # ------------------------------------------------------------- output
    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars to every configured tracker (rank 0 only, through Accelerate)."""
        if self.tracking:
            self.accelerator.log(values, step=step)

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def bar(self, iterable: Any, desc: str, leave: bool = True) -> tqdm:
        """A progress bar on rank 0, on a terminal only: in a log or a pipe it would be stray text before an error."""
        return tqdm(iterable, desc=desc, disable=None if self.main else True, leave=leave)

    def close(self) -> None:
        """End the trackers (flushes their files); safe to call twice. Not `end_training()`, which also destroys
        the process group: a script that calls `aip.run` under `accelerate launch` may still need it."""
        if self.tracking:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.tracking = False

    # -------------------------------------------------------------- data
    def seed(self, stage: int, epoch: int) -> None:
        """Seed everything from (seed, stage, epoch) so a resumed stage draws the same data as an unbroken run:
        the shuffle, and each training batch's augmentation (seeded from this value and the batch's index, see
        `train_inputs`, so a resumed epoch skips its first batches by index and still draws what follows them)."""
        value = (self.cfg.seed * 100_003 + stage * 1_009 + epoch) % 2**32  # NumPy takes seeds below 2**32
        set_seed(value)
        self._loader_gen.manual_seed(value)
        self._batches.seed = value
        self.task.set_epoch(self.data, value)

    def loader_options(self, dataset: Any) -> dict[str, Any]:
        """Workers, pinned memory and collation of a loader over `dataset`: an in-memory set is fetched a whole
        uint8 batch at a time (no workers under `data.num_workers: auto`); files are decoded in worker processes."""
        in_memory = device_transform(dataset) is not None
        local = local_process_count(self.accelerator.state.num_processes)  # the CPUs are this machine's
        workers = resolve_workers(self.cfg.data.num_workers, in_memory, local)
        gpu = not CPU_ONLY
        return {
            "num_workers": workers,
            "pin_memory": gpu,
            "persistent_workers": gpu and workers > 0,
            "collate_fn": whole_batch if in_memory else self.task.collate,
        }

    def train_loader(self) -> DataLoader:
        """Shuffled training batches of the epoch `seed` set; in-memory sets come as uint8 (see `train_inputs`)."""
        return DataLoader(
            self._batches,
            batch_size=self.cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self._loader_gen,
            **self.loader_options(self.data.train),
        )

    def val_loader(self) -> DataLoader:
        """Validation batches in order; in-memory sets come as uint8, which the task's `evaluate` normalises on the
        device."""
        options = self.loader_options(self.data.val)
        dataset = WholeBatches(self.data.val) if options["collate_fn"] is whole_batch else self.data.val
        return DataLoader(dataset, batch_size=self.cfg.data.eval_batch_size, **options)

    def train_inputs(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Training batch `index` of the epoch, on the device, as the model's input: the global streams are seeded
        from (epoch seed, process, index), and an in-memory set's uint8 batch is augmented and normalised from that
        seed, so a resumed epoch that skips batches by index goes on as an unbroken one."""
        seed = derive_seed(self._batches.seed, self.accelerator.process_index, index)
        set_seed(seed)
        transform = self._batches.device_transform
        return x if transform is None else transform(x, torch.Generator().manual_seed(seed))

    def steps_per_epoch(self, loader: DataLoader) -> int:
        """Optimizer steps per epoch on one process, for a loader not yet sharded by `prepare`."""
        per_process = math.ceil(len(loader) / self.accelerator.num_processes)
        return max(1, per_process // self.cfg.train.grad_accum_steps)

    # ------------------------------------------------------------ models
    def new_model(self) -> nn.Module:
        """A model of the configured family, or a copy of the given model instance (with its weights)."""
        if self.model is not None:
            return copy.deepcopy(self.model)
        return self.task.create_model(self.cfg, self.data, self.example)

    def probe_model(self) -> nn.Module:
        """A model for the checks made before training, built without drawing from the global random streams: a
        check never changes the weights the run's teacher is then initialised with."""
        with seeded(derive_seed(self.cfg.seed, "probe")):  # the architecture only: no pretrained weights read
            return self.new_model() if self.model is not None else self._bare_model()

    def _bare_model(self) -> nn.Module:
        """The configured architecture without pretrained weights: for checks, and where a file's weights follow."""
        return self.task.create_model(architecture_only(self.cfg), self.data, self.example)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        # Accelerate steps a prepared scheduler once per process for every optimizer step, hence the factor.
        total = max(1, total_steps * self.accelerator.num_processes)
        kind = self.cfg.train.scheduler
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        if kind == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], gamma=0.1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def prepare(self, *objects: Any) -> Any:
        """Prepare afresh: what Accelerate had registered (a model since pruned, its optimizers) is freed first, and
        a model prepared before loses its autocast wrapper first (so it is wrapped once, not once per stage)."""
        self.accelerator.free_memory()
        objects = tuple(strip_autocast(o) if isinstance(o, nn.Module) else o for o in objects)
        return self.accelerator.prepare(*objects)

    def cost(self, model: nn.Module) -> dict[str, int]:
        """Parameters and FLOPs of the (unwrapped) model on the example, as the task counts them."""
        return self.task.cost(self.accelerator.unwrap_model(model), self.example.to(self.accelerator.device))

    def metrics(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """The task's two quality metrics (%) over the whole validation set (top1/top5, or map/map50)."""
        return self.task.evaluate(model, loader, self.accelerator)

    # ------------------------------------------------------- weights, checkpoints
    def save_weights(self, model: nn.Module, path: Path) -> None:
        """Write `model`'s weights to `path` (rank 0), never weights that hold a NaN or an infinity."""
        check_state(str(path), model.state_dict())
        if self.main:
            tmp = path.with_name(path.name + ".tmp")
            name = self.cfg.model.name if self.model is None else given_name(self.model)
            payload = {"model": name, "num_classes": self.data.num_classes}
            torch.save({**payload, "state_dict": model.state_dict()}, tmp)
            tmp.replace(path)
        self.accelerator.wait_for_everyone()

    def load_weights(self, path: Path) -> nn.Module:
        """A model of the configured family with weights from a teacher file: ours, or one as people have them
        (aip/models/weights.py). Trust and key renames apply to the configured model.teacher_checkpoint only."""
        m = self.cfg.model
        given = m.teacher_checkpoint is not None and Path(path).resolve() == Path(m.teacher_checkpoint).resolve()
        state = load_state_dict_file(path, m.trust_checkpoint and given, m.checkpoint_rename if given else None)
        model = self.new_model() if self.model is not None else self._bare_model()  # the file's weights follow
        what = f"model.teacher_checkpoint {str(path)!r} (model.name={m.name!r}, {self.data.num_classes} classes)"
        load_into(model, state, what)
        return model

    def save_checkpoint(
        self, stage: int, history: list, step: int | None = None, partial: dict[str, int] | None = None
    ) -> None:
        """Checkpoint the end of `stage` or, with `step` and `partial`, a point inside it; rank 0 writes the files.

        A write that fails (a full disk, say) leaves no temporary behind and stops the run with one line; the
        checkpoints committed before stay valid. Weights that hold a NaN or an infinity are never written."""
        acc = self.accelerator
        what = f"checkpoint {ckpt.stage_dir(self.run_dir, stage, step).name}"
        check_modules(what, acc._models, acc)  # the models save_state writes: the student and the discriminator
        try:
            tmp = ckpt.begin(self.run_dir, stage, step) if self.main else None
            acc.wait_for_everyone()
            acc.save_state(str(ckpt.temporary(self.run_dir, stage, step) / ckpt.STATE_DIR))
            acc.wait_for_everyone()
            if self.main:
                record = model_record(self.data.num_classes, self.example, self.model)  # what load_pruned builds
                meta = {"stage": stage, "state": self.state.__dict__, "config": self.cfg.to_dict(), RECORD: record}
                if partial is not None:
                    meta["partial"] = partial
                ckpt.commit(tmp, self.run_dir, stage, history, meta, step)
                ckpt.prune_old(self.run_dir, self.cfg.checkpoint.keep)
        except Exception as exc:
            if self.main:
                error = ckpt.failed_write(self.run_dir, stage, step, exc)
                if ckpt.is_write_failure(exc):
                    raise error from None
            raise
        acc.wait_for_everyone()

    def restore(self, source: Path, *objects: Any) -> None:
        """Prepare `objects` (models, optimizers, schedulers, in the checkpoint's order) and load the weights,
        optimizer and RNG states of checkpoint `source` into them, through Accelerate."""
        self.prepare(*objects)
        self.load_state(source)

    def load_state(self, source: Path) -> None:
        """Weights, optimizer and RNG states of checkpoint `source` into what is prepared now, through Accelerate;
        a checkpoint that passed its checks but does not load (files rewritten with their hashes) is one line."""
        try:
            self.accelerator.load_state(str(source / ckpt.STATE_DIR))
        except Exception as exc:  # noqa: BLE001  (torch, safetensors and pickle each raise their own)
            first = " ".join(str(exc).split())[:300]
            raise ckpt.CheckpointError(
                f"checkpoint {str(source)!r} does not load into the run ({type(exc).__name__}: {first}); resume from "
                "an earlier stage checkpoint, or delete this one"
            ) from None

    def export_target(self) -> ExportTarget:
        """What the task's export reads of the run."""
        given = None if self.model is None else given_name(self.model)
        return ExportTarget(self.run_dir, self.example, self.cfg, self.data.num_classes, given, self.print)

    def finish(
        self, student: nn.Module, finished: Path | None = None, history: list | None = None, teacher: Any = None
    ) -> Outcome:
        """Export the student (fp32, no autocast wrapper; a format that fails is a warning) and, with onnx_int8, its
        deploy table beside `teacher`'s; write the stage table and pruning log. `finished`: the last stage checkpoint
        of a run ended before this resume: exports are only repaired from it, where missing or not loading."""
        acc = self.accelerator
        student = acc.unwrap_model(student, keep_fp32_wrapper=False)
        acc.free_memory()
        if finished is None:
            check_modules(EXPORT_FILE, [student], acc)
        if self.main:
            if repair := finished is not None:
                load_weights(student, finished)
            written = self.task.export(self.export_target(), student, history or [], repair)
            deploy = write_deploy(self, teacher, student, repair)  # int8 from the fp32 ONNX file written just now
            if repair and (names := [EXPORT_FILES.get(f, f) for f in written] + deploy.written):
                self.print(f"{', '.join(names)} missing or damaged in {self.run_dir}: exported again from {finished}")
            s = self.state
            table = write_report(self.run_dir, s.teacher, s.rows, s.curve, s.notes + deploy.notes, deploy.section)
            (self.run_dir / "pruning_log.json").write_text(json.dumps(self.state.pruning_log, indent=1))
            self.print(f"\n{table}\n\nrun directory: {self.run_dir}")
        acc.wait_for_everyone()
        self.close()
        return Outcome({"teacher": self.state.teacher, "stages": self.state.rows}, student)
