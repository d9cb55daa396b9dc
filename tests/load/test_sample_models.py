"""The shipped sample models: small, carded, and reproducing their card accuracy."""

import pytest
import torch

from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.load.sample_models import SAMPLES
from prunekit.validate.metrics import accuracy


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
    assert card["command"].startswith("python sample_models/train.py")


def test_resnet_has_batchnorm_and_residuals():
    model = load_model("sample:digits-resnet").model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(model.layer2.shortcut) == 2  # projection shortcut where the shape changes


def test_wheel_carries_the_sample_models(tmp_path):
    """Built from the top-level sample_models/ folder, found inside an unpacked wheel."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from hatchling.builders.wheel import WheelBuilder

    root = Path(__file__).parents[2]
    built = WheelBuilder(str(root)).build(directory=str(tmp_path), versions=["standard"])
    wheel = Path(next(built))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SAMPLES:
        assert f"prunekit/load/sample_models/files/{name}.safetensors" in names
        assert f"prunekit/load/sample_models/files/{name}.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import prunekit.load.sample_models as s; from prunekit.load.models import load_model;"
        "load_model('sample:digits-cnn'); print(s.SAMPLES['digits-cnn'].weights)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe, str(site)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(shown) == site / "prunekit/load/sample_models/files/digits-cnn.safetensors"
