import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def builtin_plugins_only(monkeypatch):
    """Tests see prunekit's own pruners only, whatever else is installed."""
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "")


@pytest.fixture
def hand_model() -> nn.Module:
    """Linear(3->2) and Linear(2->1) with weights chosen so masks can be worked out by hand."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -4.0, 1.0], [-2.0, 0.1, 3.0]]))
        model[2].weight.copy_(torch.tensor([[0.2, -6.0]]))
    return model
