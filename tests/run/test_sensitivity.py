"""prunekit sensitivity: the scan, the allocation against hand-worked cases, the recipe."""

import json

import pytest

from prunekit.errors import UsageError
from prunekit.run.sensitivity import LayerScan, allocate
from tests.cli_helpers import assert_error, invoke, prune_report


def test_allocation_spends_sparsity_where_it_costs_least_per_weight():
    dense = 0.9
    free = LayerScan("free", 1000, {0.5: 0.9, 0.9: 0.9})  # no drop up to 90 %
    costly = LayerScan("costly", 1000, {0.5: 0.8, 0.9: 0.1})
    levels = allocate([free, costly], dense, 0.5)
    assert levels == {"free": 0.9, "costly": 0.1}  # 900 free weights, then 100 of the other
    # a layer ten times smaller with the same drop costs ten times more per weight
    small = LayerScan("small", 100, {0.5: 0.8, 0.9: 0.5})
    big = LayerScan("big", 1000, {0.5: 0.8, 0.9: 0.5})
    levels = allocate([small, big], dense, 0.4)
    assert levels["small"] == 0.0 and levels["big"] == pytest.approx(0.44, abs=0.011)


def test_allocation_reaches_the_target_within_one_step_and_refuses_the_unreachable():
    layers = [LayerScan(f"l{i}", 100 * (i + 1), {0.5: 0.9 - 0.01 * i, 0.9: 0.5 - 0.05 * i})
              for i in range(5)]  # fmt: skip
    total = sum(layer.weights for layer in layers)
    levels = allocate(layers, 0.9, 0.7)
    removed = sum(levels[layer.name] * layer.weights for layer in layers) / total
    assert 0.7 <= removed <= 0.7 + 0.01 * 500 / total
    with pytest.raises(UsageError, match="above what the scanned sparsities reach"):
        allocate(layers, 0.9, 0.95)


def test_the_scan_writes_a_recipe_that_prune_follows(tmp_path):
    out = tmp_path / "scan"
    result = invoke("sensitivity", "sample:digits-cnn", "--target", "0.7", "--sparsities",
                    "0.5,0.9", "--max-samples", "200", "--out", str(out), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    scan = json.loads(result.stdout)
    assert scan["test_samples"] == 200 and scan["levels"] == [0.5, 0.9]
    names = [layer["name"] for layer in scan["layers"]]
    assert names == ["features.0.weight", "features.2.weight", "classifier.1.weight",
                     "classifier.3.weight"]  # fmt: skip
    assert all(0 <= v <= 1 for layer in scan["layers"] for v in layer["accuracy"].values())
    assert scan["achieved"] >= 0.7
    assert {p.name for p in out.iterdir()} >= {"sensitivity.json", "sensitivity.png",
                                              "recipe.json"}  # fmt: skip
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["layer_sparsity"] == scan["allocation"]
    report = prune_report("--config", str(out / "recipe.json"), "-p", "woodfisher", "--param",
                          "num_grads=64", "--out", str(tmp_path / "pruned"))  # fmt: skip
    for name, level in scan["allocation"].items():
        assert report["sparsity"]["per_tensor"][name] == pytest.approx(level, abs=1e-3)
    assert report["sparsity"]["achieved"] == pytest.approx(scan["achieved"], abs=1e-3)


def test_sensitivity_bad_input(tmp_path):
    out = str(tmp_path / "o")
    base = ("sensitivity", "sample:digits-cnn", "--out", out)
    cases = [
        (("--target", "0.5", "-p", "sparsegpt"), "sparsegpt compresses layer by layer"),
        (("--target", "0.5", "--exclude", "*"), "no prunable Conv/Linear weights are left"),
        (("--target", "0.97"), "above what the scanned sparsities reach"),
        (("--target", "0.5", "--sparsities", "0,0.5"), "--sparsities 0 measures nothing"),
        (("--target", "1.5"), "sparsity must be in [0, 1)"),
        (("--target", "0.5", "--max-samples", "0"), "--max-samples 0: give at least 1"),
    ]  # fmt: skip
    for extra, message in cases:
        assert_error(invoke(*base, *extra), 2, message)
    assert not (tmp_path / "o").exists()


def test_a_recipe_serves_layer_wise_pruners_and_an_existing_output_is_refused_first(tmp_path):
    out = tmp_path / "scan"
    args = ("sensitivity", "sample:digits-cnn", "-p", "wanda", "--target", "0.6",
            "--sparsities", "0.5,0.9", "--max-samples", "100", "--out", str(out))  # fmt: skip
    assert invoke(*args).exit_code == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["mask"] == "layer"
    for pruner in ("wanda", "sparsegpt"):
        report = prune_report("--config", str(out / "recipe.json"), "-p", pruner,
                              "--out", str(tmp_path / pruner))  # fmt: skip
        assert report["sparsity"]["achieved"] == pytest.approx(recipe["sparsity"], abs=0.02)
    again = invoke(*args)  # refused before any layer is scanned
    assert_error(again, 2, "already exists")
    assert "progress:" not in again.stderr


def test_a_scan_where_the_pruner_declines_every_layer(tmp_path, monkeypatch):
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "onlyconv1d", raising=False)
    (tmp_path / "onlyconv1d.py").write_text(
        "from torch import nn\n\ndef net(num_classes=3):\n    return nn.Sequential("
        "nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(24, num_classes))\n"
    )
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.randn(40, 1, 8), "y": torch.arange(40) % 3}, tmp_path / "d.safetensors")
    result = invoke("sensitivity", "onlyconv1d:net", "--data", "tensors:d.safetensors",
                    "--exclude", "2.*", "-p", "wanda", "--target", "0.5", "--out", "o")  # fmt: skip
    assert_error(result, 2, "wanda declined every layer")
