"""The shipped sample models: small, carded, and reproducing their card accuracy."""

import pytest
import torch

from prunekit.data import load_data
from prunekit.evaluate import accuracy
from prunekit.models import load_model
from prunekit.sample_models import SAMPLES


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_card_accuracy_reproduces(name):
    sample = SAMPLES[name]
    card = sample.card()
    loaded = load_model(f"sample:{name}")
    data = load_data(card["data"])
    assert accuracy(loaded.model, data.test, torch.device("cpu")) == card["test_accuracy"]
    assert card["test_accuracy"] > 0.95
    assert sum(p.numel() for p in loaded.model.parameters()) == card["parameters"]
    assert card["split"]["test"] == len(data.test)
    assert sample.weights.stat().st_size < 5 * 2**20
    assert card["command"].startswith("python -m prunekit.sample_models.train")


def test_resnet_has_batchnorm_and_residuals():
    model = load_model("sample:digits-resnet").model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(model.layer2.shortcut) == 2  # projection shortcut where the shape changes
