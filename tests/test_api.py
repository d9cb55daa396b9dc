"""The Python API: the README's example runs as written, masks hold in a user's own loop, and
run recipes repeat a run's masks exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from tests.cli_helpers import assert_error, invoke, prune_report

GUIDE = Path(__file__).parents[1] / "docs" / "guides" / "python-api.md"


def _readme_block(marker: str) -> str:
    text = GUIDE.read_text()
    match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"{GUIDE.name} has no python block after <!-- {marker} -->"
    return match[1]


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import numpy_helper

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_block("api-example"), "python-api.md api-example", "exec"), namespace)
    printed = capsys.readouterr().out.split("\n")
    assert printed[0].startswith("0.5 ") and printed[1] == "True"
    model, masks = namespace["model"], namespace["result"].masks
    assert not any(n.endswith("original") for n, _ in model.named_parameters())  # detached
    for name, keep in masks.items():  # the pruned weights stayed exactly zero while training
        weight = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.all(weight[~keep] == 0) and weight[keep].ne(0).float().mean() > 0.99
    proto = onnx.load("squeezenet-pruned.onnx")
    dense = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    sparse = {s.values.name for s in proto.graph.sparse_initializer}
    name = "features.3.expand3x3.weight"
    assert name in sparse or np.count_nonzero(dense[name] == 0) >= int((~masks[name]).sum())


def test_hold_masks_in_a_plain_loop_with_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)  # made before
    keep = {"0.weight": torch.rand(16, 8) > 0.5, "2.weight": torch.rand(3, 16) > 0.5}
    handle = prunekit.hold_masks(model, keep)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.remove()
    assert torch.all(model[0].weight[~keep["0.weight"]] == 0)
    assert torch.all(model[2].weight[~keep["2.weight"]] == 0)
    assert model[0].weight[keep["0.weight"]].ne(0).all()
    assert {n for n, _ in model.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_api_prune_matches_the_cli_on_the_same_data(tmp_path):
    """The CLI is a layer over the API: same model, data and pruner, same masks."""
    from prunekit.load.data import load_data
    from prunekit.load.models import load_model

    cli = prune_report("sample:digits-mlp", "-p", "snip", "-s", "0.8", "--out", str(tmp_path / "o"))
    splits = load_data("digits")
    model = load_model("sample:digits-mlp").model
    x, y = splits.train.tensors  # type: ignore[attr-defined]
    result = prunekit.prune(model, "snip", 0.8, (x, y), test_data=splits.test.tensors)
    assert result.report["sparsity"]["per_tensor"] == cli["sparsity"]["per_tensor"]
    assert result.report["accuracy"] == cli["accuracy"]


def test_api_bad_input_is_a_prunekit_error():
    from prunekit.errors import PrunekitError

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(PrunekitError, match="labels up to 5 but the model has 2 outputs"):
        prunekit.prune(model, "magnitude", 0.5, (torch.randn(8, 4), torch.arange(8) % 6))
    with pytest.raises(PrunekitError, match="sparsity must be in"):
        prunekit.prune(model, "magnitude", 1.5, (torch.randn(8, 4), torch.arange(8) % 2))


def _masks_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v != 0 for k, v in load_file(folder / "model.safetensors").items()}


def test_config_from_a_report_repeats_the_masks_exactly(tmp_path):
    first = tmp_path / "a"
    args = ("sample:digits-cnn", "-p", "woodfisher", "-s", "0.8", "--param", "num_grads=64")
    report = prune_report(*args, "--schedule", "gradual", "--steps", "2", "--out", str(first))
    recipe = report["recipe"]
    assert recipe["params"]["num_grads"] == 64 and recipe["params"]["damp"] == 0.01
    assert recipe["schedule"]["kind"] == "gradual" and "out" not in recipe
    again = prune_report("--config", str(first / "report.json"), "--out", str(tmp_path / "b"))
    assert again["recipe"] == recipe
    one, two = _masks_of(first), _masks_of(tmp_path / "b")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    from_python = prunekit.run_recipe(first / "report.json", out=str(tmp_path / "d"))
    assert from_python["recipe"] == recipe
    three = _masks_of(tmp_path / "d")
    assert all(torch.equal(one[k], three[k]) for k in one)
    # an option given on the command line overrides the recipe
    other = prune_report("--config", str(first / "report.json"), "-s", "0.5",
                         "--out", str(tmp_path / "c"))  # fmt: skip
    assert other["sparsity"]["target"] == 0.5 and other["pruner"] == "woodfisher"


TOML = """
model = "sample:digits-mlp"
pruner = "magnitude"
sparsity = 0.7
mask = "layer"
[schedule]
kind = "oneshot"
finetune_epochs = 1
[schedule.train]
lr = 0.01
batch_size = 32
"""


def test_toml_recipe(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    report = prune_report("--config", str(path), "--out", str(tmp_path / "o"))
    assert report["mask"] == "layer" and report["sparsity"]["target"] == 0.7
    assert report["recipe"]["schedule"]["train"]["batch_size"] == 32
    assert [h["phase"] for h in report["history"]][-1] == "fine-tune"


def test_bad_recipes(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text(TOML.replace("mask =", "masks ="))
    unknown = "masks: unknown option (did you mean mask"
    assert_error(invoke("prune", "--config", str(typo)), 2, unknown)
    nested = tmp_path / "nested.toml"
    nested.write_text(TOML.replace("batch_size", "batchsize"))
    unknown = "schedule.train.batchsize: unknown"
    assert_error(invoke("prune", "--config", str(nested)), 2, unknown, "batch_size")
    broken = tmp_path / "broken.toml"
    broken.write_text("model = ")
    assert_error(invoke("prune", "--config", str(broken)), 2, "cannot be parsed")
    assert_error(invoke("prune", "-p", "magnitude"), 2, "the run needs model, sparsity")
    assert_error(invoke("prune", "--config", str(tmp_path / "no.toml")), 2, "does not exist")
    json_recipe = tmp_path / "r.json"
    json_recipe.write_text(json.dumps({"model": "sample:digits-mlp", "pruner": "magnitude"}))
    assert_error(invoke("prune", "--config", str(json_recipe)), 2, "the run needs sparsity")


# Flags whose meaning differs by command, so each command declares its own: --out is a run's
# folder (prune, sweep) or one file (export); --weights the run's start or the parity model's;
# --data the run's data or the export's input shape.
PER_COMMAND = {
    "--out",
    "--weights",
    "--data",
    "--pruner",
    "--sparsities",
    "--seed",
}  # their own per command


def test_every_shared_option_is_declared_once():
    import typer

    from prunekit.cli import app

    def commands(group, prefix=""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    helps: dict[str, set[str]] = {}
    for _, command in commands(typer.main.get_command(app)):
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("--") and flag not in {"--help"}:
                    helps.setdefault(flag, set()).add(param.help or "")
    repeated = {f: h for f, h in helps.items() if len(h) > 1 and f not in PER_COMMAND}
    assert not repeated, f"options declared more than once, with different texts: {repeated}"
    source = "".join(p.read_text() for p in (Path(prunekit.__file__).parent / "cli").glob("*.py"))
    declared = re.findall(r'(?:typer\.Option\(|_opt\()[^)]*?"(--[a-z][a-z-]*)"', source, re.S)
    doubled = {f for f in declared if declared.count(f) > 1} - PER_COMMAND
    assert not doubled, f"flags written in more than one declaration: {doubled}"


def test_cli_holds_no_library_logic():
    """Each command module only parses options and prints: no torch, no file formats."""
    cli = Path(prunekit.__file__).parent / "cli"
    for path in cli.glob("*.py"):
        text = path.read_text()
        for forbidden in (
            "import torch",
            "import safetensors",
            "from safetensors",
            "import onnx",
            "load_state_dict",
            "read_metadata",
            "os.path.relpath",
            "Collector",
        ):
            assert forbidden not in text, f"{path.name} holds library logic ({forbidden})"


def test_hold_masks_edge_cases():
    from torch.nn.utils import parametrizations

    from prunekit.errors import UsageError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight  # one weight, two modules (tied)
    keep = torch.rand(4, 4) > 0.5
    with prunekit.hold_masks(model, {"0.weight": keep.float() * 2}):  # a 0/2 mask is bool too
        assert torch.all(model[2].weight[~keep] == 0) and torch.all(model[0].weight[~keep] == 0)
        assert torch.equal(model[2].weight, model[0].weight)
    assert model[0].weight is model[2].weight and torch.all(model[0].weight[~keep] == 0)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrizations.weight_norm(other[1])
    masks = {"0.weight": torch.ones(4, 4, dtype=torch.bool), "1.weight": torch.ones(2, 4) > 0}
    with pytest.raises(UsageError, match="already has a parametrization"):
        prunekit.hold_masks(other, masks)
    assert not hasattr(other[0], "parametrizations")  # nothing half-held


def test_prune_leaves_the_callers_random_state_and_takes_loaders():
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = prunekit.prune(model, "random", 0.5, DataLoader(TensorDataset(x, y)), seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert result.report["accuracy"]["dense"] is not None
    unlabeled = prunekit.prune(nn.Sequential(nn.Linear(4, 3)), "magnitude", 0.5, x)
    assert unlabeled.report["accuracy"] == {"dense": None, "pruned": None}
    with pytest.raises(prunekit_errors().UsageError, match="set them on the instance"):
        prunekit.prune(model, registry_create("magnitude"), 0.5, (x, y), params={"a": 1})


def prunekit_errors():
    import prunekit.errors

    return prunekit.errors


def registry_create(name: str):
    from prunekit.pruners import registry

    return registry.create(name)


def test_recipe_values_are_checked_and_read_like_the_cli(tmp_path):
    def run(text: str, *extra: str):
        path = tmp_path / "r.toml"
        path.write_text('model = "sample:digits-mlp"\npruner = "magnitude"\n' + text)
        return invoke("prune", "--config", str(path), *extra, "--out", str(tmp_path / "o"))

    assert_error(run('sparsity = "0.5"\n'), 2, "r.toml: sparsity: input should be a valid number")
    assert_error(run('sparsity = 0.5\nschedule = "gradual"\n'), 2, "schedule: input should be")
    assert_error(run("sparsity = 0.5\n[schedule]\nsteps = 2.5\n"), 2, "steps: input should be")
    # a value of the wrong kind is refused, never coerced (true is not 1, 10.7 is not 10)
    for text, fragment in [
        ("sparsity = 0.5\nexclude = 5\n", "exclude: input should be a valid array"),
        ("sparsity = 0.5\nseed = 1e23\n", "seed: input should be a valid integer"),
        ("sparsity = 0.5\nseed = 99999999999999999999\n", "give an integer from 0"),
        ("sparsity = nan\n", "sparsity: input should be a finite number"),
        ("sparsity = 0.5\n[params]\ndamp = {a = 1}\n", "params.damp: input should be a string"),
        ("sparsity = 0.5\nmemory_budget = 0\n", "--memory-budget 0: give an integer"),
        ("sparsity = 0.5\nmax_length = 0\n", "--max-length 0: give an integer"),
        ("sparsity = 0.5\n[schedule.train]\nbatch_size = 10.7\n", "batch_size: input should"),
        ("sparsity = 0.5\nstarted = 2024-01-01\n", "r.toml"),
        ("sparsity = 0.5\nint = 1\nfoo = 2\n", "int: unknown option"),  # not a union's tag
    ]:
        assert_error(run(text), 2, fragment)
    for value in ("true", "10.7"):
        text = f"sparsity = 0.5\n[params]\nnum_grads = {value}\n"
        assert_error(run(text, "-p", "woodfisher"), 2, "num_grads", "expected an integer")
    result = run('sparsity = 0.5\nexclude = "net.5.*"\nmemory_budget = "1GiB"\n'
                 '[schedule]\nrecompute = "auto"\n', "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "net.5.weight" not in report["sparsity"]["per_tensor"]
    assert report["recipe"]["memory_budget"] == 2**30


def test_recipe_never_trusts_and_records_absolute_paths(tmp_path, monkeypatch):
    from prunekit.load.models import load_model

    monkeypatch.chdir(tmp_path)
    torch.save(load_model("sample:digits-mlp").model, "whole.pt")
    args = ("sample:digits-mlp", "-p", "magnitude", "-s", "0.5", "--weights", "whole.pt")
    report = prune_report(*args, "--trust-checkpoint", "--out", "a")
    assert "trust_checkpoint" not in report["recipe"]
    assert report["recipe"]["weights"] == str(tmp_path / "whole.pt")
    recipe = json.loads(Path("a/report.json").read_text())
    recipe["recipe"]["trust_checkpoint"] = True  # a file cannot turn it on
    Path("a/report.json").write_text(json.dumps(recipe))
    assert_error(invoke("prune", "--config", "a", "--out", "b"), 2, "safe loading refuses")
    assert prune_report("--config", "a", "--out", "c", "--trust-checkpoint")["weights"]


def test_config_with_another_pruner_keeps_only_its_params(tmp_path):
    first = tmp_path / "a"
    prune_report("sample:digits-mlp", "-p", "woodfisher", "-s", "0.5", "--param", "num_grads=32",
                 "--out", str(first))  # fmt: skip
    report = prune_report("--config", str(first), "-p", "obs", "--out", str(tmp_path / "b"))
    assert report["pruner"] == "obs" and report["params"]["num_grads"] == 32
    assert "block_size" not in report["params"]


def test_importing_prunekit_and_its_cli_stays_light():
    """`import prunekit` and the CLI's start import no torch (names load on first use)."""
    import subprocess
    import sys

    probe = "import sys, prunekit, prunekit.cli; print('torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert shown.stdout.strip() == "False", shown.stderr


def test_a_recipe_never_names_code_nor_replaces_an_output_by_itself(tmp_path):
    import sys as _sys

    code = tmp_path / "code.json"
    code.write_text(json.dumps({"model": "http.server:test", "pruner": "magnitude",
                                "sparsity": 0.5, "out": str(tmp_path / "x")}))  # fmt: skip
    result = invoke("prune", "--config", str(code))
    assert_error(result, 2, "names Python code to import and run", "on the command line")
    assert "http.server" not in _sys.modules and not (tmp_path / "x").exists()
    out = tmp_path / "run"
    prune_report("sample:digits-mlp", "-p", "magnitude", "-s", "0.5", "--out", str(out))
    before = (out / "report.json").read_text()
    forced = tmp_path / "forced.json"
    forced.write_text(json.dumps({"model": "sample:digits-mlp", "pruner": "magnitude",
                                  "sparsity": 0.7, "out": str(out), "force": True}))  # fmt: skip
    assert_error(invoke("prune", "--config", str(forced)), 2, "already exists", "--force")
    assert (out / "report.json").read_text() == before
    assert prune_report("--config", str(forced), "--force")["sparsity"]["target"] == 0.7


class _Pairs(torch.utils.data.Dataset):
    """A user's Dataset: ``item(i)`` is what sample i reads as."""

    def __init__(self, item, n: int = 16) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.item(i)


@pytest.mark.parametrize(
    "item, error, fragment",
    [
        (lambda i: (torch.randn(4), torch.tensor([i % 3])), "UsageError", "shape (1,)"),
        (lambda i: (torch.randn(4), i % 3 + 50), "ModelMismatchError", "label 50, but the model"),
        (lambda i: (torch.randn(4), float(i % 3)), "UsageError", "(float) is not one class"),
        (lambda i: (torch.full((4,), float("nan")), i % 3), "UsageError", "NaN or Inf"),
        (lambda i: {"x": torch.randn(4), "y": i % 3}, "UsageError", "sample 0 is dict"),
        (lambda i: (torch.randn(4), -5), "UsageError", "label -5"),
        (lambda i: (torch.randn(4), -1 if i else 1), "UsageError", "label -1"),
        (lambda i: (torch.randn(4), True), "UsageError", "(bool) is not one class"),
        (lambda i: ([0.0] * 4, 1), "UsageError", "x is a list"),
    ],
)
def test_api_datasets_and_loaders_go_through_the_data_gate(item, error, fragment):
    """M4: a Dataset or DataLoader is checked as it is read, like a tensors file."""
    from torch.utils.data import DataLoader

    from prunekit import errors

    for data in (_Pairs(item), DataLoader(_Pairs(item), batch_size=4)):
        with pytest.raises(prunekit.PrunekitError) as caught:
            prunekit.prune(nn.Sequential(nn.Linear(4, 3)), "magnitude", 0.5, data)
        assert isinstance(caught.value, getattr(errors, error)), caught.value
        assert fragment in str(caught.value)


def test_api_empty_data_and_half_precision_are_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(prunekit.PrunekitError, match="data is empty"):
        prunekit.prune(model, "magnitude", 0.5, _Pairs(lambda i: (torch.randn(4), 0), n=0))
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    with pytest.raises(prunekit.PrunekitError, match=r"float16 weights \(0.weight\).*float\(\)"):
        prunekit.prune(model.half(), "woodfisher", 0.5, (x.half(), y))
    # a well-formed Dataset of (x, int label) prunes, with accuracy measured on it
    result = prunekit.prune(model.float(), "magnitude", 0.5, _Pairs(lambda i: (x[i], int(y[i]))))
    assert 0.0 <= result.report["accuracy"]["pruned"] <= 1.0


def test_api_export_onnx_gets_the_clis_checks(tmp_path):
    """Re-run trial: export_onnx never overwrites a file of yours, and refuses what the CLI
    refuses (shapes, precisions, NaN weights, non-modules) with a PrunekitError."""
    import copy

    import onnx

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    mine = tmp_path / "mine.onnx"
    mine.write_text("precious")
    for force in (False, True):
        with pytest.raises(prunekit.PrunekitError, match=r"not written by prunekit|already exists"):
            prunekit.export_onnx(model, mine, (1, 8, 8), force=force)
    assert mine.read_text() == "precious"
    out = tmp_path / "m.onnx"
    prunekit.export_onnx(model, out, (1, 8, 8))
    assert onnx.load(str(out)).graph.node
    with pytest.raises(prunekit.PrunekitError, match="already exists"):
        prunekit.export_onnx(model, out, (1, 8, 8))
    prunekit.export_onnx(model, out, (1, 8, 8), force=True)  # its own file: replaced
    bad = [
        ((model, tmp_path / "a.onnx", (-1, 8, 8)), "give the sizes of one sample"),
        ((model, tmp_path / "a.onnx", (1, 100000, 100000)), "at most"),
        ((model, tmp_path / "a.onnx", (1, 16, 16)), "cannot take one sample of shape"),
        ((copy.deepcopy(model).half(), tmp_path / "a.onnx", (1, 8, 8)), "float16; export a"),
        (("model", tmp_path / "a.onnx", (1, 8, 8)), "give a torch.nn.Module"),
        ((model, tmp_path, (1, 8, 8)), "is a folder"),
    ]
    for args, fragment in bad:
        with pytest.raises(prunekit.PrunekitError, match=re.escape(fragment)):
            prunekit.export_onnx(*args)
    model[1].weight.data[0, 0] = float("nan")
    with pytest.raises(prunekit.PrunekitError, match="holds NaN or Inf"):
        prunekit.export_onnx(model, tmp_path / "a.onnx", (1, 8, 8))
    assert not (tmp_path / "a.onnx").exists()


def test_api_run_recipe_file_names_no_code_and_replaces_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(
        "import pathlib\ndef fn():\n    pathlib.Path('PWNED').touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "evil:fn"\npruner = "magnitude"\nsparsity = 0.5\ndata = "digits"\n')
    with pytest.raises(prunekit.PrunekitError, match="never runs code"):
        prunekit.run_recipe(recipe, out=str(tmp_path / "a"))
    assert not (tmp_path / "PWNED").exists()
    recipe.write_text('model = "sample:digits-mlp"\npruner = "magnitude"\nsparsity = 0.3\n'
                      "force = true\n")  # fmt: skip
    prunekit.run_recipe(recipe, out=str(tmp_path / "b"))
    with pytest.raises(prunekit.PrunekitError, match="already exists"):
        prunekit.run_recipe(recipe, out=str(tmp_path / "b"))
    assert prunekit.run_recipe(recipe, out=str(tmp_path / "b"), force=True)["sparsity"]


def test_api_refuses_odd_data_and_arguments():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.randn(4), 0

    model = nn.Sequential(nn.Linear(4, 3))
    x, y = np.random.default_rng(0).random((16, 4), dtype=np.float32), np.arange(16) % 3
    result = prunekit.prune(model, "magnitude", 0.5, (x, y))  # numpy arrays are tensors
    assert result.report["sparsity"]["achieved"] == pytest.approx(0.5)
    for kwargs, fragment in [
        ({"data": Stream()}, "IterableDataset"),
        ({"data": _LyingLength()}, "could not be read (IndexError"),
        ({"data": (x, y), "recalibrate_bn": "no"}, "recalibrate_bn: input should be a valid bool"),
        ({"data": (x, y), "schedule": "gradual"}, "give a prunekit.ScheduleConfig"),
        ({"data": (x, y), "pruner": None}, "give a name or a Pruner instance"),
    ]:
        args = {"model": model, "pruner": "magnitude", "sparsity": 0.5, **kwargs}
        with pytest.raises(prunekit.PrunekitError, match=re.escape(fragment)):
            prunekit.prune(**args)
    with pytest.raises(prunekit.PrunekitError, match=r"give a torch\.nn\.Module"):
        prunekit.validate_onnx("m.onnx", (x, y), torch_model="evil:fn")


class _LyingLength(torch.utils.data.Dataset):
    """Says it has 32 samples and has 8."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        return [(torch.randn(4), j % 3) for j in range(8)][i]


def test_a_model_in_another_precision_than_the_data_is_named():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(prunekit.PrunekitError, match=r"weights are float64 and the data float32"):
        prunekit.prune(model, "magnitude", 0.5, (torch.randn(16, 4), torch.arange(16) % 3))


def test_load_model_is_public_and_takes_a_path_given_as_text(tmp_path):
    """Item 10 of the new-user trial: a pruned model is loaded back in Python by its spec and
    the run's weights file, given as a str."""
    from safetensors.torch import load_file

    from tests.cli_helpers import MLP_HALF, prune_report

    report = prune_report(*MLP_HALF, "--out", str(tmp_path / "run"))
    weights = str(tmp_path / "run" / "model.safetensors")
    model = prunekit.load_model("sample:digits-mlp", weights)
    saved = load_file(weights)
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(prunekit.PrunekitError, match="does not exist"):
        prunekit.load_model("sample:digits-mlp", str(tmp_path / "missing.safetensors"))


def test_api_errors_name_the_keywords_not_the_cli_flags():
    """Item 11 of the new-user trial: the Python API said --mask and --sparsity."""
    from prunekit.errors import UsageError

    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with pytest.raises(UsageError) as caught:
        prunekit.prune(model, "magnitude", 0.9, (x, y), mask="2:4")
    assert str(caught.value) == (
        "mask=2:4 keeps 2 of every 4 weights, a sparsity of 0.5; pass sparsity=0.5"
    )
    with pytest.raises(UsageError, match=r"^params num_grads=x: expected an integer"):
        prunekit.prune(model, "woodfisher", 0.5, (x, y), params={"num_grads": "x"})


def test_api_layer_sparsity():
    from prunekit.errors import UsageError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), layer_sparsity={"2.*": 0.25})
    per = result.report["sparsity"]["per_tensor"]
    assert per == {"0.weight": 0.5, "2.weight": 0.25}
    with pytest.raises(UsageError, match=r"^layer_sparsity='9\.\*' matches no pruned weight"):
        prunekit.prune(model, "magnitude", 0.5, (x, y), layer_sparsity={"9.*": 0.25})


def test_readme_says_how_to_install_without_the_cuda_libraries():
    """Item 12 of the new-user trial: a 5.7-5.9 GB venv of CUDA wheels on a CPU-only machine,
    and no word on the CPU build."""
    text = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "On a CPU-only machine, install PyTorch's CPU build of torch and torchvision" in text
    assert "about 6 GB" in text and "about 0.9 GB" in text
