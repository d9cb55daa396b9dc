"""Structured pruning (``--structure channels``): whole channels chosen per dependency group.

A channel's score is the sum of the pruner's per-weight scores over every weight removed with
it (the producing rows, the reading columns): the L1 norm of the group for magnitude, the summed
Fisher or Taylor saliency for the Fisher-Taylor criteria; pruners may score a whole channel
themselves (``Pruner.set_scores``: woodfisher's group OBS). The chosen channels become
weight masks (``channel_surgery.group_masks``), so statistics, OBS updates and masked
fine-tuning work as for unstructured masks; at the end the model is shrunk to new shapes.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.contract.pruner import Pruner, guarded
from prunekit.contract.target import Target
from prunekit.errors import InputFileError, UsageError
from prunekit.structured.groups import Group, find_groups
from prunekit.structured.surgery import group_masks, shrink

STRUCTURES = ("channels", "channels-or-weights")  # the second: unstructured if untraceable


@dataclass
class ChannelPlan:
    """The prunable groups of a model, the channels kept in each, and the minimum kept."""

    model: nn.Module
    example: torch.Tensor  # one input, for tracing and counting FLOPs
    groups: list[Group]
    left: list[str]  # Conv/Linear layers whose channels stay
    min_channels: int = 1
    multiple: int = 1  # kept channels rounded up to a multiple of this (fast kernels)
    kept: list[torch.Tensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> channel scores

    @classmethod
    def of(
        cls,
        model: nn.Module,
        example: torch.Tensor,
        targets: Sequence[Target],
        min_channels: int = 1,
        multiple: int = 1,
    ) -> ChannelPlan:
        groups, left = find_groups(model, example)
        names = {t.name for t in targets}
        usable = []
        for g in groups:
            excluded = [
                m.module
                for m in g.members
                if m.role in ("out", "in") and f"{m.module}.weight" not in names
            ]
            if excluded:  # part of the group is excluded: all of it stays
                left.extend(g.names("out"))
            else:
                usable.append(g)
        if not usable:
            raise UsageError(
                "no channel group of this model can be removed safely (every Conv/Linear feeds "
                "the output, a reshape or a concatenation); prune it without --structure"
            )
        if all(g.channels <= max(multiple, min_channels) for g in usable):
            raise UsageError(
                f"--channel-multiple {multiple} / --min-channels {min_channels}: every prunable "
                f"group has at most that many channels (the widest: "
                f"{max(g.channels for g in usable)}), so none could be removed; use a smaller "
                "value (8 suits ONNX Runtime)"
            )
        plan = cls(model, example, usable, left, min_channels, multiple)
        plan.reset()
        return plan

    def reset(self) -> None:
        """Every channel kept (a new plan, or pbt's re-initialised model)."""
        self.kept = [torch.arange(g.channels) for g in self.groups]

    def channels(self) -> int:
        return sum(g.channels for g in self.groups)

    def removed_fraction(self) -> float:
        return 1.0 - sum(len(k) for k in self.kept) / self.channels()

    def add_scores(self, target: Target, pruner: Pruner, stats: Mapping[str, torch.Tensor]) -> None:
        """Add ``target``'s share of every channel score: the pruner's score of the set of
        its weights removed with the channel (rows it makes, columns that read it)."""
        for index, sets, channels in self._sets(target, pruner.channel_sides):
            with guarded(pruner, "set_scores", target.weight):
                score = pruner.set_scores(target, stats, sets.to(target.weight.device))
            if score is not None:
                total = self.scores.setdefault(
                    index, torch.zeros(self.groups[index].channels, dtype=torch.float64)
                )
                total.index_add_(0, channels, score.detach().double().cpu())

    def _sets(
        self, target: Target, sides: frozenset[str]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(group, the target's weights removed with each of its channels in the group,
        the group channel of each)."""
        module = target.name.rsplit(".", 1)[0] if "." in target.name else ""
        shape = target.weight.shape
        found = []
        for index, g in enumerate(self.groups):
            for m in g.members:
                if m.module != module or m.role not in sides:
                    continue
                channels = torch.arange(g.channels) if m.index is None else torch.tensor(m.index)
                sets = channel_sets(shape, len(channels), m.role, m.block)
                found.append((index, sets, channels))
        return found

    def select(self, fraction: float, mode: str) -> dict[str, torch.Tensor]:
        """Keep-masks of the targets after removing ``fraction`` of all channels by the
        scores added since the last selection (global: one threshold on the channel scores;
        layer: the same fraction of every group)."""
        modules = dict(self.model.named_modules())
        channel_scores = []
        for index, (g, kept) in enumerate(zip(self.groups, self.kept, strict=True)):
            score = self.scores.get(index, torch.zeros(g.channels, dtype=torch.float64))
            removed = torch.ones(g.channels, dtype=torch.bool)
            removed[kept] = False  # removed channels stay removed
            channel_scores.append(score.masked_fill(removed, float("-inf")))
        self.scores = {}
        self.warnings = []  # the last selection's: each sub-step would repeat them
        wanted = [self._kept_count(g, fraction) for g in self.groups]
        widths = [_widths(g) for g in self.groups]
        if mode == "global":
            total = self.channels() - round(fraction * self.channels())
            wanted = self._global_counts(channel_scores, total)
            mapped = [str(g) for g, w in zip(self.groups, widths, strict=True) if len(w) > 1]
            if mapped:
                self.warnings.append(
                    f"--mask global ranks the channels of {mapped[0][:60]}... (a group across "
                    "several widths) by scores summed over every width, so its narrow widths "
                    "are rarely pruned; --mask layer removes the fraction from each width"
                )
        masks: dict[str, torch.Tensor] = {}
        for i, (g, s) in enumerate(zip(self.groups, channel_scores, strict=True)):
            count = self._rounded(g.channels, wanted[i])
            if count > -(-wanted[i] // self.multiple) * self.multiple:
                self.warnings.append(
                    f"{g}: kept {count} of {g.channels} channels (--min-channels), not {wanted[i]}"
                )
            if mode == "layer" and len(widths[i]) > 1:
                keep = _each_width_kept(widths[i], s, fraction, self._rounded)
            else:
                keep = torch.argsort(s, descending=True, stable=True)[:count].sort()[0]
            keep = self._fit_members(widths[i], keep, s)
            self.kept[i] = keep
            for name, mask in group_masks(modules, g, keep).items():
                masks[name] = masks[name] & mask if name in masks else mask
        return masks

    def _rounded(self, channels: int, wanted: int) -> int:
        """``wanted`` rounded up to the multiple, at least --min-channels, at most all."""
        rounded = min(channels, -(-wanted // self.multiple) * self.multiple)
        return max(rounded, min(self.min_channels, channels))

    def _fit_members(
        self, widths: list[torch.Tensor], keep: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """``keep`` grown so that every width of a mapped group (``_widths``: a residual
        stream's 16, 32 and 64 channels) keeps a rounded count of its channels, narrowest
        first, each grown from the best-scored channels it adds to the narrower ones (so
        their counts stay)."""
        if len(widths) == 1:
            return keep
        kept = torch.zeros(len(widths[-1]), dtype=torch.bool)
        kept[keep] = True
        narrower = torch.zeros(len(widths[-1]), dtype=torch.bool)
        for held in widths:
            count = int(kept[held].sum())
            owed = self._rounded(len(held), count) - count
            for pool in (held[~kept[held] & ~narrower[held]], held[~kept[held]]):
                if owed > 0:  # its own channels first; a narrower width's only if it must
                    best = pool[torch.argsort(scores[pool], descending=True, stable=True)]
                    kept[best[:owed]] = True
                    owed -= len(best[:owed])
            narrower[held] = True
        return kept.nonzero().flatten()

    def _kept_count(self, g: Group, fraction: float) -> int:
        return g.channels - math.floor(fraction * g.channels + 1e-9)

    def _global_counts(self, channel_scores: list[torch.Tensor], total: int) -> list[int]:
        flat = torch.cat(channel_scores)
        order = torch.argsort(flat, descending=True, stable=True)[:total]
        owner = torch.repeat_interleave(
            torch.arange(len(channel_scores)), torch.tensor([len(s) for s in channel_scores])
        )
        return torch.bincount(owner[order], minlength=len(channel_scores)).tolist()

    @torch.no_grad()
    def shrink(self) -> dict[str, list[int]]:
        """Cut the removed channels out of the model (new shapes); the kept channels of each
        group by its producing layers, as recorded in the files."""
        modules = dict(self.model.named_modules())
        record = {}
        for g, keep in zip(self.groups, self.kept, strict=True):
            record[str(g)] = keep.tolist()
            shrink(modules, g, keep)
        return record


def _widths(g: Group) -> list[torch.Tensor]:
    """The group channels each width of a mapped group holds, narrowest first, the whole
    group last (one entry for a group without maps)."""
    held = {m.index for m in g.members if m.index is not None}
    distinct = {tuple(sorted(set(index))) for index in held} - {tuple(range(g.channels))}
    return [*(torch.tensor(w) for w in sorted(distinct, key=len)), torch.arange(g.channels)]


def _each_width_kept(
    widths: list[torch.Tensor],
    scores: torch.Tensor,
    fraction: float,
    rounded: Callable[[int, int], int],
) -> torch.Tensor:
    """The kept channels of a mapped group with ``fraction`` removed from each of its widths
    (``_widths``: a residual stream's 16, 32 and 64 channels; each kept count rounded by
    ``rounded``), narrowest first: a channel removed from a narrow width is gone from the
    wider ones too, and each wider width removes what it still owes from the channels it
    adds, so the kept counts of the narrower ones stay as rounded. (One cut over the whole
    group would spare the narrow widths, whose channels are read by more layers and so score
    higher.)"""
    removed = torch.zeros(len(widths[-1]), dtype=torch.bool)
    narrower = torch.zeros(len(widths[-1]), dtype=torch.bool)
    for held in widths:
        wanted = len(held) - math.floor(fraction * len(held) + 1e-9)
        owed = len(held) - rounded(len(held), wanted) - int(removed[held].sum())
        open_ = held[~removed[held] & ~narrower[held]]
        if owed > 0:
            removed[open_[torch.argsort(scores[open_], stable=True)[:owed]]] = True
        narrower[held] = True
    return (~removed).nonzero().flatten()


def channel_sets(shape: torch.Size, channels: int, role: str, block: int) -> torch.Tensor:
    """(channels, k) flat indices into a weight of ``shape``: the rows that make each
    channel ("out"), or the input columns that read it ("in", ``block`` features each)."""
    numel = math.prod(shape)
    if role == "out":
        per = numel // channels
        return torch.arange(channels)[:, None] * per + torch.arange(per)
    outputs, inputs = shape[0], shape[1]
    rest = numel // (outputs * inputs)  # kernel positions per (output, input) pair
    o = torch.arange(outputs)[:, None, None]
    j = torch.arange(block)[None, :, None]
    r = torch.arange(rest)[None, None, :]
    within = (o * inputs * rest + j * rest + r).reshape(-1)  # channel 0's indices
    return torch.arange(channels)[:, None] * (block * rest) + within


def reapply(
    model: nn.Module, example: torch.Tensor, record: Mapping[str, list[int]], source: str
) -> None:
    """Shrink a freshly built model as a saved structured run was shrunk (before its state
    dict is loaded); a record that does not fit the model's groups is refused."""
    try:  # (torch.fx's shape propagation prints a traceback of its own before raising)
        with contextlib.redirect_stderr(io.StringIO()):
            groups, _ = find_groups(model, example)
    except Exception as exc:  # the recorded input shape does not fit the model (fx, shapes)
        first = (str(exc).splitlines() or [""])[0][:100]
        raise InputFileError(
            f"{source}: the model cannot be traced with its structure record's input shape "
            f"{list(example.shape[1:])} ({type(exc).__name__}: {first}); re-export the weights "
            "(or load them with the architecture they were pruned from)"
        ) from None
    by_name = {str(g): g for g in groups}
    missing = sorted(set(record) - set(by_name))
    if missing:
        raise UsageError(
            f"{source} removes channels of {', '.join(missing[:3])}, which this model does not "
            "have as a channel group; load it with the architecture it was pruned from"
        )
    for name, keep in record.items():
        channels = by_name[name].channels
        if keep[-1] >= channels:  # (kept channels are strictly increasing)
            raise InputFileError(
                f"{source}: its structure record keeps channel {keep[-1]} of {name}, which has "
                f"{channels}; re-export the weights (or load them with the architecture they "
                "were pruned from)"
            )
    modules = dict(model.named_modules())
    for name, keep in record.items():
        shrink(modules, by_name[name], torch.tensor(keep, dtype=torch.long))


def composed(
    before: Mapping[str, list[int]] | None, now: Mapping[str, list[int]] | None
) -> dict[str, list[int]]:
    """The channels of the original architecture that two structured cuts kept: ``now``
    numbers the channels that ``before`` kept (a group cut only once keeps its record)."""
    kept = {name: list(channels) for name, channels in (before or {}).items()}
    for name, channels in (now or {}).items():
        base = kept.get(name)
        kept[name] = [base[i] for i in channels] if base is not None else list(channels)
    return kept
