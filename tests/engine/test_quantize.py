"""Weight quantization: ONNX Runtime's grids, GPTQ's column update against a dense oracle,
pruned zeros kept, and the Python API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.contract.quantization import QuantGrid, QuantizedTensor, expand_scales
from prunekit.errors import UsageError
from prunekit.pruners.layerwise import gptq


def _layer(seed: int = 0, rows: int = 6, d: int = 32, n: int = 128):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(d, d, generator=generator, dtype=torch.float64)  # correlated inputs
    w = torch.randn(rows, d, generator=generator)
    return w, x, x.T @ x / n


def test_int8_grid_is_onnx_runtimes_symmetric_per_channel_grid():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.3], [2.0, 0.1, -0.7, 0.0]])
    codes, scales = QuantGrid(8).quantize(w)
    torch.testing.assert_close(scales[:, 0], torch.tensor([1.27 / 127, 2.0 / 127]))
    assert codes[0].tolist() == [50, -127, 0, 30] and codes[1, 0] == 127
    assert codes[0, 2] == 0 and codes[1, 3] == 0  # zeros stay zero


def test_int4_grid_maps_the_largest_magnitude_to_minus_8_per_group():
    w = torch.tensor([[0.4, -0.8, 0.2, 0.1, 0.0, 0.7, -0.35, 0.0]])
    codes, scales = QuantGrid(4, group_size=4).quantize(w)
    torch.testing.assert_close(scales[0], torch.tensor([-0.8 / -8, 0.7 / -8]))
    assert codes[0, :4].tolist() == [4, -8, 2, 1]  # scale 0.1
    assert codes[0, 4:].tolist() == [0, -8, 4, 0]  # scale -0.0875
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def dense_gptq_oracle(
    w: torch.Tensor, gram: torch.Tensor, grid: QuantGrid, scales: torch.Tensor,
    pruned: torch.Tensor, damp: float = 0.01,
) -> torch.Tensor:  # fmt: skip
    """Column j: round (pruned entries to 0) with the given scales, then move the error onto
    columns j+1.. by the OBS update with the explicit inverse of H restricted to j.."""
    w = w.double().clone()
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    per_entry = expand_scales(scales, w.shape[1])
    for j in range(w.shape[1]):
        inverse = torch.linalg.inv(h[j:, j:])
        q = grid.round(w[:, j : j + 1], per_entry[:, j]).squeeze(1).double()
        q[pruned[:, j]] = 0.0
        scale = (w[:, j] - q) / inverse[0, 0]
        w[:, j:] -= scale.unsqueeze(1) * inverse[0].unsqueeze(0)
        w[:, j] = q
    return w


@pytest.mark.parametrize(("bits", "group", "block"), [(8, None, 128), (4, 8, 128), (4, 8, 16)])
def test_gptq_column_update_equals_the_dense_oracle(bits, group, block):
    w, _, gram = _layer()
    pruned = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    w = w.masked_fill(pruned, 0.0)
    grid = QuantGrid(bits, group)
    new, scales = gptq(w, gram, grid, block_size=block, pruned=pruned)
    oracle = dense_gptq_oracle(w, gram, grid, scales, pruned)
    torch.testing.assert_close(new.double(), oracle, rtol=1e-5, atol=1e-5)
    assert torch.all(new[pruned] == 0)  # pruned entries stay exactly zero
    on_grid = torch.round(new / expand_scales(scales, w.shape[1])) * expand_scales(scales, 32)
    assert torch.equal(on_grid, new)  # every weight is a code times its scale


def test_gptq_reconstructs_better_than_round_to_nearest():
    w, x, gram = _layer(2)
    grid = QuantGrid(4, 8)
    codes, scales = grid.quantize(w)
    rtn = QuantizedTensor(codes, scales, 4, 8).dequantized()
    new, _ = gptq(w, gram, grid)

    def error(v: torch.Tensor) -> float:
        return float(((v.double() - w.double()) @ x.T).square().sum())

    assert error(new) < 0.75 * error(rtn)


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(256, 32)
    return model, x, model(x).argmax(1).detach()


@pytest.mark.parametrize(
    ("kind", "rounding"), [("int8", "gptq"), ("int4", "rtn"), ("int4", "gptq")]
)
def test_prune_with_quantize_holds_dequantized_weights_and_keeps_zeros(kind, rounding):
    model, x, y = _mlp()
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), quantize=kind, rounding=rounding,
                            group_size=16)  # fmt: skip
    assert result.quantized is not None and set(result.quantized) == {"0.weight", "2.weight"}
    for name, q in result.quantized.items():
        weight = dict(model.named_parameters())[name].detach()
        assert torch.equal(q.dequantized(), weight)  # the model holds codes · scales exactly
        assert torch.all(weight[~result.masks[name]] == 0)  # pruned stay zero
        assert q.bits == (4 if kind == "int4" else 8)
    info = result.report["quantize"]
    assert info["kind"] == kind and info["layers"] == {n: kind for n in result.quantized}
    assert info["rounding"] == (rounding if kind == "int4" else "rtn")


def test_int4_leaves_layers_whose_inputs_do_not_divide_into_groups_at_int8():
    model, x, y = _mlp()
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), quantize="int4", group_size=64)
    assert result.quantized is not None
    assert result.quantized["0.weight"].bits == 8 and result.quantized["2.weight"].bits == 4
    assert result.report["quantize"]["left_int8"] == ["0.weight"]
    assert any("stay INT8" in w and "0.weight" in w for w in result.report["warnings"])


@pytest.mark.parametrize(
    ("option", "message"),
    [({"quantize": "int3"}, "quantize=int3: use int8 or int4"),
     ({"quantize": "int4", "rounding": "best"}, "rounding=best: use rtn or gptq"),
     ({"quantize": "int4", "group_size": 48}, "group_size=48: use one of 16, 32")],
)  # fmt: skip
def test_bad_quantize_options_are_usage_errors(option, message):
    model, x, y = _mlp()
    with pytest.raises(UsageError, match=message):
        prunekit.prune(model, "magnitude", 0.5, (x, y), **option)


def test_sparsegpt_prunes_and_rounds_to_int4_in_one_pass():
    """With a layer-wise pruner the 4-bit layers are rounded inside its column solver: the
    masks are SparseGPT's own (one block: chosen before any rounding) and every weight is on
    its grid (the solver's rounding against the dense oracle: test_gptq_column_update...)."""
    import copy

    model, x, y = _mlp()
    plain = copy.deepcopy(model)
    result = prunekit.prune(model, "sparsegpt", 0.5, (x, y), mask="layer", quantize="int4",
                            group_size=16)  # fmt: skip
    assert result.report["quantize"]["rounded_while_pruning"] == ["0.weight", "2.weight"]
    masks = prunekit.prune(plain, "sparsegpt", 0.5, (x, y), mask="layer").masks
    assert torch.equal(result.masks["0.weight"], masks["0.weight"])
    assert result.quantized is not None
    for name, q in result.quantized.items():
        assert q.bits == 4
        assert torch.equal(q.dequantized(), dict(model.named_parameters())[name].detach())
