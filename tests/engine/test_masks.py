import pytest
import torch

from prunekit.engine.masks import apply, find_targets, nm_misfits, select, sparsity_of
from prunekit.errors import NumericalError, UsageError
from prunekit.pruners.magnitude import MagnitudePruner


def magnitude_masks(model, sparsity, mode, exclude=()):
    targets, unused = find_targets(model, exclude)
    pruner = MagnitudePruner()
    keep = select(targets, {t.name: pruner.score(t, {}) for t in targets}, sparsity, mode)
    return targets, keep, unused


def test_global_mask_is_one_threshold(hand_model):
    # |w| over both layers: 0.1 0.2 0.5 1 2 3 4 6 -> 50 % removes 0.1 0.2 0.5 1
    targets, keep, _ = magnitude_masks(hand_model, 0.5, "global")
    assert [t.name for t in targets] == ["0.weight", "2.weight"]
    assert keep["0.weight"].tolist() == [[False, True, False], [True, False, True]]
    assert keep["2.weight"].tolist() == [[False, True]]


def test_layer_mask_prunes_each_tensor(hand_model):
    # 0.weight: round(0.5*6)=3 go (0.1 0.5 1); 2.weight: round(0.5*2)=1 goes (0.2)
    _, keep, _ = magnitude_masks(hand_model, 0.5, "layer")
    assert keep["0.weight"].tolist() == [[False, True, False], [True, False, True]]
    assert keep["2.weight"].tolist() == [[False, True]]
    # at 0.7 the layers differ from global: round(4.2)=4 and round(1.4)=1
    _, keep, _ = magnitude_masks(hand_model, 0.7, "layer")
    assert keep["0.weight"].tolist() == [[False, True, False], [False, False, True]]
    assert keep["2.weight"].tolist() == [[False, True]]
    _, keep, _ = magnitude_masks(hand_model, 0.7, "global")  # round(5.6)=6 of 8 go
    assert keep["0.weight"].tolist() == [[False, True, False], [False, False, False]]
    assert keep["2.weight"].tolist() == [[False, True]]


def test_apply_zeroes_exactly_and_reports_sparsity(hand_model):
    targets, keep, _ = magnitude_masks(hand_model, 0.5, "global")
    apply(targets, keep)
    assert hand_model[0].weight.tolist() == [[0.0, -4.0, 0.0], [-2.0, 0.0, 3.0]]
    assert hand_model[2].weight.tolist() == [[0.0, -6.0]]
    achieved, per_tensor = sparsity_of(targets)
    assert achieved == 0.5
    assert per_tensor == {"0.weight": 0.5, "2.weight": 0.5}


def test_pruned_weights_stay_pruned(hand_model):
    targets, keep, _ = magnitude_masks(hand_model, 0.5, "global")
    apply(targets, keep)
    # scores that now favour the pruned weights must not bring them back
    reversed_scores = {t.name: -t.weight.detach().abs() for t in targets}
    keep2 = select(targets, reversed_scores, 0.5, "global")
    assert all(torch.equal(keep2[n], keep[n]) for n in keep)


def test_ties_broken_by_position():
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    _, keep, _ = magnitude_masks(model, 0.5, "global")
    assert keep["weight"].tolist() == [[False, False, True, True]]


def test_exclude_glob(hand_model):
    targets, keep, unused = magnitude_masks(hand_model, 0.5, "global", ("2.*", "nothing.*"))
    assert [t.name for t in targets] == ["0.weight"]
    assert unused == ["nothing.*"]
    assert keep["0.weight"].sum() == 3


def test_nan_scores_name_the_tensor(hand_model):
    targets, _ = find_targets(hand_model)
    scores = {t.name: torch.ones_like(t.weight) for t in targets}
    scores["2.weight"][0, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"2\.weight"):
        select(targets, scores, 0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_range(hand_model, bad):
    targets, _ = find_targets(hand_model)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        select(targets, {t.name: t.weight for t in targets}, bad)


def test_tied_weights_are_one_target():
    first = torch.nn.Linear(3, 3)
    second = torch.nn.Linear(3, 3)
    second.weight = first.weight
    targets, _ = find_targets(torch.nn.Sequential(first, torch.nn.ReLU(), second))
    assert [t.name for t in targets] == ["0.weight"]


def test_n_of_m_keeps_the_best_n_of_every_m_inputs():
    model = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 0.3]]))
    _, keep, _ = magnitude_masks(model, 0.5, "2:4")
    assert keep["weight"].tolist() == [[False, True, True, False], [True, False, False, True]]
    with pytest.raises(UsageError, match=r"pass --sparsity 0\.5"):
        magnitude_masks(model, 0.9, "2:4")
    with pytest.raises(UsageError, match="not a multiple of 3"):
        magnitude_masks(model, 1 - 1 / 3, "1:3")
    with pytest.raises(UsageError, match="use global, layer or N:M"):
        magnitude_masks(model, 0.5, "4:2")


def test_declined_targets_keep_their_mask(hand_model):
    targets, _ = find_targets(hand_model)
    scores = {"0.weight": None, "2.weight": hand_model[2].weight.abs()}
    for mode in ("global", "layer"):
        keep = select(targets, scores, 0.5, mode)
        assert keep["0.weight"].all()
        assert keep["2.weight"].tolist() == [[False, True]]


def _kept_in_channel_groups(keep: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights per group of m input channels at each kernel position (out, kh, kw, g)."""
    out, inputs, kh, kw = keep.shape
    return keep.permute(0, 2, 3, 1).reshape(out, kh, kw, inputs // m, m).sum(-1)


def test_n_of_m_on_a_convolution_runs_along_input_channels_at_each_kernel_position():
    """Item 2 of the new-user trial: 2:4 on a Conv2d is checked in the layout sparse kernels
    use (input channels at each kernel position); the flattened-row layout only if asked."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 4, 3, bias=False)
    _, keep, _ = magnitude_masks(conv, 0.5, "2:4")
    assert bool((_kept_in_channel_groups(keep["weight"], 4) == 2).all())
    # the oracle: in every group the two largest magnitudes, found by a plain loop
    w = conv.weight.detach().abs()
    for o in range(4):
        for y in range(3):
            for x in range(3):
                for g in range(2):
                    values = w[o, 4 * g : 4 * g + 4, y, x]
                    best = set(values.topk(2).indices.tolist())
                    kept = set(
                        keep["weight"][o, 4 * g : 4 * g + 4, y, x].nonzero().flatten().tolist()
                    )
                    assert kept == best
    flat = magnitude_masks(conv, 0.5, "2:4:flat")[1]["weight"]
    assert bool((flat.reshape(4, -1, 4).sum(-1) == 2).all())
    broken = float((_kept_in_channel_groups(flat, 4) != 2).float().mean())
    assert broken > 0.2  # the old layout breaks the channel pattern (31 % on the trial's model)
    with pytest.raises(UsageError, match="use global, layer or N:M"):
        magnitude_masks(conv, 0.5, "2:4:rows")


def test_n_of_m_misfits_follow_the_layout():
    # 2 input channels x 2x2 kernel: a row of 8 divides into 4s, the channels do not
    conv = torch.nn.Conv2d(2, 4, 2)
    targets, _ = find_targets(torch.nn.Sequential(conv))
    assert nm_misfits(targets, "2:4") == targets
    assert nm_misfits(targets, "2:4:flat") == []
    assert nm_misfits(find_targets(torch.nn.Linear(8, 2))[0], "2:4") == []


def test_sparsegpt_2_of_4_on_a_convolution_follows_the_channel_layout():
    from prunekit.contract.pruner import LayerRequest
    from prunekit.contract.target import nm_columns
    from prunekit.pruners.layerwise import SparseGPTPruner, sparsegpt

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(8, 3, 3, bias=False)
    (target,), _ = find_targets(torch.nn.Sequential(conv))
    x = torch.randn(64, 72, dtype=torch.float64)
    gram = x.T @ x
    columns = nm_columns(conv.weight.shape)
    assert columns is not None
    pruner = SparseGPTPruner()
    pruner.hparams = {"block_size": 128, "damp": 0.01}
    result = pruner.compress(target, gram, LayerRequest(0.5, (2, 4), None, columns))
    assert bool((_kept_in_channel_groups(result.keep, 4) == 2).all())
    # the oracle: SparseGPT on the columns reordered by hand, then put back
    matrix = conv.weight.detach().reshape(3, -1)
    new, keep = sparsegpt(matrix[:, columns], gram[columns][:, columns], 0.5, (2, 4), 128, 0.01)
    back = torch.argsort(columns)
    assert torch.equal(result.keep.reshape(3, -1), keep[:, back])
    assert result.weight is not None
    torch.testing.assert_close(result.weight.reshape(3, -1), new[:, back])
