"""Accuracy of a classifier on a dataset split, a decoder's perplexity, and a model's outputs
on one."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.errors import ModelMismatchError, UsageError
from prunekit.runtime.batches import eval_mode, loader


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256
) -> float:
    """Top-1 accuracy in eval mode, in [0, 1]."""
    correct = total = 0
    with eval_mode(model):
        for x, y in loader(dataset, batch_size):
            try:
                logits = model(x.to(device))
            except RuntimeError as exc:
                raise ModelMismatchError(
                    f"the model cannot take inputs of shape {tuple(x.shape[1:])} from the data "
                    f"({str(exc).splitlines()[0]}); pick --data that matches the architecture"
                ) from exc
            correct += int((logits.argmax(1) == y.to(device)).sum())
            total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def outputs_on(model: nn.Module, dataset: Dataset, device: torch.device) -> torch.Tensor:
    """The model's outputs on a split (eval mode; the mode is restored), on the CPU. For a
    decoder's (N, L, V) logits: the next-token logits after each text's last token."""
    with eval_mode(model):
        outs = [final_token(model(x.to(device)), x).float().cpu() for x, _ in loader(dataset, 64)]
    return torch.cat(outs)


def final_token(outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at each text's last real token of a decoder's (N, L, V) outputs (x packs
    ids and attention mask as (N, 2, L)); other outputs as they are."""
    if outputs.dim() != 3:
        return outputs
    mask = x[:, 1].to(outputs.device)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last 1 of the mask
    return outputs[torch.arange(len(outputs), device=outputs.device), last]


@torch.no_grad()
def perplexity(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 16
) -> float:
    """exp of the mean next-token negative log-likelihood over every real (unpadded) token
    that has one before it, on texts packed as (N, 2, L) ids + attention mask."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, _ in loader(dataset, batch_size):
            x = x.to(device)
            logits = model(x)
            if logits.dim() != 3 or x.dim() != 3:
                raise UsageError(
                    f"perplexity needs a causal language model's (batch, length, vocabulary) "
                    f"logits on token ids; this model returns {tuple(logits.shape)}: measure "
                    "accuracy or the cosine to the dense outputs instead"
                )
            total += float(token_nll(logits, x).sum())
            count += int(x[:, 1, 1:].bool().sum())
    if count == 0:
        raise UsageError(
            "perplexity needs texts of at least two tokens (a token to predict and one before "
            "it); the held-out text has none: give longer texts"
        )
    return math.exp(total / count)


def token_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The next-token negative log-likelihoods of the real tokens (flat)."""
    ids, mask = x[:, 0], x[:, 1].bool()
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[mask[:, 1:]]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two (N, K) outputs, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def cosine_fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Mean and 5th percentile of the per-sample cosine similarity to the dense outputs
    (what unlabeled data can say about a pruned model, e.g. sentence embeddings)."""
    cosine = cosines(pruned, dense)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_p5": float(torch.quantile(cosine, 0.05)),
    }
