import sys

import pytest
import torch
from torch import nn

from prunekit.errors import InputFileError, UnknownNameError
from prunekit.models import build, load_model, read_state_dict


def test_torchvision_architecture():
    model, weights = build("torchvision:resnet18", num_classes=10)
    assert model.fc.out_features == 10 and weights is None
    with pytest.raises(UnknownNameError, match="did you mean resnet18"):
        build("torchvision:resnet81")


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=3):\n    return nn.Linear(4, num_classes)\n"
        "def not_a_model():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    model, _ = build("my_models:tiny", num_classes=5)
    assert model.out_features == 5
    with pytest.raises(UnknownNameError, match="cannot import model factory"):
        build("my_models:missing")
    with pytest.raises(Exception, match="returned int, not a Module"):
        build("my_models:not_a_model")


def test_checkpoint_wrappers_are_unwrapped(tmp_path):
    reference = load_model("sample:digits-mlp").model.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.items()}}, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    model = load_model("sample:digits-mlp", weights=path).model
    assert torch.equal(model.net[1].weight, reference["net.1.weight"])


def test_non_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(InputFileError, match="does not hold a state dict"):
        read_state_dict(path)


def test_trusted_module_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(InputFileError, match="--trust-checkpoint"):
        read_state_dict(path)
    assert set(read_state_dict(path, trust=True)) == {"weight", "bias"}
