"""--structure channels end to end: channel scores by hand, the shrunk model saved, loaded
back and exported to a smaller ONNX model with parity, and its bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from prunekit.load.models import load_model
from prunekit.structured.groups import find_groups
from tests.cli_helpers import assert_error, invoke, prune, prune_report

MODEL = "sample:digits-cnn"


def _run(tmp_path, name: str, *extra: str) -> dict:
    return prune_report(MODEL, "-s", "0.5", "--structure", "channels", "--out",
                        str(tmp_path / name), *extra)  # fmt: skip


def test_magnitude_keeps_the_channels_of_largest_group_l1_norm(tmp_path):
    dense = load_model(MODEL).model
    weights = {n: p.detach().double() for n, p in dense.named_parameters()}
    groups, _ = find_groups(dense, torch.zeros(1, 1, 8, 8))
    report = _run(tmp_path, "layer", "-p", "magnitude", "--mask", "layer")
    structure = report["structure"]
    assert structure["groups"] == len(groups) and structure["removed"] == pytest.approx(0.5)
    for g in groups:  # L1 over the rows that make channel c and the columns that read it
        norm = torch.zeros(g.channels, dtype=torch.float64)
        for m in g.members:
            w = weights[f"{m.module}.weight"] if m.role != "channel" else None
            if m.role == "out":
                norm += w.reshape(g.channels, -1).abs().sum(1)
            elif m.role == "in":
                norm += w.abs().transpose(0, 1).reshape(g.channels, -1).sum(1)
        expected = sorted(torch.argsort(norm, descending=True)[: g.channels // 2].tolist())
        assert structure["kept"][str(g)] == expected
    assert structure["parameters"]["after"] < 0.5 * structure["parameters"]["before"]
    assert structure["flops_per_sample"]["after"] < 0.5 * structure["flops_per_sample"]["before"]


def test_the_shrunk_model_round_trips_and_exports_a_smaller_onnx(tmp_path):
    import onnxruntime as ort

    report = _run(tmp_path, "wf", "-p", "woodfisher", "--param", "num_grads=200",
                  "--export", "safetensors,onnx", "--validate")  # fmt: skip
    assert "channels were removed" in report["validation"]["note"]  # prune --validate too
    out = tmp_path / "wf"
    loaded = load_model(MODEL, out / "model.safetensors").model  # channels cut, then loaded
    kept = report["structure"]["kept"]
    assert loaded.features[0].out_channels == len(kept["features.0"])
    assert sum(p.numel() for p in loaded.parameters()) == report["structure"]["parameters"]["after"]
    x = torch.rand(7, 1, 8, 8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, loaded(x).numpy(), atol=1e-5)
    assert (out / "model.onnx").stat().st_size < 0.5 * (out / "dense.onnx").stat().st_size
    result = invoke("validate", str(out / "model.onnx"), "--baseline", str(out / "dense.onnx"),
                    "--runs", "3", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    validated = json.loads(result.stdout)
    assert validated["parity"]["passed"] and "speedup" in validated
    assert validated["accuracy"] == pytest.approx(report["accuracy"]["pruned"])
    assert "channels were removed" in validated["note"]


def test_global_ranking_keeps_the_minimum_and_says_so(tmp_path):
    report = prune_report(MODEL, "-p", "magnitude", "-s", "0.97", "--structure", "channels",
                          "--min-channels", "3", "--out", str(tmp_path / "g"))  # fmt: skip
    kept = report["structure"]["kept"]
    assert min(len(v) for v in kept.values()) >= 3
    assert any("(--min-channels), not" in w for w in report["warnings"])


def test_bad_structured_input(tmp_path, monkeypatch):
    base = (MODEL, "-s", "0.5", "--out", str(tmp_path / "o"))
    assert_error(prune(*base, "-p", "magnitude", "--structure", "rows"), 2,
                 "--structure rows: use channels")  # fmt: skip
    assert_error(prune(*base, "-p", "magnitude", "--structure", "channels", "--mask", "2:4"), 2,
                 "--mask 2:4 with --structure channels")  # fmt: skip
    assert_error(prune(*base, "-p", "sparsegpt", "--structure", "channels", "--mask", "layer"),
                 2, "sparsegpt picks weights inside each layer")  # fmt: skip
    (tmp_path / "branchy.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)\n"
        "    def forward(self, x):\n"
        "        h = self.a(x.flatten(1))\n"
        "        if h.sum() > 0:\n"  # data-dependent control flow: not traceable
        "            h = h * 2\n"
        "        return self.b(h)\n"
        "def branchy(num_classes=10):\n    return Branchy()\n"
        "class Wrapped(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = Branchy()\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "def wrapped(num_classes=10):\n    return Wrapped()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "branchy", raising=False)
    result = prune("branchy:branchy", "-p", "magnitude", "-s", "0.5", "--data", "digits",
                   "--structure", "channels", "--out", str(tmp_path / "b"))  # fmt: skip
    assert_error(result, 2, "cannot trace Branchy (the model's own forward) for structured",
                 "--structure channels-or-weights")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()
    fallback = prune_report("branchy:wrapped", "-p", "magnitude", "-s", "0.5", "--data",
                            "digits", "--structure", "channels-or-weights", "--out",
                            str(tmp_path / "c"))  # fmt: skip
    assert fallback["structure"] is None and fallback["sparsity"]["achieved"] == 0.5
    assert fallback["recalibrate_bn"] is False  # the default follows what was removed
    assert any("cannot trace module body (Branchy)" in w and "pruned unstructured" in w
               for w in fallback["warnings"])  # fmt: skip


def test_gradual_structured_pruning_with_fine_tuning(tmp_path):
    report = _run(tmp_path, "gradual", "-p", "fisher_pruner", "--mask", "layer", "--schedule",
                  "gradual", "--steps", "2", "--finetune-epochs", "1", "--lr", "0.01")  # fmt: skip
    removed = [h["channels_removed"] for h in report["history"] if "channels_removed" in h]
    assert len(removed) == 2 and removed[0] < removed[1] == pytest.approx(0.5)
    tuned = [h for h in report["history"] if h["phase"].startswith("fine-tune")]
    assert len(tuned) == 2 and report["accuracy"]["pruned"] > 0.8
    assert report["structure"]["parameters"]["after"] < report["structure"]["parameters"]["before"]


def test_the_python_api_shrinks_the_model_in_place():
    import prunekit
    from prunekit.load.data import load_data

    model = load_model(MODEL).model
    data = load_data("digits")
    x, y = data.calibration[:200]
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), structure="channels", mask="layer")
    assert result.model is model and model.features[0].out_channels == 8
    assert result.masks == {} and result.report["structure"]["removed"] == pytest.approx(0.5)


def test_kept_channels_rounded_up_to_a_multiple(tmp_path):
    report = _run(tmp_path, "round", "-p", "magnitude", "--mask", "layer", "-s", "0.3",
                  "--channel-multiple", "8")  # fmt: skip
    kept = {name: len(k) for name, k in report["structure"]["kept"].items()}
    assert kept == {"features.0": 16, "features.2": 24, "classifier.1": 48}  # 12, 23, 45 rounded up
    assert report["structure"]["channel_multiple"] == 8


def test_batchnorm_is_re_estimated_by_default_when_channels_are_removed(tmp_path):
    runs = {}
    for extra in ((), ("--no-recalibrate-bn",)):
        runs[extra] = prune_report("sample:digits-resnet", "-p", "magnitude", "-s", "0.5",
                                   "--structure", "channels", "--mask", "layer", "--out",
                                   str(tmp_path / str(len(extra))), *extra)  # fmt: skip
    default, off = runs[()], runs[("--no-recalibrate-bn",)]
    assert default["recalibrate_bn"] is True and off["recalibrate_bn"] is False
    # measured: 38.2 % without, 78.0 % with the statistics re-estimated
    assert off["accuracy"]["pruned"] < 0.5 < 0.7 < default["accuracy"]["pruned"]
