"""Plugin contract v1: the public module, versioning, declared statistics and settings, the
curvature object, and check_pruner catching what breaks the contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from prunekit import api
from prunekit.errors import PluginError
from prunekit.pruners import registry
from tests.fake_plugins import GOOD, install, unique

PLUGINS = Path(__file__).parents[2] / "plugins"
BUILTINS = ["random", "magnitude", "woodfisher", "obs", "grad_norm", "snip", "grasp",
            "fisher_diag", "fisher_pruner", "fts", "fbss", "sparsegpt", "wanda"]  # fmt: skip


def _prunekit_imports(package: Path) -> set[str]:
    """Every prunekit module the package's source imports (tests excluded)."""
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n == "prunekit" or n.startswith("prunekit.")}
    return found


@pytest.mark.parametrize(
    "package", ["prunekit-example/prunekit_example", "prunekit-fishleg/prunekit_fishleg"]
)
def test_shipped_plugins_import_only_the_public_module(package):
    assert _prunekit_imports(PLUGINS / package) == {"prunekit.api"}


@pytest.mark.parametrize("name", [*BUILTINS, "lamp", "fishleg"])
def test_every_shipped_pruner_passes_check_pruner_with_real_statistics(name, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "lamp,fishleg")
    api.check_pruner(registry.load(name))


def _plugin(tmp_path, monkeypatch, source: str) -> None:
    mod = unique("contract")
    install(tmp_path, monkeypatch, "contract-plugin", {mod: source}, {"odd": f"{mod}:Odd"})
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "odd")


ODD = """
from prunekit.api import Pruner

class Odd(Pruner):
    \"\"\"An odd pruner.\"\"\"
    name = "odd"
    contract = 1
{body}
    def score(self, target, stats):
        return target.weight.detach().abs(){shape}
"""


def test_plugin_for_another_contract_version(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, ODD.format(body="    contract = 2", shape=""))
    with pytest.raises(PluginError, match=r"written for plugin contract 2.*speaks contract 1"):
        registry.load("odd")


def test_unknown_statistic_is_caught_at_load_and_by_check_pruner(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, ODD.format(body='    needs = frozenset({"fisher_invv"})',
                                               shape=""))  # fmt: skip
    with pytest.raises(PluginError, match="needs fisher_invv, which prunekit does not collect"):
        registry.load("odd")
    namespace: dict = {}
    exec(ODD.format(body='    needs = frozenset({"fisher_invv"})', shape=""), namespace)
    with pytest.raises(AssertionError, match="unknown statistics"):
        api.check_pruner(namespace["Odd"])


def test_check_pruner_catches_a_wrong_score_shape():
    namespace: dict = {}
    exec(ODD.format(body="", shape=".transpose(0, 1)"), namespace)
    with pytest.raises(AssertionError, match=r"score for .* has shape"):
        api.check_pruner(namespace["Odd"])


def test_stats_params_must_be_declared_and_are_never_matched_by_name():
    namespace: dict = {}
    body = '    params = (Param("damp", 0.5, "a knob of its own"),)'
    exec(ODD.format(body=body, shape="").replace("import Pruner", "import Param, Pruner"),
         namespace)  # fmt: skip
    odd = namespace["Odd"]
    api.check_pruner(odd)
    assert odd(damp="0.7").stats_spec().damp == api.StatsSpec().damp  # not picked up by name
    odd.stats_params = ("damp", "num_grads")
    with pytest.raises(AssertionError, match="num_grads, which is not one of params"):
        api.check_pruner(odd)


def test_block_inverse_against_the_dense_matrix():
    torch.manual_seed(0)
    numel, size = 10, 4
    blocks = []
    for _ in range(3):
        a = torch.randn(size, size, dtype=torch.float64)
        blocks.append(a @ a.T + size * torch.eye(size, dtype=torch.float64))
    inverse = api.BlockInverse(torch.stack(blocks), numel)
    dense = torch.block_diag(*blocks)[:numel, :numel]
    v = torch.randn(numel, dtype=torch.float64)
    torch.testing.assert_close(inverse.diag(), dense.diagonal())
    torch.testing.assert_close(inverse.matvec(v), dense @ v)
    # solve inverts the blocks; the cut-off padding rows decouple in the last block only
    # through zero entries of v, so compare on the full (padded) block structure
    full = torch.block_diag(*blocks)
    padded = torch.nn.functional.pad(v, (0, 12 - numel))
    torch.testing.assert_close(inverse.solve(v), torch.linalg.solve(full, padded)[:numel])
    many = torch.randn(numel, 3, dtype=torch.float64)
    torch.testing.assert_close(inverse.matvec(many), dense @ many)


def test_block_inverse_covering_the_unpruned_weights_against_the_dense_matrix():
    """Blocks over the covered coordinates only; H = 1/λ (``outside``) on the others."""
    torch.manual_seed(0)
    numel, size, damp = 12, 3, 0.5
    index = torch.tensor([0, 2, 3, 5, 6, 7, 9, 11])  # 8 covered: blocks of 3, 3, 2 (+1 pad)
    blocks = []
    for _ in range(3):
        a = torch.randn(size, size, dtype=torch.float64)
        blocks.append(a @ a.T + size * torch.eye(size, dtype=torch.float64))
    inverse = api.BlockInverse(torch.stack(blocks), numel, index, 1 / damp)
    dense = torch.eye(numel, dtype=torch.float64) / damp
    inner = torch.block_diag(*blocks)[: len(index), : len(index)]
    dense[index[:, None], index[None, :]] = inner
    v = torch.randn(numel, dtype=torch.float64)
    torch.testing.assert_close(inverse.diag(), dense.diagonal())
    torch.testing.assert_close(inverse.matvec(v), dense @ v)
    many = torch.randn(numel, 2, dtype=torch.float64)
    torch.testing.assert_close(inverse.matvec(many), dense @ many)
    # the last block's padding decouples only through zero entries: make v zero there
    w = torch.randn(numel, dtype=torch.float64)
    full = torch.block_diag(*blocks)
    padded = torch.nn.functional.pad(w[index], (0, 1))
    expected = w * damp
    expected[index] = torch.linalg.solve(full, padded)[: len(index)]
    torch.testing.assert_close(inverse.solve(w), expected)
    assert inverse.cpu().index is not None and inverse.covered == 8


def test_good_plugin_from_the_authoring_guide_passes(tmp_path, monkeypatch):
    mod = unique("good")
    install(tmp_path, monkeypatch, "good-plugin", {mod: GOOD.format(name="fixed")},
            {"fixed": f"{mod}:Fixed"})  # fmt: skip
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "fixed")
    api.check_pruner(registry.load("fixed"))


def test_the_plugin_guide_example_passes_check_pruner():
    import re

    guide = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(.*?)```", guide, re.S)[1]
    namespace: dict = {}
    exec(code, namespace)
    api.check_pruner(namespace["DiagOBS"])


def test_the_plugin_guide_layer_wise_example_passes_check_pruner_and_prunes_layer_by_layer():
    import re

    text = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    guide = text[text.index("calibrate-then-compress form instead") :]
    code = re.search(r"```python\n(.*?)```", guide, re.S)[1]
    namespace: dict = {"torch": torch}
    exec(code, namespace)
    cls = namespace["KeepLargestReconstructed"]
    api.check_pruner(cls)
    from prunekit.engine.masks import find_targets
    from prunekit.engine.step import Pruning, prune_step
    from prunekit.testing import tiny_data, tiny_model

    model = tiny_model()
    targets, _ = find_targets(model)
    prune_step(Pruning.of(model, targets, cls(), tiny_data(), torch.device("cpu"), "layer"), 0.5)
    for t in targets:  # exactly half of every layer, zeros written by prunekit
        assert int((~t.mask).sum()) == t.numel // 2
        assert torch.all(t.weight.detach()[~t.mask] == 0)


def test_plugin_written_before_contracts_is_refused(tmp_path, monkeypatch):
    old = ODD.format(body="", shape="").replace("    contract = 1\n", "")
    _plugin(tmp_path, monkeypatch, old)
    with pytest.raises(PluginError, match=r"no plugin contract \(prunekit before contract 1\)"):
        registry.load("odd")


def test_check_pruner_catches_bad_updates():
    base = ODD.format(body="", shape="")
    nan_update = base + (
        "    def update(self, target, keep, stats):\n"
        "        return target.weight.detach() * float('nan')\n"
    )
    in_place = base + (
        "    def update(self, target, keep, stats):\n"
        "        target.weight.data.mul_(2)\n"
        "        return None\n"
    )
    for source, message in ((nan_update, "has NaN or Inf"), (in_place, "must not modify")):
        namespace: dict = {}
        exec(source, namespace)
        with pytest.raises(AssertionError, match=message):
            api.check_pruner(namespace["Odd"])
