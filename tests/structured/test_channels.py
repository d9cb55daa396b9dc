"""Channel dependency groups by hand, and structural surgery that changes nothing but shapes:
the shrunk model's outputs equal those of the full model with the group masks applied."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from prunekit.load.cifar_resnet import cifar_resnet
from prunekit.structured.groups import find_groups
from prunekit.structured.surgery import group_masks, shrink


class Net(nn.Module):
    """A residual add, a depthwise conv on the joined stream, and flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.bn_a(self.a(x))
        x = torch.relu(self.b(self.dw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def _described(model: nn.Module, x: torch.Tensor) -> tuple[set, list[str]]:
    groups, left = find_groups(model, x)
    described = {
        (g.channels, frozenset((m.module, m.role, m.block) for m in g.members)) for g in groups
    }
    return described, left


def test_groups_of_a_residual_add_a_depthwise_conv_and_a_flatten():
    described, left = _described(Net(), torch.randn(2, 3, 8, 8))
    stream = {("stem", "out", 1), ("bn", "channel", 1), ("a", "in", 1), ("a", "out", 1),
              ("bn_a", "channel", 1), ("dw", "channel", 1), ("b", "in", 1)}  # fmt: skip
    flattened = {("b", "out", 1), ("fc", "in", 16)}  # 4x4 features per channel
    assert described == {(8, frozenset(stream)), (6, frozenset(flattened))}
    assert left == []  # fc makes the logits, the model's output: left whole, no warning


def test_groups_of_a_torchvision_resnet_block():
    described, left = _described(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    by_producers = {
        frozenset(m for m, role, _ in members if role == "out"): channels
        for channels, members in described
    }
    # the stage's residual stream: stem/downsample and every block's conv2 share one axis
    assert by_producers[frozenset({"layer2.0.conv2", "layer2.0.downsample.0",
                                   "layer2.1.conv2"})] == 128  # fmt: skip
    assert by_producers[frozenset({"conv1", "layer1.0.conv2", "layer1.1.conv2"})] == 64
    assert by_producers[frozenset({"layer3.1.conv1"})] == 256  # inside a block
    assert len(by_producers) == 12 and left == []


def test_option_a_shortcuts_make_the_residual_stream_one_group_across_its_widths():
    groups, left = find_groups(cifar_resnet("resnet20"), torch.randn(2, 3, 32, 32))
    assert left == [] and len(groups) == 10  # each block's inner channels, and the stream
    stream = next(g for g in groups if g.channels == 64)
    held = {(m.module, m.role): m.index for m in stream.members}
    # numbered along the widest width: the zero-padded shortcuts put the 16 channels of
    # stage 1 in the middle of stage 2's 32 (8..23), and those in the middle of stage 3's 64
    assert held["conv1", "out"] == tuple(range(24, 40))
    assert held["layer2.0.conv2", "out"] == held["layer2.2.conv1", "in"] == tuple(range(16, 48))
    assert held["layer3.0.conv2", "out"] is None and held["linear", "in"] is None  # 0..63
    maps = [m for m in stream.members if m.role == "map"]
    assert [m.module for m in maps] == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert maps[0].source == tuple(range(24, 40)) and maps[0].index == tuple(range(16, 48))


class Dense(nn.Module):
    """DenseNet-style: features concatenated along channels, read by later layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.b = nn.Conv2d(10, 5, 1)
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.a(x))], 1)  # 6 + 4
        x = torch.cat((torch.relu(self.bn(x)), self.b(x)), dim=1)  # 10 + 5
        return self.fc(x.mean((2, 3)))


def test_concatenated_channels_are_the_channels_of_the_parts():
    groups, left = find_groups(Dense(), torch.randn(2, 3, 8, 8))
    assert left == [] and len(groups) == 1  # the parts of the last concatenation: one group
    (group,) = groups
    held = {(m.module, m.role): m.index for m in group.members}
    assert group.channels == 15 and held["fc", "in"] is None  # numbered along the widest
    assert held["stem", "out"] == held["a", "in"] == tuple(range(6))
    assert held["a", "out"] == tuple(range(6, 10))
    assert held["b", "in"] == held["bn", "channel"] == tuple(range(10))
    assert held["b", "out"] == tuple(range(10, 15))


@pytest.mark.parametrize(
    "build, size",
    [
        (Net, 8),
        (lambda: cifar_resnet("resnet20"), 32),
        (torchvision.models.resnet18, 32),
        (torchvision.models.mobilenet_v2, 32),
        (Dense, 8),
    ],
    ids=["net", "cifar-resnet20", "resnet18", "mobilenet_v2", "concatenation"],
)
def test_the_shrunk_model_computes_what_the_masked_model_computes(build, size):
    torch.manual_seed(0)
    model = build().double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(1)
    kept = {}
    masked = {}
    for g in groups:
        keep = torch.randperm(g.channels, generator=generator)[: max(1, g.channels // 2)].sort()[0]
        kept[id(g)] = keep
        for name, mask in group_masks(modules, g, keep).items():
            masked[name] = masked[name] & mask if name in masked else mask
    with torch.no_grad():
        dense = model(x)
        for name, mask in masked.items():
            param = model.get_parameter(name)
            param.mul_(mask)
        expected = model(x)
        before = sum(p.numel() for p in model.parameters())
        for g in groups:
            shrink(modules, g, kept[id(g)])
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(dense, expected)  # the channels did matter
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before


def test_channel_sets_are_the_weights_the_group_masks_remove():
    from prunekit.structured.plan import channel_sets

    model = Net()
    groups, _ = find_groups(model, torch.randn(2, 3, 8, 8))
    modules = dict(model.named_modules())
    for g in groups:
        keep = torch.tensor([0, g.channels - 1])
        from_sets: dict[str, torch.Tensor] = {}
        for m in g.members:
            if m.role == "channel":
                continue
            weight = modules[m.module].weight
            sets = channel_sets(weight.shape, g.channels, m.role, m.block)
            assert sets.shape[0] == g.channels and len(set(sets.flatten().tolist())) == sets.numel()
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[sets[keep].flatten()] = True
            name = f"{m.module}.weight"  # "a" both makes and reads the stream: rows & columns
            mask = mask.reshape(weight.shape)
            from_sets[name] = from_sets[name] & mask if name in from_sets else mask
        masks = group_masks(modules, g, keep)
        assert from_sets.keys() == masks.keys()
        assert all(torch.equal(from_sets[n], masks[n]) for n in masks)


class _NoAffine(nn.Module):  # BatchNorm without weights
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.d = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8, affine=False),
            nn.Conv2d(8, 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.bn(self.c(x)))).mean((2, 3))


class _LastAxis(nn.Module):  # a Linear over the width of (N, C, H, W): not channel c
    def __init__(self) -> None:
        super().__init__()
        self.c, self.l = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.c(x)).flatten(1)


class _WeightReused(nn.Module):  # c's weight also used directly
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = nn.functional.conv2d(x, self.c.weight[:4], padding=1)
        return (self.d(torch.relu(self.c(x))) + direct).mean((2, 3))


class _Noisy(nn.Module):  # a branch taken only in training
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if self.training:
            x = x + 0.01 * torch.randn_like(x)
        return self.fc(self.b(x).mean((2, 3)))


def test_groups_are_safe_where_a_layer_reads_another_axis_or_a_weight_is_reused():
    from prunekit.structured.plan import reapply

    x = torch.randn(2, 3, 8, 8)
    described, _ = _described(_NoAffine(), x)
    assert len(described) == 1  # BatchNorm without affine parameters still passes channels
    model = _NoAffine()
    groups, _ = find_groups(model, x)
    shrink(dict(model.named_modules()), groups[0], torch.tensor([1, 5]))
    assert model(x).shape == (2, 4) and model.bn.running_mean.shape == (2,)
    for build, left_whole in ((_LastAxis, ["c", "l"]), (_WeightReused, ["c"])):
        groups, left = find_groups(build(), x)
        assert groups == [] and left == left_whole
    model = _Noisy()  # built in training mode, as on load: traced in eval mode regardless
    reapply(model, torch.zeros(1, 3, 4, 4), {"a": [0, 1, 2, 3]}, "f.safetensors")
    assert model.a.out_channels == 4 and model.training


@pytest.mark.parametrize("mode", ["layer", "global"])
def test_every_width_of_a_residual_stream_keeps_a_rounded_count(mode):
    from prunekit.engine.masks import find_targets
    from prunekit.pruners.magnitude import MagnitudePruner
    from prunekit.structured.plan import ChannelPlan

    model = cifar_resnet("resnet20")
    targets, _ = find_targets(model)
    plan = ChannelPlan.of(model, torch.randn(1, 3, 32, 32), targets, multiple=4)
    for t in targets:  # scores that favour no width: the weights' L1 norms
        plan.add_scores(t, MagnitudePruner(), {})
    plan.select(0.5, mode)
    plan.shrink()
    widths = [model.conv1.out_channels, model.layer2[0].conv2.out_channels,
              model.layer3[0].conv2.out_channels]  # fmt: skip
    assert all(w % 4 == 0 for w in widths)
    if mode == "layer":
        assert widths == [8, 16, 32]  # half of each width
    else:
        assert any("--mask global ranks" in w for w in plan.warnings)
