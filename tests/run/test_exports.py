"""The exported safetensors: metadata, exact zeros, and a round trip that reproduces accuracy."""

import json

import torch
from safetensors.torch import load_file

from prunekit import __version__
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.run.exports import read_metadata
from prunekit.validate.metrics import accuracy
from tests.cli_helpers import prune_report


def test_round_trip_reproduces_pruned_accuracy(tmp_path):
    out = tmp_path / "run"
    report = prune_report("sample:digits-resnet", "-p", "magnitude", "-s", "0.7", "--out", str(out))
    path = out / "model.safetensors"

    meta = read_metadata(path)
    assert meta["prunekit_version"] == __version__
    assert meta["pruner"] == "magnitude" and meta["model"] == "sample:digits-resnet"
    assert float(meta["sparsity_target"]) == 0.7
    assert float(meta["sparsity_achieved"]) == report["sparsity"]["achieved"]
    assert json.loads(meta["sparsity_per_tensor"]) == report["sparsity"]["per_tensor"]
    assert json.loads(meta["config"])["sparsity"] == 0.7

    state = load_file(path)
    for name, fraction in report["sparsity"]["per_tensor"].items():
        assert (state[name] == 0).sum().item() == round(fraction * state[name].numel())

    reloaded = load_model("sample:digits-resnet", weights=path)
    acc = accuracy(reloaded.model, load_data("digits").test, torch.device("cpu"))
    assert acc == report["accuracy"]["pruned"]
