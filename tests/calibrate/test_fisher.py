"""The blockwise inverse Fisher and the OBS algebra against dense closed-form oracles."""

import pytest
import torch

from prunekit.calibrate import fisher
from prunekit.contract.curvature import BlockInverse
from prunekit.errors import NumericalError


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def dense_block_inverses(rows, block, damp):
    """torch.linalg.inv of λI + GᵀG/m for each block, built densely."""
    m, d = rows.shape
    out = []
    for start in range(0, d, block):
        g = torch.zeros(m, block)
        piece = rows[:, start : start + block]
        g[:, : piece.shape[1]] = piece
        out.append(torch.linalg.inv(damp * torch.eye(block) + g.T @ g / m))
    return torch.stack(out)


@pytest.mark.parametrize(("m", "d", "block"), [(5, 23, 8), (40, 23, 8), (7, 16, 16)])
def test_both_paths_equal_dense_inverse_and_rank1_recursion(m, d, block):
    rows = torch.randn(m, d, generator=torch.Generator().manual_seed(m))
    damp = 1e-2
    oracle = dense_block_inverses(rows, block, damp)
    woodbury = fisher.inverse_from_rows(rows, block, damp)
    cholesky = fisher.inverse_from_gram(fisher.gram_blocks(rows, block), m, damp)
    recursion = fisher.rank1_inverse_reference(rows, block, damp)
    assert oracle.shape == (-(-d // block), block, block)
    torch.testing.assert_close(woodbury, oracle, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(cholesky, oracle, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(recursion, oracle, rtol=1e-8, atol=1e-8)


def test_gram_blocks_sum_over_chunks():
    rows = torch.randn(12, 10)
    whole = fisher.gram_blocks(rows, 4)
    parts = fisher.gram_blocks(rows[:5], 4) + fisher.gram_blocks(rows[5:], 4)
    torch.testing.assert_close(whole, parts)


@pytest.fixture
def least_squares():
    """L(w) = ‖Xw − y‖² / (2n): the Hessian is exactly XᵀX / n; w* is the minimiser."""
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 6
    x = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)  # correlated
    y = x @ torch.randn(d, generator=gen) + 0.1 * torch.randn(n, generator=gen)
    w_star = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    hessian = x.T @ x / n

    def loss(w):
        return ((x @ w - y).square().sum() / (2 * n)).item()

    return x, y, w_star, hessian, loss


def test_single_weight_removal_changes_loss_by_prediction(least_squares):
    _x, _y, w_star, hessian, loss = least_squares
    inverse = torch.linalg.inv(hessian).unsqueeze(0)  # one block: the whole tensor
    predicted = fisher.obs_scores(w_star, BlockInverse(inverse, len(w_star)).diag())
    for q in range(len(w_star)):
        prune = torch.zeros(len(w_star), dtype=torch.bool)
        prune[q] = True
        updated = fisher.obs_update(w_star, inverse, prune)
        assert updated[q] == 0.0
        assert loss(updated) - loss(w_star) == pytest.approx(predicted[q].item(), rel=1e-9)


def test_exact_joint_update_is_the_constrained_optimum(least_squares):
    x, y, w_star, hessian, loss = least_squares
    inverse = torch.linalg.inv(hessian).unsqueeze(0)
    prune = torch.tensor([True, False, True, False, False, True])
    updated = fisher.obs_update(w_star, inverse, prune, exact=True)
    free = ~prune
    optimum = torch.zeros_like(w_star)
    optimum[free] = torch.linalg.lstsq(x[:, free], y.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(updated, optimum, rtol=1e-9, atol=1e-9)
    assert torch.all(updated[prune] == 0.0)
    independent = fisher.obs_update(w_star, inverse, prune, exact=False)
    assert torch.all(independent[prune] == 0.0)
    assert loss(updated) < loss(independent)  # the joint solve is the better one


def test_blocks_are_independent_and_padding_is_ignored():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(30, 10, generator=gen)
    inverse = fisher.inverse_from_gram(fisher.gram_blocks(rows, 4), 30, 1e-3)  # blocks 4,4,2
    weight = torch.randn(2, 5, generator=gen)
    prune = torch.zeros(2, 5, dtype=torch.bool)
    prune[0, 0] = True  # flat index 0: lives in block 0 (indices 0..3)
    updated = fisher.obs_update(weight, inverse, prune, exact=True)
    assert updated[0, 0] == 0.0
    flat_before, flat_after = weight.reshape(-1), updated.reshape(-1)
    assert torch.equal(flat_after[4:], flat_before[4:])  # other blocks untouched
    assert not torch.equal(flat_after[1:4], flat_before[1:4])  # same block compensated
    scores = fisher.obs_scores(weight, BlockInverse(inverse, weight.numel()).diag().reshape(2, 5))
    assert scores.shape == weight.shape and torch.all(scores >= 0)


def test_ill_conditioned_block_fails_in_float32_and_factorises_in_float64():
    """A rank-4 Fisher block with a small absolute λ (κ ≈ 1e8): float32 Cholesky breaks
    down; the default float64 factorisation inverts it. The integer gradients make the
    float32 Gram exact, so only the factorisation's precision differs."""
    gen = torch.Generator().manual_seed(0)
    m, block, damp = 256, 64, 1e-5
    low_rank = torch.randint(-5, 6, (m, 4), generator=gen) @ torch.randint(-2, 3, (4, block))
    rows = low_rank.float()
    gram = fisher.gram_blocks(rows, block)
    assert torch.equal(gram.double(), fisher.gram_blocks(rows.double(), block))  # exact
    with pytest.raises(NumericalError):
        fisher.inverse_from_gram(gram, m, damp, dtype=torch.float32)
    inverse = fisher.inverse_from_gram(gram, m, damp)  # float64 factorisation
    assert inverse.dtype == torch.float32
    dense = gram[0].double() / m + damp * torch.eye(block, dtype=torch.float64)
    exact = torch.linalg.inv(dense)
    scale = exact.abs().max()
    torch.testing.assert_close(inverse[0].double(), exact, rtol=0, atol=1e-5 * scale)
    woodbury = fisher.inverse_from_rows(rows, block, damp)  # the m x m kernel, float64 too
    torch.testing.assert_close(woodbury[0].double(), exact, rtol=0, atol=1e-5 * scale)
    # relative damping scales λ to the block: float32 copes as well
    relative = fisher.relative_damping([gram[0].diagonal() / m], 1e-2)
    assert relative == pytest.approx(1e-2 * float(gram[0].diagonal().double().mean()) / m)
    fisher.inverse_from_gram(gram, m, relative, dtype=torch.float32)


def test_in_place_gram_accumulation_equals_one_product():
    rows = torch.randn(30, 21)
    gram = None
    for part in rows.split(7):
        gram = fisher.accumulate_gram(gram, part, 8)
    torch.testing.assert_close(gram, fisher.gram_blocks(rows, 8))


def test_group_obs_scores_equal_the_dense_formula():
    from prunekit.calibrate.fisher import group_obs_scores

    torch.manual_seed(0)
    numel, b = 50, 16
    blocks = -(-numel // b)
    a = torch.randn(blocks, b, b, dtype=torch.float64)
    inverse = a @ a.transpose(1, 2) + 0.5 * torch.eye(b, dtype=torch.float64)
    w = torch.randn(numel, dtype=torch.float64)
    sets = torch.tensor([[0, 1, 2, 17, 40], [3, 20, 21, 22, 49], [5, 6, 7, 8, 9]])
    full = torch.block_diag(*inverse)[:numel, :numel]  # the block-diagonal F⁻¹, dense
    expected = torch.stack([0.5 * w[s] @ torch.linalg.solve(full[s][:, s], w[s]) for s in sets])
    for budget in (30, 1 << 20):  # in many small batches, or in one
        torch.testing.assert_close(group_obs_scores(w, inverse, sets, budget), expected)


def test_group_obs_scores_skip_negative_members():
    """-1 marks no member (sets of different sizes, weights the blocks do not cover)."""
    from prunekit.calibrate.fisher import group_obs_scores

    torch.manual_seed(1)
    numel, b = 40, 8
    a = torch.randn(5, b, b, dtype=torch.float64)
    inverse = a @ a.transpose(1, 2) + 0.5 * torch.eye(b, dtype=torch.float64)
    w = torch.randn(numel, dtype=torch.float64)
    sets = torch.tensor([[0, -1, 2, 17], [-1, -1, -1, -1], [5, 6, 30, -1]])
    full = torch.block_diag(*inverse)
    expected = []
    for s in sets:
        s = s[s >= 0]
        expected.append(0.5 * w[s] @ torch.linalg.solve(full[s][:, s], w[s]) if len(s) else 0.0)
    torch.testing.assert_close(
        group_obs_scores(w, inverse, sets), torch.tensor(expected, dtype=torch.float64)
    )
