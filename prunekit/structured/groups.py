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

Two kinds of node relate the channels of different axes one by one (a *channel map*):
concatenation along channels (output channel ``offset + j`` is channel ``j`` of an input) and a
module that says which input channel each of its output channels carries (``channel_map``:
the option-A shortcut of CIFAR ResNets, which zero-pads the residual stream to more channels).
Mapped channels are one channel of the group: the whole residual stream of a CIFAR ResNet,
across its three widths, is one group whose members each hold a subset of its channels
(``Member.index``). Anything else (reshape, padding, indexing, a module called twice, the
model's input and output) pins the axes it touches: their channels cannot be removed, and the
layers there stay as they are.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

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
CONCATENATE = {torch.cat, torch.concat}
SPATIAL_MEANS = {torch.mean, "mean"}


@runtime_checkable
class ChannelMapping(Protocol):
    """A module whose output channels are some of its input channels, moved, or new zero
    channels (the option-A shortcut). Traced as one node; structured pruning keeps it in step
    with the channels kept around it."""

    def channel_map(self, inputs: int) -> torch.Tensor:
        """For each output channel, the input channel it carries, or -1 (a new channel)."""
        ...

    def keep_channels(self, kept_inputs: torch.Tensor, kept_outputs: torch.Tensor) -> None:
        """Carry only ``kept_inputs`` (sorted) and make only ``kept_outputs`` from now on."""
        ...


@dataclass
class Member:
    """One layer's share of a group: which of its tensors lose the group's channels."""

    module: str  # dotted module name
    role: str  # "out" (rows), "channel" (BN / depthwise), "in" (columns), "map" (ChannelMapping)
    block: int = 1  # "in" after a flatten: input features per channel
    # the group channel of each of the member's channels (None: the same index; a member of a
    # mapped group holds a subset); a "map" member's outputs here, its inputs in ``source``
    index: tuple[int, ...] | None = None
    source: tuple[int, ...] | None = None


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
class _Map:
    """Channels of axis ``source`` carried into axis ``target`` (``carried[j]``: the source
    channel in target channel j, or -1), by a mapping module or a concatenation."""

    source: int
    target: int
    carried: list[int]
    module: str | None = None  # the ChannelMapping module, or None (a concatenation)


@dataclass
class _Value:
    axis: int
    block: int = 1  # features per channel (after a flatten)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model's graph with shapes, or an error naming what could not be traced."""
    # traced in eval mode, as it is pruned and loaded: `if self.training` branches agree
    with eval_mode(model):
        try:
            graph = fx.GraphModule(model, _Tracer().trace(model))
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


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with channel-mapping modules kept as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelMapping) or super().is_leaf_module(m, module_qualified_name)


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
            _Tracer().trace(module)
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
    maps: list[_Map] = []
    sizes: dict[int, int] = {}  # channels of the axes that maps touch
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
        if isinstance(module, ChannelMapping) and not shared and first is not None:
            mapped = _mapping(module, node, first)
            if mapped is not None:
                out = axes.new()
                maps.append(_Map(first.axis, out, mapped, node.target))
                sizes[first.axis], sizes[out] = _input_shape(node)[1], len(mapped)
                values[node] = _Value(out)
                continue
        if node.op == "call_function" and node.target in CONCATENATE:
            parts = _concatenated(node, values)
            if parts:
                out, offset, total = axes.new(), 0, node.meta["tensor_meta"].shape[1]
                for part, count in parts:
                    carried = [-1] * total
                    carried[offset : offset + count] = range(count)
                    maps.append(_Map(part, out, carried))
                    sizes[part], offset = count, offset + count
                sizes[out] = total
                values[node] = _Value(out)
                continue
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

    groups, left = _collect(axes, members, {axes.find(a) for a in outputs}, maps, sizes)
    return groups, list(dict.fromkeys([*left, *unmanaged]))


def _mapping(module: ChannelMapping, node: fx.Node, first: _Value) -> list[int] | None:
    """The module's channel map, if it maps channel axis 1 of a tensor of the same rank."""
    shape, out = _input_shape(node), node.meta["tensor_meta"].shape
    if first.block != 1 or len(shape) < 2 or len(out) != len(shape):
        return None
    carried = [int(c) for c in module.channel_map(shape[1]).tolist()]
    real = [c for c in carried if c != -1]
    fits = len(carried) == out[1] and all(0 <= c < shape[1] for c in real)
    return carried if fits and len(set(real)) == len(real) else None


def _concatenated(node: fx.Node, values: dict[fx.Node, _Value]) -> list[tuple[int, int]]:
    """(axis, channels) of each part of a concatenation along channels, or [] for any other."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, list | tuple) or not isinstance(dim, int):
        return []
    found = []
    for part in parts:
        meta = part.meta.get("tensor_meta") if isinstance(part, fx.Node) else None
        shape = getattr(meta, "shape", None)
        if part not in values or shape is None or len(shape) < 2 or dim % len(shape) != 1:
            return []
        if values[part].block != 1:
            return []
        found.append((values[part].axis, shape[1]))
    return found


def _collect(
    axes: _Axes,
    members: dict[int, list[tuple[Member, int]]],
    outputs: set[int],
    maps: list[_Map],
    sizes: dict[int, int],
) -> tuple[list[Group], list[str]]:
    """Groups: the axes joined by maps, one group channel per set of mapped channels."""
    by_root: dict[int, list[tuple[Member, int]]] = {}
    for axis, items in members.items():
        by_root.setdefault(axes.find(axis), []).extend(items)
    components = _Axes()  # over roots: the maps join axes into one group
    node_of: dict[int, int] = {}
    for root in [*by_root, *(axes.find(a) for m in maps for a in (m.source, m.target))]:
        node_of.setdefault(root, components.new(pinned=root in axes.pinned))
    for m in maps:
        components.join(node_of[axes.find(m.source)], node_of[axes.find(m.target)])
    roots_of: dict[int, list[int]] = {}
    for root, node in node_of.items():
        roots_of.setdefault(components.find(node), []).append(root)
    root_size = {axes.find(a): n for a, n in sizes.items()}
    groups, left = [], []
    for component, roots in roots_of.items():
        items = [item for r in roots for item in by_root.get(r, [])]
        names = [m.module for m, _ in items if m.role == "out"]
        if not names:
            continue
        if components.find(component) in components.pinned:
            if not any(r in outputs for r in roots):
                left.extend(names)
            continue
        size = {r: _channels_of(by_root.get(r, []), root_size.get(r)) for r in roots}
        if any(n is None for n in size.values()):  # e.g. a Linear reading a flatten it does
            left.extend(names)  # not divide, or a map of another width than its neighbours
            continue
        sized = cast(dict[int, int], size)
        group_maps = [m for m in maps if axes.find(m.target) in sized]
        classes, channels = _channel_classes(sized, group_maps, axes)
        members_ = []
        for r in roots:
            for member, _ in by_root.get(r, []):
                members_.append(_indexed(member, classes[r], channels))
        for m in group_maps:
            target, source = classes[axes.find(m.target)], classes[axes.find(m.source)]
            if m.module is not None:
                members_.append(Member(m.module, "map", index=target, source=source))
        groups.append(Group(channels, members_))
    return groups, left


def _channels_of(items: list[tuple[Member, int]], known: int | None) -> int | None:
    """The channels of one axis, or None where its members disagree."""
    channels = {n for m, n in items if m.role != "in"} | ({known} if known else set())
    if len(channels) != 1:
        return None
    count = channels.pop()
    return count if all(n == count * m.block for m, n in items if m.role == "in") else None


def _channel_classes(
    size: dict[int, int], maps: list[_Map], axes: _Axes
) -> tuple[dict[int, tuple[int, ...]], int]:
    """Per axis, the group channel of each of its channels (mapped channels share one), and
    the number of group channels, numbered along the widest axis first."""
    order = sorted(size, key=lambda r: -size[r])  # stable: the first widest leads
    start = dict(zip(order, [0, *itertools.accumulate(size[r] for r in order)], strict=False))
    channels = _Axes()
    for _ in range(sum(size.values())):
        channels.new()
    for m in maps:
        target, source = start[axes.find(m.target)], start[axes.find(m.source)]
        for j, c in enumerate(m.carried):
            if c != -1:
                channels.join(target + j, source + c)
    number: dict[int, int] = {}
    classes = {}
    for r in order:
        found = [channels.find(start[r] + c) for c in range(size[r])]
        classes[r] = tuple(number.setdefault(f, len(number)) for f in found)
    return classes, len(number)


def _indexed(member: Member, index: tuple[int, ...], channels: int) -> Member:
    """The member with its channels' group channels (None where they are 0..channels-1)."""
    identity = len(index) == channels and index == tuple(range(channels))
    return Member(member.module, member.role, member.block, None if identity else index)


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
