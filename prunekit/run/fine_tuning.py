"""How a run fine-tunes: whether it distills from the dense model, and augments images."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from prunekit.contract.objectives import returns_embeddings
from prunekit.engine.distill import Distillation, is_image_batch
from prunekit.errors import UsageError
from prunekit.load.data import Splits
from prunekit.run.config import PruneConfig


def distills(config: PruneConfig, labeled: bool) -> bool:
    """Whether training distills from the dense model: asked, or by default where the data
    has no labels (the only signal there). With labels the default is off: on the dev
    ResNet-56 (50 % of the channels, 5 epochs) KL to the dense model (T 4, weight 0.9) ended
    at 81.6 % against 84.2 % with the labels alone: the teacher's own errors on these images
    cap the student, where the labels let it adapt."""
    asked = config.schedule.train.distill
    return asked if asked is not None else not labeled


def fine_tuning(
    config: PruneConfig, model: nn.Module, data: Splits
) -> tuple[Distillation | None, bool, dict[str, Any] | None]:
    """The teacher (a frozen copy of the dense ``model``) and whether images are augmented,
    for the schedule's training; what was chosen, for the report."""
    train = config.schedule.train
    if not config.schedule.trains():
        for flag, value in (("--distill", train.distill), ("--augment", train.augment)):
            if value:
                raise UsageError(
                    f"{flag} applies to fine-tuning, and this run does not train: add "
                    "--finetune-epochs N or --schedule gradual"
                )
        return None, False, None
    sample = data.calibration[0][0]
    images = is_image_batch(tuple(sample.shape), sample.dtype)
    if train.augment and not images:
        raise UsageError(
            f"--augment crops and flips images; {data.spec} holds samples of shape "
            f"{tuple(sample.shape)}: drop --augment"
        )
    augment = images if train.augment is None else train.augment
    distillation = None
    if distills(config, data.labeled):
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        distillation = Distillation(
            teacher, train.temperature, train.distill_weight, returns_embeddings(model)
        )
    record = {
        "distill": distillation is not None,
        "temperature": train.temperature if distillation else None,
        "distill_weight": train.distill_weight if distillation and data.labeled else None,
        "augment": augment,
    }
    return distillation, augment, record
