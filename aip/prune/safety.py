"""What makes a removal step safe: groups the graph cannot follow are refused up front, and every step is checked.

Torch-Pruning's tracer treats any operation it does not know as element-wise (channel i in, channel i out). That is
wrong for channel padding (a zero-padding shortcut), custom autograd functions, gathers, shuffles and in-place
writes into slices, and for normalisations over channels (LayerNorm, GroupNorm), which make every channel depend on the
others. `refusal_reason` names such an operation in a group so the group is left unpruned.

Every removal step is then verified: the channels about to go are silenced first (their outgoing weights zeroed, so
the network no longer depends on them), the output on the example input is recorded, the channels are removed, and
the output must be the same. A step that fails is undone with `Snapshot.restore`, the model and the graph's own
state both. The example is cropped to smaller maps where the model's outputs keep their shapes (`check_example`): the
same check at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch.utils._pytree import tree_flatten
from torch_pruning.dependency import index_mapping as _index_mapping

# grad_fn names (without the trailing version digit) that move values across channels.
_CHANNEL_MIXING = {
    "IndexBackward": "an index/gather on a tensor",
    "IndexSelectBackward": "index_select",
    "GatherBackward": "gather",
    "ScatterBackward": "scatter",
    "RollBackward": "roll",
    "FlipBackward": "flip",
    "RepeatBackward": "repeat",
    "PixelShuffleBackward": "pixel_shuffle",
    "PixelUnshuffleBackward": "pixel_unshuffle",
    "ChannelShuffleBackward": "channel_shuffle",
    "UnfoldBackward": "unfold",
    "Im2ColBackward": "unfold",
    "SplitWithSizesBackward": "split into fixed sizes",
    "CopySlices": "an in-place write into a slice",
}
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_UNFOLLOWABLE = "aip_unfollowable"


def _tolerate_unknown_reshapes() -> None:
    """Torch-Pruning divides by zero when it cannot infer the channels around a reshape (a channel shuffle's
    view/transpose/view), which stops the whole trace. Mark such a reshape instead; its groups are refused."""
    original = _index_mapping.update_reshape_index_mapping
    if getattr(original, "tolerant", False):
        return

    def update(graph: tp.DependencyGraph, node: object) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            setattr(node, _UNFOLLOWABLE, "a reshape whose channel mapping the graph cannot infer (a channel shuffle?)")

    update.tolerant = True
    _index_mapping.update_reshape_index_mapping = update


_tolerate_unknown_reshapes()


def _op_name(node: object) -> str:
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is None:
        return ""
    if isinstance(grad_fn, torch.autograd.function.BackwardCFunction):
        return "BackwardCFunction"
    return grad_fn.name().rstrip("0123456789")


def _pads_channels(grad_fn: object) -> bool:
    pad = list(getattr(grad_fn, "_saved_pad", ()) or ())
    return len(pad) >= 6 and any(int(p) != 0 for p in pad[4:6])


def refusal_reason(group: tp.dependency.Group) -> str | None:
    """Why this group must not be pruned (an operation the dependency graph cannot follow), or None."""
    names = getattr(getattr(group, "_DG", None), "_module2name", {})
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        name = _op_name(node)
        where = names.get(module, type(module).__name__) if isinstance(module, nn.Module) else ""
        if getattr(node, _UNFOLLOWABLE, None):
            return getattr(node, _UNFOLLOWABLE)
        if isinstance(module, nn.LayerNorm):
            return f"LayerNorm {where} normalises over these channels (removing one changes the others)"
        if isinstance(module, nn.GroupNorm) and module.num_groups != module.num_channels:
            return f"GroupNorm {where} normalises groups of channels together"
        if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
            return f"{type(module).__name__} {where} mixes channels in ways the check cannot silence"
        if name == "BackwardCFunction":
            return "a custom autograd function (the graph cannot see how it maps channels)"
        if name == "ConstantPadNdBackward" and _pads_channels(node.grad_fn):
            return "channel padding (F.pad on the channel axis, e.g. a zero-padding shortcut)"
        if name in _CHANNEL_MIXING:
            return f"{_CHANNEL_MIXING[name]} ({name}), which the graph cannot follow across channels"
    return None


def split_pieces(group: tp.dependency.Group) -> int | None:
    """For a group whose full width is split into equal pieces (torch.chunk), the number of pieces; 1 without a
    split; None for a split the pruner cannot keep consistent (a part of the channels, or unequal pieces)."""
    width = len(group[0].idxs)
    pieces = 1
    for item in group:
        if item.dep.target.type not in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND):
            continue
        sizes = getattr(item.dep.target.module, "split_sizes", None)
        if not sizes or len(item.idxs) != width or sum(sizes) != width or len(set(sizes)) != 1:
            return None
        pieces = pieces * len(sizes) // _gcd(pieces, len(sizes))
    return pieces


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def _copied(value: object) -> object:
    """A list's own copy (Torch-Pruning edits `concat_sizes` and `split_sizes` lists in place), else the value."""
    return list(value) if isinstance(value, list) else value


class Snapshot:
    """Every module's parameters, buffers and attributes (channel counts), and the dependency graph's own state, to
    undo a removal step in place.

    Restoring keeps the module objects (the dependency graph and hooks refer to them) and puts back the tensors
    they held; parameters whose values were overwritten in place are put back through `keep_data`. A removal also
    changes the graph: its operation nodes' bookkeeping (a concatenation's `concat_sizes` and `offsets`, a split's
    `split_sizes`, a slice's bounds, some of it edited in place) and, for a pruned bare `nn.Parameter`, the node
    and name it is registered under. With `graph`, that state is kept and put back too, so later groups are still
    mapped through the widths the model really has.
    """

    def __init__(self, model: nn.Module, graph: tp.DependencyGraph | None = None) -> None:
        self.entries = []
        own = set()
        for module in model.modules():
            own.add(id(module))
            attrs = {k: _copied(v) for k, v in vars(module).items() if k not in _MODULE_DICTS}
            self.entries.append((module, attrs, dict(module._parameters), dict(module._buffers)))
        self.data: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.slices: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]] = []
        self.graph = graph
        if graph is not None:  # graph-only operations (_ConcatOp, _SplitOp, ...) are no modules of the model
            self.ops = [
                (op, {k: _copied(v) for k, v in vars(op).items()})
                for op in graph.module2node
                if isinstance(op, nn.Module) and id(op) not in own
            ]
            self.module2node = dict(graph.module2node)
            self.node_modules = [(node, node.module) for node in graph.module2node.values()]
            self.param_names = dict(getattr(graph, "_param_to_name", {}))

    def keep_data(self, param: nn.Parameter) -> None:
        """Remember a parameter's current values before they are changed in place."""
        self.data.append((param, param.data))

    def keep_slices(self, param: nn.Parameter, axis: int, index: torch.Tensor) -> None:
        """Remember the values of a parameter's slices `index` along `axis` before they are changed in place."""
        self.slices.append((param, axis, index, param.data.index_select(axis, index)))

    def restore(self) -> None:
        """Put the model (and the graph, when one was given) back as they were when the snapshot was taken."""
        for module, attrs, params, buffers in self.entries:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for key in [k for k in vars(module) if k not in attrs and k not in _MODULE_DICTS]:
                delattr(module, key)
            vars(module).update({k: _copied(v) for k, v in attrs.items()})
        for param, data in self.data:
            param.data = data
        for param, axis, index, values in reversed(self.slices):
            param.data.index_copy_(axis, index, values)
        if self.graph is not None:
            for op, attrs in self.ops:
                vars(op).update({k: _copied(v) for k, v in attrs.items()})
            self.graph.module2node.clear()
            self.graph.module2node.update(self.module2node)
            for node, module in self.node_modules:
                node.module = module
            if hasattr(self.graph, "_param_to_name"):
                self.graph._param_to_name.clear()
                self.graph._param_to_name.update(self.param_names)


@torch.no_grad()
def silence(group: tp.dependency.Group, graph: tp.DependencyGraph, snapshot: Snapshot) -> bool:
    """Zero the weights through which the group's channels reach the next layers (inputs of convolutions and linear
    layers), so the network's output no longer depends on them. False when some consumer cannot be silenced."""
    for item in group:
        module, handler, idxs = item.dep.target.module, item.dep.handler, list(item.idxs)
        if not idxs or not graph.is_in_channel_pruning_fn(handler):
            continue
        if isinstance(module, nn.Linear):
            weights = [(module.weight, 1, idxs, None)]
        elif isinstance(module, nn.modules.conv._ConvNd):
            if module.groups == module.in_channels == module.out_channels and module.groups > 1:
                continue  # depthwise: channel i in is channel i out, which the group removes too
            weights = [(module.weight, 0 if module.transposed else 1, idxs, module)]
        elif isinstance(module, (*_PER_CHANNEL_NORMS, nn.GroupNorm, nn.PReLU)):
            continue
        elif not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue  # graph-only operations (sums, concatenations, pooling) and parameters pruned per channel
        else:
            return False
        for param, axis, channels, conv in weights:
            if conv is not None and conv.groups > 1 and not conv.transposed:
                snapshot.keep_data(param)
                data = param.data.clone()
                per_in = conv.in_channels // conv.groups
                per_out = conv.out_channels // conv.groups
                for c in channels:
                    g, local = divmod(c, per_in)
                    data[g * per_out : (g + 1) * per_out, local] = 0
                param.data = data
            else:  # only the silenced slices are kept, and zeroed in place
                index = torch.as_tensor(channels, device=param.device)
                snapshot.keep_slices(param, axis, index)
                param.data.index_fill_(axis, index, 0)
    return True


def outputs(model: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    """The model's output tensors on `example` (any nesting of tuples, lists and dicts), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flat, _ = tree_flatten(model(example))
    finally:
        model.train(was_training)
    return [t.detach().float() for t in flat if isinstance(t, torch.Tensor)]


def check_example(model: nn.Module, example: torch.Tensor, shrink: int = 4, smallest: int = 32) -> torch.Tensor:
    """The example to verify removal steps on: a crop of `example` with each spatial side cut to 1/`shrink` (not
    under `smallest`), when the model runs on it and returns outputs of the same shapes (a classifier, a pooled
    network), else `example` itself. Channel routing does not depend on the size of the maps, and the two forward
    passes of each step cost 1/`shrink`^2 as much."""
    if not isinstance(example, torch.Tensor) or example.dim() < 3:
        return example
    sides = [min(s, max(smallest, s // shrink)) for s in example.shape[2:]]
    if sides == list(example.shape[2:]):
        return example
    crop = example[(slice(None), slice(None), *(slice(0, s) for s in sides))].contiguous()
    try:
        small, full = outputs(model, crop), outputs(model, example)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError):
        return example
    if [t.shape for t in small] != [t.shape for t in full]:
        return example
    return crop


def mismatch(reference: list[torch.Tensor], found: list[torch.Tensor], rtol: float = 1e-3) -> str | None:
    """None when every output has the same shape and values (to float tolerance), else what differs."""
    if len(reference) != len(found):
        return f"the model now returns {len(found)} tensors instead of {len(reference)}"
    for i, (a, b) in enumerate(zip(reference, found, strict=True)):
        if a.shape != b.shape:
            return f"output {i} changed shape from {tuple(a.shape)} to {tuple(b.shape)}"
        scale = float(a.abs().max()) if a.numel() else 0.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        if not err <= rtol * max(scale, 1e-3):
            return f"output {i} changed by {err:.3g} (scale {scale:.3g}): the network computes something else"
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (its type's name when it has none)."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
