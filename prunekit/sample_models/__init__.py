"""Sample models shipped with prunekit: weights, cards and the script that trains them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.sample_models.architectures import DigitsCNN, DigitsMLP, DigitsResNet

HERE = Path(__file__).parent


@dataclass(frozen=True)
class SampleModel:
    name: str
    factory: Callable[..., nn.Module]
    data: str

    @property
    def weights(self) -> Path:
        return HERE / f"{self.name}.safetensors"

    @property
    def card_path(self) -> Path:
        return HERE / f"{self.name}.json"

    def card(self) -> dict[str, Any]:
        return json.loads(self.card_path.read_text())


SAMPLES: dict[str, SampleModel] = {
    s.name: s
    for s in (
        SampleModel("digits-mlp", DigitsMLP, "digits"),
        SampleModel("digits-cnn", DigitsCNN, "digits"),
        SampleModel("digits-resnet", DigitsResNet, "digits"),
    )
}
