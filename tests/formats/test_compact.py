import pytest
import torch
from safetensors import safe_open

from prunekit.errors import InputFileError
from prunekit.formats.compact import FORMAT_KEY, load_sparse, save_compact


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_round_trip_is_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.9] = 0.0
    w[0, 0] = -0.0  # a signed zero must survive
    w[0, 1] = float("nan")
    half = torch.randn(100, generator=gen).half()
    half[::3] = 0
    state = {"w": w, "half": half, "dense": torch.randn(4, 4), "count": torch.tensor(7)}
    path = tmp_path / "m.safetensors"
    save_compact(state, path, {"pruner": "x"})
    back = load_sparse(path)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        if t.is_floating_point():
            assert torch.equal(bits(back[name]), bits(t)), name
        else:
            assert torch.equal(back[name], t)
    with safe_open(str(path), framework="pt") as f:
        assert "w::mask" in f.keys() and "dense" in f.keys()  # noqa: SIM118
        assert f.metadata()["pruner"] == "x" and "w" in f.metadata()[FORMAT_KEY]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_size_is_close_to_the_bitmask_bound(tmp_path, sparsity):
    n = 256 * 1024
    w = torch.randn(n)
    w[torch.randperm(n)[: int(n * sparsity)]] = 0.0
    path = tmp_path / "m.safetensors"
    save_compact({"w": w}, path, {})
    bound = ((1 - sparsity) + 1 / 32) * n * 4
    assert path.stat().st_size <= bound * 1.05


def test_missing_file():
    with pytest.raises(InputFileError, match="does not exist"):
        load_sparse("nowhere.safetensors")


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 16), (4, 32)])
def test_quantized_weights_round_trip_exactly_at_a_bit_per_weight_plus_their_codes(
    tmp_path, bits, group
):
    from prunekit.contract.quantization import QuantGrid, QuantizedTensor
    from prunekit.formats.compact import load_sparse, save_compact

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=generator)
    w[torch.rand(24, 64, generator=generator) < 0.9] = 0.0  # 90 % sparse
    codes, scales = QuantGrid(bits, group).quantize(w)
    q = QuantizedTensor(codes, scales, bits, group)
    held = q.dequantized()
    path = tmp_path / "c.safetensors"
    save_compact({"w": held, "b": torch.zeros(3)}, path, {}, {"w": q})
    back = load_sparse(path)
    assert torch.equal(back["w"], held) and torch.equal(back["b"], torch.zeros(3))
    nonzero = int(torch.count_nonzero(held))
    payload = (held.numel() + 7) // 8 + (nonzero if bits == 8 else (nonzero + 1) // 2)
    assert path.stat().st_size < payload + scales.numel() * 4 + 1200  # + header
