"""Read checkpoints as people have them: bare or wrapped state dicts, DataParallel / torch.compile prefixes,
safetensors, legacy (non-zip) files saved on a GPU; then load them strictly with a one-line report of what differs.

Files are read with `weights_only=True` first; a file that also pickles other Python objects (the argparse Namespace
in timm's and torchvision's training checkpoints) is only unpickled with `model.trust_checkpoint: true`.
"""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from aip.config import ConfigError

# Where training scripts keep the weights inside a checkpoint dict, most specific first.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema")
# Prefixes added by nn.DataParallel / DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`).
PREFIXES = ("module.", "_orig_mod.")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
SHOWN = 3  # key names quoted per kind of mismatch


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """`Type: first sentence of the message`, short enough for an error line."""
    text = " ".join(str(exc).split())
    text = text.split(". ")[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _resolvable(qualname: str) -> bool:
    """Whether a pickled global such as `argparse.Namespace` exists here (a truncated file names half a global)."""
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # any import failure means: not resolvable here
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length followed by a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def _check_crc(path: Path, label: str) -> None:
    """Each member of a zip-format torch file against its CRC-32: torch.load does not check them, so a flipped bit
    in the stored weights would load as a silently different model. Legacy (non-zip) files have no checksums, nor
    have members recorded with CRC 0 (saved under `torch.serialization.set_crc32_options(False)`)."""
    member = None
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = info.filename
                if info.CRC != 0:
                    with archive.open(info) as fh:
                        while fh.read(1 << 24):
                            pass
    except Exception as exc:  # zipfile raises BadZipFile (a bad CRC, a damaged header), OSError, ...
        if "CRC" in str(exc):
            raise ConfigError(
                f"{label} {str(path)!r}: member {member!r} fails its CRC-32 check, so its bytes changed after saving "
                "(a bad copy or disk); copy the file again"
            ) from None
        where = f" at member {member!r}" if member is not None else ""
        raise ConfigError(f"{label} {str(path)!r}: a damaged zip archive{where} ({_one_line(exc)})") from None


def _read(path: Path, trust: bool, label: str) -> object:
    """The unpickled (or safetensors) content of the file; every failure is one ConfigError line."""
    try:
        safetensors = _is_safetensors(path)
    except OSError as exc:
        raise ConfigError(f"{label} {str(path)!r}: cannot be read ({_one_line(exc)})") from None
    if safetensors:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ConfigError(f"{label} {str(path)!r}: not a readable safetensors file ({_one_line(exc)})") from None
    damaged = f"{label} {str(path)!r}: not a readable PyTorch checkpoint (damaged, truncated or another kind of file"
    _check_crc(path, label)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:
            raise ConfigError(f"{damaged}: {_one_line(exc.__context__ or exc)})") from None
        if not _resolvable(found.group(1)):
            raise ConfigError(f"{damaged}: it names {found.group(1)}, which does not exist here)") from None
        if not trust:
            raise ConfigError(
                f"{label} {str(path)!r} holds Python objects besides tensors ({found.group(1)}), which a weights-only "
                "load refuses; if you trust this file, set model.trust_checkpoint: true to unpickle it"
            ) from None
    except Exception as exc:  # the unpickler fails on arbitrary bytes in arbitrary ways (KeyError, IndexError, ...)
        raise ConfigError(f"{damaged}: {_one_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary unpickling runs arbitrary code: any error is the file's
        raise ConfigError(f"{damaged}: {_one_line(exc)})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: object, label: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one under a wrapper key (up to two levels), or a pickled module's."""
    for _ in range(3):
        if isinstance(obj, nn.Module):
            return dict(obj.state_dict())
        if _is_state_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    what = f"keys {list(obj)[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise ConfigError(
        f"{label} {str(path)!r} holds no state dict ({what}); expected tensors by parameter name, bare or under "
        f"one of: {', '.join(WRAPPER_KEYS)}"
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` / `_orig_mod.` where every key starts with it (repeatedly), and `_orig_mod.` inside names."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return {k.replace("._orig_mod.", "."): v for k, v in state.items()}


def load_state_dict_file(
    path: str | Path,
    trust: bool = False,
    rename: Mapping[str, str] | None = None,
    label: str = "model.teacher_checkpoint",
) -> dict[str, torch.Tensor]:
    """A plain state dict from a checkpoint file as people have them, prefixes stripped, keys renamed, weights
    checked to be finite. `label` names the config key in the one-line errors."""
    path = Path(path)
    state = _strip_prefixes(_unwrap(_read(path, trust, label), label, path))
    for old, new in (rename or {}).items():
        state = {k.replace(old, new): v for k, v in state.items()}
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConfigError(f"{label} {str(path)!r}: {key} holds {bad} non-finite values (NaN or Inf)")
    return state


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "the checkpoint") -> None:
    """Load `state` strictly into `model`; a mismatch is one ConfigError line naming the first missing and unexpected
    keys and the shapes that differ, or an integer tensor where the model has floats. BatchNorm's
    `num_batches_tracked`, absent from old files, may be missing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if shapes:
            k = shapes[0]
            more = f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""
            parts.append(
                f"shape differs at {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model{more}"
            )
        hint = "; model.checkpoint_rename renames keys" if missing and unexpected else ""
        raise ConfigError(f"{what} does not fit the model: {'; '.join(parts)}{hint}")
    for k, tensor in state.items():  # load_state_dict would cast integers to the model's floats without a word
        if own[k].is_floating_point() and not tensor.is_floating_point():
            raise ConfigError(
                f"{what} does not fit the model: {k} holds {tensor.dtype} values where the model has {own[k].dtype}; "
                "save the weights as floating-point tensors"
            )
    full = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    model.load_state_dict(full, strict=True)
