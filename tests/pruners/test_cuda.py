"""CUDA runs of the layer-wise and learned-Fisher pruners give the CPU's masks (run by
`pytest -m cuda`, e.g. from benchmarks/gpu_check.py, where a GPU is at hand)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import prune_report

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _agreement(a: dict, b: dict, names) -> float:
    same = sum(int(((a[n] == 0) == (b[n] == 0)).sum()) for n in names)
    return same / sum(a[n].numel() for n in names)


@pytest.mark.parametrize(
    "args, least",
    [
        (("sample:digits-mlp", "-p", "sparsegpt", "-s", "0.5", "--mask", "layer"), 0.999),
        (("sample:digits-cnn", "-p", "fishleg", "-s", "0.7", "--param", "num_grads=128"), 0.98),
    ],
)
def test_cuda_masks_equal_cpu_masks(tmp_path, monkeypatch, args, least):
    monkeypatch.delenv("PRUNEKIT_PLUGINS", raising=False)  # fishleg is a plugin
    reports, states = [], []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        reports.append(prune_report(*args, "--device", device, "--out", str(out)))
        states.append(load_file(out / "model.safetensors"))
    assert reports[1]["device"].startswith("cuda")
    names = list(reports[0]["sparsity"]["per_tensor"])
    assert _agreement(states[0], states[1], names) >= least
