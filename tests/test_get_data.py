"""benchmarks/get_data.py offline: a checkpoint in the published layout ({'state_dict':
{'module.' + key: tensor}, 'best_prec1': float}) becomes a safetensors state dict that
cifar:ARCH loads with the same tensors; CIFAR-style images become the npz the benchmarks
read; a checkpoint of another architecture is refused. (The downloads need network access
and are not run here.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prunekit.errors import ModelMismatchError
from prunekit.load.cifar_resnet import cifar_resnet
from prunekit.load.models import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "get_data.py"
spec = importlib.util.spec_from_file_location("get_data", SCRIPT)
assert spec is not None and spec.loader is not None
get_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(get_data)


def test_a_published_checkpoint_becomes_a_loadable_state_dict(tmp_path):
    torch.manual_seed(0)
    state = cifar_resnet("resnet20").state_dict()
    published = tmp_path / "resnet20-12fca82f.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7},
               published)  # fmt: skip
    out = tmp_path / "resnet20.safetensors"
    assert get_data.checkpoint_to_safetensors(published, "resnet20", out) == len(state)
    loaded = load_model("cifar:resnet20", out).model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ModelMismatchError, match="do not fit cifar:resnet32"):
        get_data.checkpoint_to_safetensors(published, "resnet32", tmp_path / "x.safetensors")


def test_cifar_images_become_the_benchmarks_npz(tmp_path):
    rng = np.random.default_rng(0)
    dataset = SimpleNamespace(
        data=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), targets=[*range(10), 3, 4]
    )
    assert get_data.images_to_npz(dataset, 5, tmp_path / "calibration.npz") == 5
    saved = np.load(tmp_path / "calibration.npz")
    assert saved["x"].shape == (5, 3, 32, 32) and saved["x"].dtype == np.uint8
    assert np.array_equal(saved["x"][2], dataset.data[2].transpose(2, 0, 1))
    assert saved["y"].tolist() == [0, 1, 2, 3, 4] and saved["y"].dtype == np.int64
