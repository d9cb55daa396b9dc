"""Sample models shipped with prunekit: their architectures here; weights, cards and the
script that trains them in the project's top-level ``sample_models/`` folder, which the wheel
carries as ``prunekit/load/sample_models/files/``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.load.sample_models.architectures import DigitsCNN, DigitsMLP, DigitsResNet

HERE = Path(__file__).parent


def _files() -> Path:
    packaged = HERE / "files"  # a wheel install
    return packaged if packaged.is_dir() else HERE.parents[2] / "sample_models"  # source tree


FILES = _files()


@dataclass(frozen=True)
class SampleModel:
    name: str
    factory: Callable[..., nn.Module]
    data: str

    @property
    def weights(self) -> Path:
        return FILES / f"{self.name}.safetensors"

    @property
    def card_path(self) -> Path:
        return FILES / f"{self.name}.json"

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
