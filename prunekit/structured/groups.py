"""Channel dependency groups, found on the model's traced graph (torch.fx).

Removing output channel c of a Conv2d (or output neuron c of a Linear) also removes channel c
of every tensor that shares its channel axis: the BatchNorm that follows, a depthwise conv,
the other operand of a residual add, and input channel c (or, after a flatten, the block of
input features of channel c) of every layer that reads it. Such a set of coupled channel
axes is a *group*; its channels are removed together, one index across all members.

Every traced value gets a channel axis (a union-find node). Layers that create channels
(Conv2d with groups 1, Linear) start a new axis; channel-wise layers (BatchNorm, activations,
pooling, dropout, depthwise convs) pass theirs on; element-wise arithmetic between tensors
joins its operands' axes; flatten keeps the axis with a block of spatial features per channel.
Anything else (reshape, concatenation, padding, indexing, a module called twice, the model's
input and output) pins the axes it touches: their channels cannot be removed, and the
layers there stay as they are.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from prunekit.errors import UsageError
from prunekit.runtime.batches import eval_mode

CHANNEL_WISE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
CHANNEL_WISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6,
    nn.functional.gelu, nn.functional.silu, nn.functional.leaky_relu, nn.functional.hardswish,
    nn.functional.dropout, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d,
}  # fmt: skip
CHANNEL_WISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
ELEMENT_WISE = {operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.mul}
FLATTEN = {torch.flatten, "flatten"}  # the function and the tensor method
SPATIAL_MEANS = {torch.mean, "mean"}


@dataclass
class Member:
    """One layer's share of a group: which of its tensors lose the group's channels."""

    module: str  # dotted module name
    role: str  # "out" (rows of a Conv/Linear), "channel" (BN / depthwise), "in" (columns)
    block: int = 1  # "in" after a flatten: input features per channel


@dataclass
class Group:
    """Coupled channel axes: ``channels`` channels, removed by one index across members."""

    channels: int
    members: list[Member] = field(default_factory=list)

    def names(self, role: str) -> list[str]:
        return [m.module for m in self.members if m.role == role]

    def __str__(self) -> str:
        return "+".join(self.names("out"))


class _Axes:
    """Union-find over channel axes, with pinned (unremovable) classes."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: set[int] = set()

    def new(self, pinned: bool = False) -> int:
        self.parent.append(len(self.parent))
        if pinned:
            self.pinned.add(len(self.parent) - 1)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            if b in self.pinned:
                self.pinned.add(a)

    def pin(self, a: int) -> None:
        self.pinned.add(self.find(a))


@dataclass
class _Value:
    axis: int
    block: int = 1  # features per channel (after a flatten)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model's graph with shapes, or an error naming what could not be traced."""
    # traced in eval mode, as it is pruned and loaded: `if self.training` branches agree
    with eval_mode(model):
        try:
            graph = fx.symbolic_trace(model)
        except Exception as exc:  # tracers fail with many exception types
            where = _untraceable_part(model)
            raise UntraceableError(
                f"cannot trace {where} for structured pruning "
                f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}); prune "
                "it without --structure, or pass --structure channels-or-weights to fall back "
                "to unstructured pruning"
            ) from exc
        with torch.no_grad():
            ShapeProp(graph).propagate(example)
    return graph


class UntraceableError(UsageError):
    """torch.fx cannot trace the model: no channel groups can be found."""


def _untraceable_part(model: nn.Module) -> str:
    """The innermost module that torch.fx cannot trace on its own, named for the error."""
    found = f"{type(model).__name__} (the model's own forward)"
    for name, module in model.named_modules():
        if not name or (
            not any(True for _ in module.children())
            and type(module).__module__.startswith("torch.nn")
        ):
            continue
        try:
            fx.symbolic_trace(module)
        except Exception:  # the deepest failing module is listed last
            found = f"module {name} ({type(module).__name__})"
    return found


def find_groups(model: nn.Module, example: torch.Tensor) -> tuple[list[Group], list[str]]:
    """The model's prunable channel groups, and the Conv/Linear layers left whole (besides
    those that make the model's outputs). A model may give its own (``channel_groups()``:
    the MLP neurons of an ``hf:`` transformer)."""
    own = getattr(model, "channel_groups", None)
    if callable(own):
        return own()
    graph = trace(model, example)
    modules = dict(model.named_modules())
    axes = _Axes()
    values: dict[fx.Node, _Value] = {}
    members: dict[int, list[tuple[Member, int]]] = {}  # axis -> (member, its channel count)
    calls: dict[str, int] = {}
    outputs: list[int] = []  # axes of the model's outputs (the logits): left whole silently
    unmanaged: list[str] = []  # Conv/Linear layers outside every group
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":  # a layer's weight used directly: as if called again
            owner = node.target.rpartition(".")[0]
            calls[owner] = calls.get(owner, 0) + 2

    def value(arg: object) -> _Value | None:
        return values.get(arg) if isinstance(arg, fx.Node) else None

    def pin_inputs(node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            if arg in values:
                axes.pin(values[arg].axis)

    def add(axis: int, member: Member, channels: int) -> None:
        members.setdefault(axis, []).append((member, channels))

    for node in graph.graph.nodes:
        meta = node.meta.get("tensor_meta")
        is_tensor = meta is not None and hasattr(meta, "shape")
        first = value(node.args[0]) if node.args else None
        if node.op == "placeholder":
            values[node] = _Value(axes.new(pinned=True))
            continue
        if node.op == "output":
            pin_inputs(node)
            outputs.extend(values[a].axis for a in node.all_input_nodes if a in values)
            continue
        if not is_tensor:
            pin_inputs(node)
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        # a layer called twice would need one index for two axes; a stateless one is fine
        shared = module is not None and calls[node.target] > 1 and _layer_kind(module) != "passes"
        if module is not None and not shared and first is not None:
            kind = _layer_kind(module)
            if kind == "creates" and _channel_dim_ok(node, module):
                made, read = module.weight.shape[:2]  # (groups 1: every input is read)
                add(first.axis, Member(node.target, "in", first.block), read)
                out = axes.new()
                add(out, Member(node.target, "out"), made)
                values[node] = _Value(out)
                continue
            elif kind == "channel" and first.block == 1:
                size = module.num_features if hasattr(module, "num_features") else None
                if isinstance(module, nn.Conv2d):
                    size = module.out_channels
                if size is not None:
                    add(first.axis, Member(node.target, "channel"), size)
                values[node] = first
                continue
            elif kind == "passes" and first.block == 1:
                values[node] = first
                continue
        if node.op in {"call_function", "call_method"} and first is not None and not shared:
            target = node.target
            channel_wise = target in CHANNEL_WISE_FUNCTIONS or target in CHANNEL_WISE_METHODS
            if channel_wise and first.block == 1:
                values[node] = first
                continue
            if target in ELEMENT_WISE:
                operands = [value(a) for a in node.args[:2]]
                tensors = [v for v in operands if v is not None]
                shapes = [a.meta["tensor_meta"].shape for a in node.args[:2] if value(a)]
                if (
                    len(tensors) == 2
                    and shapes[0] == shapes[1]
                    and tensors[0].block == tensors[1].block
                ):
                    axes.join(tensors[0].axis, tensors[1].axis)
                    values[node] = tensors[0]
                    continue
                if len(tensors) == 1:  # a tensor and a number
                    values[node] = tensors[0]
                    continue
        flatten = isinstance(module, nn.Flatten) or (
            node.op in {"call_function", "call_method"} and node.target in FLATTEN
        )
        if flatten and first is not None and _flattens_channels(node, module):
            shape = node.args[0].meta["tensor_meta"].shape
            values[node] = _Value(first.axis, first.block * math.prod(shape[2:]))
            continue
        mean = node.op != "call_module" and node.target in SPATIAL_MEANS
        if mean and first is not None and _spatial_mean(node):
            values[node] = first  # x.mean((2, 3)): global pooling, channels kept
            continue
        pin_inputs(node)
        values[node] = _Value(axes.new(pinned=True))
        if module is not None and _layer_kind(module) == "creates":
            unmanaged.append(node.target)  # shared, or reading a non-channel axis

    groups, left = _collect(axes, members, {axes.find(a) for a in outputs})
    return groups, list(dict.fromkeys([*left, *unmanaged]))


def _collect(
    axes: _Axes, members: dict[int, list[tuple[Member, int]]], outputs: set[int]
) -> tuple[list[Group], list[str]]:
    by_root: dict[int, list[tuple[Member, int]]] = {}
    for axis, items in members.items():
        by_root.setdefault(axes.find(axis), []).extend(items)
    groups, left = [], []
    for root, items in by_root.items():
        producers = [(m, n) for m, n in items if m.role == "out"]
        if not producers:
            continue
        names = [m.module for m, _ in producers]
        if root in axes.pinned:
            if root not in outputs:
                left.extend(names)
            continue
        channels = {n for m, n in items if m.role != "in"}
        blocks_fit = len(channels) == 1 and all(
            n == next(iter(channels)) * m.block for m, n in items if m.role == "in"
        )
        if not blocks_fit:  # e.g. a Linear reading a flatten it does not divide
            left.extend(names)
            continue
        groups.append(Group(channels.pop(), [m for m, _ in items]))
    return groups, left


def _layer_kind(module: nn.Module) -> str:
    """creates (new channels), channel (channel-wise parameters), passes, or other."""
    if isinstance(module, nn.Linear):
        return "creates"
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "creates"
        if module.groups == module.in_channels == module.out_channels:
            return "channel"  # depthwise: channel c in, channel c out
        return "other"
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return "channel"
    if isinstance(module, CHANNEL_WISE):
        return "passes"
    return "other"


def _channel_dim_ok(node: fx.Node, module: nn.Module) -> bool:
    """Conv2d on (N, C, H, W) and Linear on (N, F): the channel axis is dim 1 (a Linear on
    more dimensions reads the last one, which is not a tracked channel axis)."""
    shape = _input_shape(node)
    return len(shape) == (4 if isinstance(module, nn.Conv2d) else 2)


def _input_shape(node: fx.Node) -> torch.Size:
    """The traced shape of the node's first argument (the tensor it reads)."""
    return cast(fx.Node, node.args[0]).meta["tensor_meta"].shape


def _flattens_channels(node: fx.Node, module: nn.Module | None = None) -> bool:
    """flatten(x, 1) of (N, C, ...): channel c becomes a block of prod(...) features."""
    if isinstance(module, nn.Flatten):
        start, end = module.start_dim, module.end_dim
    else:  # torch.flatten(x, start_dim, end_dim): ints in the traced call
        start = cast(int, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        end = cast(int, node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1))
    return start == 1 and end in (-1, len(_input_shape(node)) - 1)


def _spatial_mean(node: fx.Node) -> bool:
    """mean over the spatial axes of (N, C, H, W), without keepdim."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dim,) if isinstance(dim, int) else tuple(cast("Sequence[int] | None", dim) or ())
    rank = len(_input_shape(node))
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return rank == 4 and not keep and sorted(d % rank for d in dims) == [2, 3]
