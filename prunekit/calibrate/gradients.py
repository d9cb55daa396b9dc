"""Per-sample (or per-mini-batch) loss gradients of the target tensors, and the calibration
batches they are taken on.

Two engines give the same rows. ``hooks`` (the default) runs one batched forward and backward
and forms each sample's weight gradient of a Linear or Conv2d layer from what hooks capture:
its input and the loss gradient at its output, the outer product summed over positions (for
a Conv2d, one grouped weight-gradient convolution with the samples as groups): the batched
weight gradient's arithmetic, kept per sample. Layers without such a rule (grouped
convolutions) and any layer whose rows do not add up to the batch gradient autograd computes
in the same pass (a weight also used outside its module's forward; checked on a model's first
chunk) fall back to ``vmap`` (torch.func: vmap over grad), which re-runs the graph per
sample."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.grad import conv2d_weight
from torch.utils.data import Dataset

from prunekit.contract.objectives import LABELS, Objective
from prunekit.contract.target import Target
from prunekit.runtime.batches import eval_mode, loader


def _loss_of_batch(model: nn.Module, frozen: dict[str, torch.Tensor], objective: Objective):
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, {**frozen, **params}, (x,))
        return objective.loss(outputs, y)

    return loss


def _vmap_ready(model: nn.Module) -> AbstractContextManager[Any]:
    """The model's own context for vmapped gradients, where it has one (``hf:`` models)."""
    mode = getattr(model, "per_sample_mode", None)
    return mode() if callable(mode) else nullcontext()


def per_sample_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int = 1,
    objective: Objective = LABELS,
    engine: str = "hooks",
) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss of each mini-batch of ``grad_batch`` samples; ``y`` holds
    the objective's targets (labels, or targets drawn by ``Objective.targets``).

    Returns, per target, a (len(x) // grad_batch, numel) matrix with pruned entries zeroed.
    ``engine`` "hooks" takes the layers it has a rule for from one batched backward and the
    rest from vmap; "vmap" takes them all from vmap.
    """
    n = len(x) // grad_batch
    if n == 0:  # fewer samples than one mini-batch: no rows
        return {t.name: t.weight.new_zeros(0, t.numel) for t in targets}
    grads: dict[str, torch.Tensor] = {}
    if engine == "hooks":
        grads = hook_gradients(model, targets, x, y, grad_batch, objective)
    rest = [t for t in targets if t.name not in grads]
    if rest:
        grads.update(vmap_gradients(model, rest, x, y, grad_batch, objective))
    return {t.name: grads[t.name].mul_(t.mask.reshape(1, -1)) for t in targets}


def vmap_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int,
    objective: Objective,
) -> dict[str, torch.Tensor]:
    """Per-mini-batch gradients by vmap over grad (every layer type; re-runs the graph)."""
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update(dict(model.named_buffers()))
    params = {t.name: frozen[t.name] for t in targets}
    n = len(x) // grad_batch
    xs = x[: n * grad_batch].reshape(n, grad_batch, *x.shape[1:])
    ys = y[: n * grad_batch].reshape(n, grad_batch, *y.shape[1:])
    loss = _loss_of_batch(model, frozen, objective)
    with _vmap_ready(model):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    return {t.name: grads[t.name].reshape(n, -1) for t in targets}


def has_hook_rule(target: Target) -> bool:
    """Whether a target's per-sample gradient can be formed from its module's input and
    output gradient: the ``weight`` of a Linear, or of an ungrouped, zero-padded Conv2d."""
    return no_hook_rule(target) is None


def no_hook_rule(target: Target) -> str | None:
    """Why a target has no hook rule (its gradients come from vmap), or None."""
    module = target.module
    if getattr(module, "weight", None) is not target.weight:
        return "not its layer's weight"
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"no rule for {type(module).__name__}"
    if module.groups != 1:
        return "grouped convolution"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"padding {module.padding_mode}={module.padding!r}"
    return None


def engine_note(targets: Sequence[Target], engine: str) -> str:
    """One line for --verbose: which targets take their per-sample gradients from hooks and
    which from vmap, and why."""
    if engine == "vmap":
        return f"per-sample gradients: vmap for all {len(targets)} targets (grad_engine=vmap)"
    reasons = {t.name: no_hook_rule(t) for t in targets}
    left = [f"{name} ({why})" for name, why in reasons.items() if why]
    line = f"per-sample gradients: hooks for {len(targets) - len(left)} of {len(targets)} targets"
    return f"{line}; vmap for {', '.join(left)}" if left else line


def fallbacks(model: nn.Module) -> dict[str, str]:
    """The targets with a hook rule that the hooks left to vmap in ``model``, and why."""
    return dict(_FALLBACKS.get(model, {}))


def hook_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int,
    objective: Objective,
) -> dict[str, torch.Tensor]:
    """Per-mini-batch gradients of the targets that have a hook rule, from one batched
    forward and backward in eval mode (unmasked rows). A target is left to vmap when a call
    does not take the batch along its first dimension (a sequence-first layer, flattened
    tokens, an input given by keyword), or when, on the first chunk a model is seen with, its
    rows do not sum to autograd's batch gradient or its first row differs from vmap's (a weight
    also used outside its module's forward, say)."""
    ruled = [t for t in targets if has_hook_rule(t)]
    by_name = {t.name: t for t in ruled}
    n = len(x) // grad_batch
    if not ruled or n == 0:
        return {}
    x, y = x[: n * grad_batch], y[: n * grad_batch]
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in ruled}
    unusable: set[str] = set()

    def recorder(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict, output: Any) -> None:
            first = args[0] if args else kwargs.get("input")
            if (
                not isinstance(first, torch.Tensor)
                or not isinstance(output, torch.Tensor)
                or first.shape[0] != len(x)
                or output.shape[0] != len(x)
            ):
                unusable.add(name)
                left[name] = "not batched along its first dimension"
                return
            calls[name].append((first.detach(), output))

        return record

    checked = _CHECKED.setdefault(model, {})
    left = _FALLBACKS.setdefault(model, {})
    unchecked = [t for t in ruled if _key(t) not in checked]  # verified once per model
    handles = [t.module.register_forward_hook(recorder(t.name), with_kwargs=True) for t in ruled]
    wanted = [t.weight.requires_grad for t in ruled]
    try:
        for t in ruled:
            t.weight.requires_grad_(True)
        with torch.enable_grad(), eval_mode(model):
            # the sum over mini-batches of each one's mean loss: per-sample terms stay apart
            loss = objective.loss(model(x), y) * n
            kept = [t for t in ruled if t.name not in unusable and calls[t.name]]
            outputs = [out for t in kept for _, out in calls[t.name]]
            found = torch.autograd.grad(
                loss, [*outputs, *(t.weight for t in unchecked)], allow_unused=True
            )
    finally:
        for handle in handles:
            handle.remove()
        for t, flag in zip(ruled, wanted, strict=True):
            t.weight.requires_grad_(flag)
    output_grads = iter(found[: len(outputs)])
    batch_grads = dict(zip((t.name for t in unchecked), found[len(outputs) :], strict=True))
    rows: dict[str, torch.Tensor] = {}
    for t in kept:
        total = None
        for activation, _ in calls[t.name]:
            g = next(output_grads)
            if g is not None:
                part = _layer_rows(t.module, activation, g, grad_batch)
                total = part if total is None else total + part
        if total is not None:
            rows[t.name] = total
    fresh = [t for t in unchecked if t.name in rows]
    checked.update(_verdicts(model, fresh, rows, batch_grads, x, y, grad_batch, objective))
    for t in fresh:
        if not checked[_key(t)]:
            left[t.name] = "rows differ from autograd's (its weight used outside its forward?)"
    return {name: r for name, r in rows.items() if checked.get(_key(by_name[name]))}


def _key(target: Target) -> tuple[Any, ...]:
    """What a verdict holds for: the target's module and weight as they are now."""
    return target.name, id(target.module), id(target.weight), tuple(target.weight.shape)


def _verdicts(
    model: nn.Module,
    targets: Sequence[Target],
    rows: dict[str, torch.Tensor],
    batch_grads: Mapping[str, torch.Tensor | None],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int,
    objective: Objective,
) -> dict[tuple[Any, ...], bool]:
    """Per target: its rows sum to autograd's batch gradient and the first equals vmap's
    first row (one vmap over the first mini-batch for all the targets)."""
    verdicts = {_key(t): False for t in targets}
    summed = [t for t in targets if _adds_up(rows[t.name].sum(0), batch_grads[t.name])]
    if summed:
        with eval_mode(model):
            first = vmap_gradients(model, summed, x[:grad_batch], y[:grad_batch], grad_batch,
                                   objective)  # fmt: skip
        for t in summed:
            verdicts[_key(t)] = _adds_up(rows[t.name][0], first[t.name][0])
    return verdicts


# per model: whether each target's hook rows are right (checked on the first chunk a model is
# seen with, and again when the target's module or weight is replaced)
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], bool]] = (
    weakref.WeakKeyDictionary()
)
# per model: the targets with a hook rule left to vmap, and why
_FALLBACKS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def _layer_rows(
    module: nn.Module, activation: torch.Tensor, g: torch.Tensor, grad_batch: int
) -> torch.Tensor:
    """(n, numel) weight gradients of each mini-batch of ``grad_batch`` samples of a Linear or
    Conv2d call."""
    samples = len(activation)
    n = samples // grad_batch
    if isinstance(module, nn.Conv2d):
        # the samples as groups of one convolution's weight gradient: input (1, N·C, H, W),
        # output gradient (1, N·O, H', W') -> (N·O, C, kh, kw), one weight per sample
        padding = cast(tuple[int, ...], module.padding)  # (has_hook_rule: not a string)
        per = conv2d_weight(
            activation.reshape(1, -1, *activation.shape[2:]),
            (samples * module.out_channels, module.in_channels, *module.kernel_size),
            g.reshape(1, -1, *g.shape[2:]),
            module.stride, padding, module.dilation, groups=samples,
        )  # fmt: skip
        per = per.reshape(n, grad_batch, -1)
        return per[:, 0] if grad_batch == 1 else per.sum(1)
    # Linear over any leading dimensions, a mini-batch's samples summed in the same product
    a = activation.reshape(n, -1, activation.shape[-1])
    return torch.bmm(g.reshape(n, -1, g.shape[-1]).transpose(1, 2), a).reshape(n, -1)


def _adds_up(summed: torch.Tensor, batch: torch.Tensor | None) -> bool:
    """The rows' sum equals autograd's batch gradient up to float rounding."""
    if batch is None:
        return False
    batch = batch.reshape(-1)
    scale = batch.abs().max().clamp_min(torch.finfo(batch.dtype).tiny)
    tolerance = 1e-2 if batch.dtype in (torch.float16, torch.bfloat16) else 1e-3
    return bool(((summed - batch).abs().max() / scale) <= tolerance)


def calibration_batches(
    model: nn.Module,
    calibration: Dataset,
    wanted: int,
    batch_size: int,
    objective: Objective,
    device: torch.device,
    seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``wanted`` calibration samples on ``device``, in batches, with the
    objective's targets: the labels, or targets drawn (seeded) around the model's outputs.
    """
    generator = torch.Generator(device).manual_seed(seed)
    taken = 0
    if wanted <= 0:
        return
    for x, y in loader(calibration, batch_size):
        x, y = x[: wanted - taken].to(device), y[: wanted - taken].to(device)
        if objective.sampled:
            with torch.no_grad():
                y = objective.targets(model(x), y, generator)
        yield x, y
        taken += len(x)
        if taken >= wanted:
            return
