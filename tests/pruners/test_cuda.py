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


def test_a_decoder_kept_on_the_host_is_pruned_block_by_block_on_the_gpu(monkeypatch):
    """The offload path: the decoder's weights stay in host memory, each block visits the
    GPU; the weights equal a CPU run's."""
    transformers = pytest.importorskip("transformers")
    import prunekit
    from prunekit.load.hf import PackedInputs, as_linear
    from prunekit.run import pipeline

    def model():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2,
                                         n_positions=16)  # fmt: skip
        inner = transformers.GPT2LMHeadModel(config).eval()
        as_linear(inner)
        return PackedInputs(inner, "decoder").eval()

    ids = torch.randint(0, 40, (24, 12), generator=torch.Generator().manual_seed(0))
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    data = (x, torch.full((24,), -1))
    on_cpu = model()
    prunekit.prune(on_cpu, "sparsegpt", 0.5, data, mask="layer", device="cpu")
    monkeypatch.setattr(pipeline, "HOST_SHARE", 0.0)  # every decoder counts as too large
    offloaded = model()
    result = prunekit.prune(offloaded, "sparsegpt", 0.5, data, mask="layer", device="cuda")
    assert result.report["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    for (name, a), b in zip(on_cpu.state_dict().items(), offloaded.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=name)
