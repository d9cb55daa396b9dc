import sys

import pytest
import torch
from torch import nn

from prunekit.errors import InputFileError, UnknownNameError
from prunekit.load.models import build, load_model, read_state_dict


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


@pytest.mark.parametrize(
    ("arch", "blocks", "prunable"),
    [("resnet32", 5, 461_872), ("resnet44", 7, 655_408), ("resnet56", 9, 848_944)],
)
def test_cifar_resnets_match_the_published_checkpoints_layout(arch, blocks, prunable):
    """Key names, shapes and prunable-weight counts of the public CIFAR-10 checkpoints."""
    model, weights = build(f"cifar:{arch}")
    assert weights is None
    state = model.state_dict()
    convs = {k: tuple(v.shape) for k, v in state.items() if k.endswith("conv1.weight")}
    assert convs["conv1.weight"] == (16, 3, 3, 3)
    assert convs["layer1.0.conv1.weight"] == (16, 16, 3, 3)
    assert convs["layer2.0.conv1.weight"] == (32, 16, 3, 3)  # the stride-2 block
    assert convs[f"layer3.{blocks - 1}.conv1.weight"] == (64, 64, 3, 3)
    assert f"layer3.{blocks}.conv1.weight" not in convs
    assert tuple(state["linear.weight"].shape) == (10, 64) and "linear.bias" in state
    assert not any("shortcut" in k for k in state)  # option A: no parameters
    count = sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    assert count == prunable


def test_cifar_resnet_option_a_shortcut_pads_channels():
    from prunekit.load.cifar_resnet import PadShortcut

    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    y = PadShortcut(16, 32)(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    model, _ = build("cifar:resnet20", num_classes=7)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(UnknownNameError, match=r"did you mean .*resnet20.*use one of"):
        build("cifar:resnet21")
