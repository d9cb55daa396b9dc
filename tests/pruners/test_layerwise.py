"""SparseGPT against the dense sequential-OBS oracle, Wanda's scores by hand, and both
through the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import api
from prunekit.calibrate.collector import Collector
from prunekit.calibrate.layer_inputs import input_gram, layer_rows
from prunekit.contract.pruner import Compressed, LayerRequest
from prunekit.contract.statistics import INPUT_SQUARES
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.pruners import registry
from prunekit.pruners.layerwise import sparsegpt
from tests.cli_helpers import assert_error, prune, prune_report


def dense_sequential_obs(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The oracle SparseGPT approximates fast: for a given mask, visit the columns left to
    right; at column j remove each row's pruned weight by the OBS update under the explicit
    inverse of H restricted to columns j..d−1. Slow (one inverse per column); for tests."""
    w = weight.detach().double().clone()
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    d = w.shape[1]
    for j in range(d):
        inverse = torch.linalg.inv(h[j:, j:])
        drop = ~keep[:, j]
        if drop.any():
            scale = w[drop, j] / inverse[0, 0]
            w[drop, j:] -= scale.unsqueeze(1) * inverse[0].unsqueeze(0)
            w[drop, j] = 0.0
    return w


def _layer(seed: int = 0, out: int = 6, d: int = 20, n: int = 64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x[:, 3] *= 5  # uneven input scales make the Hessian matter
    w = torch.randn(out, d, generator=generator, dtype=torch.float64)
    return w, x, x.T @ x / n


@pytest.mark.parametrize(
    ("block_size", "nm", "sparsity"), [(128, None, 0.5), (4, None, 0.6), (8, (2, 4), 0.5)]
)
def test_sparsegpt_equals_the_dense_sequential_obs_oracle(block_size, nm, sparsity):
    w, _, gram = _layer()
    new, keep = sparsegpt(w, gram, sparsity, nm, block_size, damp=0.01)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    if nm is not None:  # exactly N kept in every M consecutive inputs of every row
        assert torch.all(keep.reshape(6, -1, nm[1]).sum(-1) == nm[0])
    oracle = dense_sequential_obs(w, gram, keep, damp=0.01)
    torch.testing.assert_close(new, oracle, rtol=1e-9, atol=1e-9)
    assert torch.all(new[~keep] == 0)


def test_sparsegpt_reconstructs_better_than_plain_removal():
    """With correlated inputs (as real activations are) the kept weights absorb the loss."""
    w, x, _ = _layer(1)
    x = x @ torch.randn(20, 20, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    gram = x.T @ x / len(x)
    new, keep = sparsegpt(w, gram, 0.5)
    plain = w * keep  # the same mask, no update
    error = ((new - w) @ x.T).square().sum()
    assert error < 0.5 * ((plain - w) @ x.T).square().sum()


def test_layer_rows_of_a_conv_reproduce_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 7, 7)
    rows = layer_rows(conv, x)  # (n, C·kh·kw)
    out = rows @ conv.weight.reshape(4, -1).T + conv.bias
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_wanda_scores_by_hand():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-4.0, 0.25, 3.0]]))
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]])
    data = torch.utils.data.TensorDataset(x, torch.zeros(2, dtype=torch.long))
    targets, _ = find_targets(model)
    pruner = registry.create("wanda")
    spec = pruner.stats_spec()
    collector = Collector(model, targets, data, spec, pruner.needs, torch.device("cpu"))
    [(_, stats)] = list(collector.collect())
    # E[x_j²] over the 2 samples: (1+9)/2, 1/2, 4/2; the score is |W| · √E[x_j²]
    squares = torch.tensor([5.0, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(stats["0.weight"][INPUT_SQUARES], squares)
    expected = torch.tensor([[1.0, 2.0, 0.5], [4.0, 0.25, 3.0]]) * squares.sqrt().float()
    torch.testing.assert_close(pruner.score(targets[0], stats["0.weight"]), expected)


def test_sparsegpt_compress_is_pure_and_the_engine_writes_layer_by_layer():
    """compress returns the solver's mask and weights without touching the layer; the
    engine measures the second layer through the first one already compressed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 8)
    data = torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long))
    cpu = torch.device("cpu")
    pruner = registry.create("sparsegpt")
    targets, _ = find_targets(model)
    first = targets[0]
    before = first.weight.detach().clone()
    gram = input_gram(model, first.module, data, 32, cpu)
    result = pruner.compress(first, gram, LayerRequest(0.5))
    assert isinstance(result, Compressed) and torch.equal(first.weight.detach(), before)
    expected, keep = sparsegpt(before, gram, 0.5)
    assert torch.equal(result.keep, keep) and torch.equal(result.weight, expected)

    second_before = targets[1].weight.detach().clone()
    state = Pruning.of(model, targets, pruner, data, cpu, mask="layer")
    prune_step(state, 0.5)
    assert torch.equal(first.weight.detach(), expected) and torch.equal(first.mask, keep)
    hidden = model[1](model[0](x)).detach().double()  # through the compressed first layer
    second, second_keep = sparsegpt(second_before, hidden.T @ hidden / 32, 0.5)
    torch.testing.assert_close(targets[1].weight.detach(), second, rtol=1e-6, atol=1e-6)
    assert torch.equal(targets[1].mask, second_keep)


def test_input_gram_is_x_xt_over_n():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(5, 3)
    data = torch.utils.data.TensorDataset(x, torch.zeros(5, dtype=torch.long))
    gram = input_gram(model, model[0], data, 5, torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(gram, (x.double().T @ x.double()) / 5)


@pytest.mark.parametrize("name", ["sparsegpt", "wanda"])
def test_contract(name):
    api.check_pruner(registry.load(name))


def test_through_the_cli(tmp_path):
    args = ("sample:digits-cnn", "-s", "0.8", "--mask", "layer")
    accuracy = {
        p: prune_report(*args, "-p", p, "--out", str(tmp_path / p))["accuracy"]["pruned"]
        for p in ("sparsegpt", "wanda", "magnitude")
    }
    assert accuracy["sparsegpt"] > accuracy["magnitude"] + 0.05  # the update pays
    report = prune_report("sample:digits-mlp", "-p", "sparsegpt", "-s", "0.5", "--mask", "2:4",
                          "--out", str(tmp_path / "nm"))  # fmt: skip
    assert set(report["sparsity"]["per_tensor"].values()) == {0.5}
    assert_error(prune("sample:digits-mlp", "-p", "wanda", "-s", "0.5"), 2, "--mask layer or N:M")


def test_padding_tokens_are_left_out_of_the_layer_statistics():
    class Tokens(nn.Module):  # marks its padding like prunekit.load.hf.PackedInputs
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2)
            self.token_mask = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.token_mask = x[:, :, 3]  # (batch, length) of 1 = real token
            return self.proj(x[:, :, :3]).mean(1)

    x = torch.randn(4, 5, 4)
    x[:, :, 3] = (torch.arange(5) < torch.tensor([[2], [5], [3], [1]])).float()
    model = Tokens()
    data = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    gram = input_gram(model, model.proj, data, 4, torch.device("cpu"))
    real = x[:, :, :3][x[:, :, 3].bool()].double()  # the 11 real tokens only
    torch.testing.assert_close(gram, real.T @ real / len(real))


def test_a_layer_pruner_that_ignores_the_channel_layout_of_n_of_m_is_caught():
    """A plugin written before LayerRequest.columns (groups along the flattened row) would
    give convolutions 2:4 masks no sparse kernel can use: the engine refuses them."""
    from prunekit.contract.pruner import CONTRACT_VERSION, LayerPruner
    from prunekit.errors import PluginError

    class FlatTwoOfFour(LayerPruner):
        name = "flat24"
        contract = CONTRACT_VERSION

        def compress(self, target, gram, request):
            rows = target.weight.detach().reshape(target.weight.shape[0], -1, 4)
            keep = torch.zeros_like(rows, dtype=torch.bool)
            keep.scatter_(-1, rows.abs().topk(2, dim=-1).indices, True)  # flat, not channels
            return Compressed(keep.reshape(target.weight.shape))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    targets, _ = find_targets(model)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, 8, 8), torch.zeros(16).long())
    state = Pruning.of(model, targets, FlatTwoOfFour(), data, torch.device("cpu"), "2:4")
    with pytest.raises(PluginError, match=r"flat24: the keep-mask of 0\.weight keeps more than 2"):
        prune_step(state, 0.5)
