"""The command line: exit codes and one-line messages for every bad input of `prune`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunekit import __version__
from prunekit.cli import app
from prunekit.load.sample_models import SAMPLES
from tests.cli_helpers import CNN_HALF, MLP_HALF, assert_error, prune, prune_report, runner
from tests.fake_plugins import install, unique


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"prunekit {__version__}"
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "Examples" in result.stdout


def test_prune_json_report(tmp_path):
    out = tmp_path / "run"
    result = prune(
        "sample:digits-cnn",
        "--pruner",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    card = SAMPLES["digits-cnn"].card()
    assert report["model"] == "sample:digits-cnn" and report["pruner"] == "magnitude"
    assert report["sparsity"]["target"] == 0.5
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)
    assert set(report["sparsity"]["per_tensor"]) == {
        "features.0.weight",
        "features.2.weight",
        "classifier.1.weight",
        "classifier.3.weight",
    }
    assert report["accuracy"]["dense"] == card["test_accuracy"]
    assert 0.9 < report["accuracy"]["pruned"] <= 1.0
    names = ["model.safetensors", "model.compact.safetensors", "report.json"]
    assert report["outputs"] == [str(out / n) for n in names]
    assert json.loads((out / "report.json").read_text()) == report
    assert report["seconds"] > 0


def test_prune_human_output(tmp_path):
    result = prune(
        "sample:digits-mlp",
        "-p",
        "random",
        "-s",
        "0.3",
        "--mask",
        "layer",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    assert "net.1.weight" in result.stdout and "test accuracy: dense" in result.stdout


def test_unknown_pruner_suggests(tmp_path):
    result = prune("sample:digits-cnn", "-p", "magnitud", "-s", "0.5", "--out", str(tmp_path / "o"))
    assert_error(result, 2, "unknown pruner 'magnitud'", "did you mean magnitude")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["1.0", "-0.2", "3"])
def test_sparsity_out_of_range(tmp_path, value):
    result = prune(
        "sample:digits-cnn", "-p", "magnitude", "-s", value, "--out", str(tmp_path / "o")
    )
    assert_error(result, 2, "sparsity must be in [0, 1)", "e.g. 0.9")
    assert not (tmp_path / "o").exists()


def test_missing_weights(tmp_path):
    result = prune(
        *CNN_HALF,
        "--weights",
        str(tmp_path / "nope.safetensors"),
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(result, 2, "nope.safetensors does not exist", "--weights")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weights(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00garbage" * 10)
    result = prune(
        *CNN_HALF,
        "--weights",
        str(bad),
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(result, 2, str(bad))
    assert not (tmp_path / "o").exists()


class Custom:
    pass


def test_pickle_refused_by_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"obj": Custom()}, path)
    result = prune(
        *CNN_HALF,
        "--weights",
        str(path),
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(result, 2, "safe loading refuses", "--trust-checkpoint")


def test_trusted_whole_module(tmp_path):
    from prunekit.load.models import load_model

    path = tmp_path / "whole.pt"
    torch.save(load_model("sample:digits-mlp").model, path)
    result = prune(
        *MLP_HALF,
        "--weights",
        str(path),
        "--trust-checkpoint",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.stdout)["accuracy"]["dense"]
        == SAMPLES["digits-mlp"].card()["test_accuracy"]
    )


def test_mismatched_state_dict(tmp_path):
    result = prune(
        *CNN_HALF,
        "--weights",
        str(SAMPLES["digits-mlp"].weights),
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(
        result,
        1,
        "do not fit sample:digits-cnn",
        "missing: features.0.weight",
        "unexpected: net.1.bias, net.1.weight",
    )


def test_shape_mismatch(tmp_path):
    state = load_file(SAMPLES["digits-mlp"].weights)
    state["net.5.weight"] = torch.zeros(7, 64)
    state["net.5.bias"] = torch.zeros(7)
    path = tmp_path / "seven.safetensors"
    save_file(state, path)
    result = prune(
        *MLP_HALF,
        "--weights",
        str(path),
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(
        result, 1, "shape mismatch: net.5.weight (7x64 in file, 10x64 in model)", "--num-classes"
    )


def test_unknown_sample_model(tmp_path):
    result = prune("sample:digits-cn", "-p", "magnitude", "-s", "0.5", "--out", str(tmp_path / "o"))
    assert_error(result, 2, "unknown sample model 'digits-cn'", "did you mean digits-cnn")


def test_unknown_model_spec(tmp_path):
    assert_error(prune("resnet", "-p", "magnitude", "-s", "0.5"), 2, "unknown model spec")


def test_unknown_data_spec(tmp_path):
    result = prune(
        *CNN_HALF,
        "--data",
        "mnist",
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(result, 2, "unknown data spec 'mnist'", "tensors:FILE")


def test_out_exists_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = (*MLP_HALF, "--out", str(out))
    assert_error(prune(*args), 2, f"{out} exists and is not a prunekit output")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces prunekit outputs only, never a folder of the user's
    assert_error(prune(*args, "--force"), 2, "not a prunekit output", "pick another --out")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert prune(*args).exit_code == 0
    assert_error(prune(*args), 2, f"{out} already exists", "--force")
    assert prune(*args, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".prunekit-output",
        "model.compact.safetensors",
        "model.safetensors",
        "report.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging folders left behind


def test_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "o"
    assert prune(*MLP_HALF, "--out", str(out)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    result = prune(
        *MLP_HALF,
        "--out",
        str(out),
        "--force",
        "--data",
        "tensors:" + str(tmp_path / "missing.npz"),
    )
    assert result.exit_code == 2
    assert (out / "model.safetensors").read_bytes() == before


def test_exclude_matching_nothing_warns(tmp_path):
    result = prune(
        *MLP_HALF,
        "--exclude",
        "net.5.*",
        "--exclude",
        "head.*",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert result.exit_code == 0
    assert "warning: --exclude 'head.*' matched no prunable weight" in result.stderr
    report = json.loads(result.stdout)
    assert "net.5.weight" not in report["sparsity"]["per_tensor"]
    assert report["warnings"] == ["--exclude 'head.*' matched no prunable weight"]


def test_plugin_whose_import_raises(tmp_path, monkeypatch):
    mod = unique("raising")
    install(
        tmp_path / "site",
        monkeypatch,
        "raising-plugin",
        {mod: "raise RuntimeError('bad install')"},
        {"raising": f"{mod}:P"},
    )
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "raising")
    listing = runner.invoke(app, ["pruners", "list", "--json"])
    assert listing.exit_code == 0
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert "bad install" in rows["raising"]["error"] and rows["magnitude"]["error"] is None
    result = prune("sample:digits-mlp", "-p", "raising", "-s", "0.5", "--out", str(tmp_path / "o"))
    assert_error(
        result, 1, "pruner 'raising' from raising-plugin 1.0 failed to import", "bad install"
    )


def test_bad_param_syntax(tmp_path):
    result = prune(*MLP_HALF, "--param", "damp")
    assert_error(result, 2, "--param expects key=value")


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DEBUG", "1")
    result = prune("sample:digits-mlp", "-p", "nope", "-s", "0.5")
    assert result.exit_code != 0 and result.exception is not None


def test_device_unavailable(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    result = prune(*MLP_HALF, "--device", "cuda")
    assert_error(result, 2, "CUDA is not available", "--device cpu")


def test_models_and_pruners_listing():
    models = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert [m["model"] for m in models] == [
        "sample:digits-mlp",
        "sample:digits-cnn",
        "sample:digits-resnet",
        "cifar:resnet20",
        "cifar:resnet32",
        "cifar:resnet44",
        "cifar:resnet56",
    ]
    assert all(m["test_accuracy"] > 0.95 for m in models[:3])
    assert all(m["test_accuracy"] is None and m["parameters"] > 2e5 for m in models[3:])
    pruners = json.loads(runner.invoke(app, ["pruners", "list", "--json"]).stdout)
    assert {p["name"] for p in pruners} == {
        "magnitude",
        "obs",
        "random",
        "woodfisher",
        "grad_norm",
        "snip",
        "grasp",
        "fisher_diag",
        "fisher_pruner",
        "fts",
        "fbss",
        "sparsegpt",
        "wanda",
        "layer_obs",
    }
    assert all(p["distribution"] == "prunekit" and p["summary"] for p in pruners)
    show = runner.invoke(app, ["pruners", "show", "magnitude"])
    assert show.exit_code == 0 and "|θ|" in show.stdout


def test_woodfisher_end_to_end_beats_magnitude_at_high_sparsity(tmp_path):
    accuracy = {}
    for pruner in ("magnitude", "woodfisher"):
        result = prune(
            "sample:digits-cnn",
            "-p",
            pruner,
            "-s",
            "0.95",
            "--recompute",
            "2",
            "--out",
            str(tmp_path / pruner),
            "--json",
            "--verbose",
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["sparsity"]["achieved"] == pytest.approx(0.95, abs=1e-4)
        accuracy[pruner] = report["accuracy"]["pruned"]
    assert "memory plan" in result.stderr
    assert accuracy["woodfisher"] > accuracy["magnitude"] + 0.02


def test_woodfisher_bad_inputs_through_the_cli(tmp_path):
    base = ("sample:digits-mlp", "-p", "woodfisher", "-s", "0.5", "--out", str(tmp_path / "o"))
    assert_error(prune(*base, "--param", "damp=0"), 2, "damp=0: must be > 0.0")
    assert_error(prune(*base, "--param", "num_grads=5000"), 2, "calibration split has 1438")
    assert_error(
        prune(*base, "--memory-budget", "10kB"),
        2,
        "too small for net.1.weight",
        "it needs at least",
    )
    assert_error(prune(*base, "--recompute", "0"), 2, "--recompute 0")
    assert not (tmp_path / "o").exists()


def test_pruners_show_lists_hyperparameters():
    result = runner.invoke(app, ["pruners", "show", "woodfisher", "--json"])
    info = json.loads(result.stdout)
    defaults = {p["name"]: p["default"] for p in info["params"]}
    assert defaults == {
        "block_size": 128,
        "damp": 1e-2,
        "damp_mode": "relative",
        "num_grads": 1000,
        "grad_batch": 1,
        "fisher": "empirical",
        "grad_engine": "hooks",
        "exact": True,
    }
    assert info["needs"] == ["fisher_inv"]


def test_unwritable_output_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = prune(*MLP_HALF, "--out", str(blocker / "run"))
    assert_error(result, 2, "is not a writable folder")


def test_sweep_and_budget_bad_values(tmp_path):
    result = runner.invoke(
        app,
        [
            "sweep",
            "sample:digits-mlp",
            "--pruners",
            ",",
            "--sparsities",
            "0.5",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert_error(result, 2, "--pruners, --sparsities and --seeds each need at least one value")
    result = prune(
        "sample:digits-mlp",
        "-p",
        "woodfisher",
        "-s",
        "0.5",
        "--memory-budget",
        "inf",
        "--out",
        str(tmp_path / "o"),
    )
    assert_error(result, 2, "must be a positive, finite size")


def test_default_output_folders_of_runs_that_differ_in_mask_or_structure_do_not_collide(
    tmp_path, monkeypatch
):
    """Item 7 of the new-user trial: a 2:4 (or channel) rerun of the same pruner and
    sparsity gets its own default folder."""
    from prunekit.run.config import PruneConfig

    monkeypatch.chdir(tmp_path)
    plain = prune_report(*MLP_HALF)
    nm = prune_report(*MLP_HALF, "--mask", "2:4")
    assert Path(plain["outputs"][0]).parent.name == "digits-mlp-magnitude-0.5"
    assert Path(nm["outputs"][0]).parent.name == "digits-mlp-magnitude-0.5-2of4"
    out = PruneConfig.default_out("sample:digits-cnn", "woodfisher", 0.5, "layer", "channels",
                                  "int8")  # fmt: skip
    assert out.name == "digits-cnn-woodfisher-0.5-layer-channels-int8"


def test_prune_validate_takes_runs_and_threads(tmp_path):
    """Item 3 of the new-user trial: --validate's timing is set from prune itself (100 runs
    by default, not 500), and bad values are one-line errors."""
    report = prune_report(*MLP_HALF, "--validate", "--runs", "3", "--threads", "1",
                          "--out", str(tmp_path / "run"))  # fmt: skip
    assert report["validation"]["session"]["intra_op_threads"] == 1
    assert report["recipe"]["validate_runs"] == 3
    from prunekit.run.config import PruneConfig

    assert PruneConfig("sample:digits-mlp", "magnitude", 0.5).validate_runs == 100
    for flag, value in (("--runs", "0"), ("--threads", "0")):
        result = prune(*MLP_HALF, "--validate", flag, value, "--out", str(tmp_path / flag))
        assert_error(result, 2, f"{flag} 0: give an integer from 1")
        assert not (tmp_path / flag).exists()


def test_structure_defaults_to_a_per_group_fraction_and_the_summary_speaks_of_channels(tmp_path):
    """Item 1 of the new-user trial: --structure channels without --mask removes the same
    fraction from every group (global cut groups to one channel: 98.9 -> 18.4 %), and the
    summary compares the channels removed with the request, with parameters and FLOPs."""
    result = prune("sample:digits-resnet", "-p", "magnitude", "-s", "0.5", "--structure",
                   "channels", "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["mask"] == "layer"
    assert report["structure"]["removed"] == pytest.approx(0.5, abs=0.05)
    assert report["accuracy"]["pruned"] > 0.5
    assert "channels removed" in result.stdout and "(asked 50.0%)" in result.stdout
    assert "FLOPs per sample" in result.stdout and "fewer" in result.stdout


def test_two_of_four_on_convolutions_runs_along_input_channels_end_to_end(tmp_path):
    """Item 2 of the new-user trial: the written weights of a 2:4 run keep 2 of every 4 input
    channels at each kernel position (31 % of these groups broke 2:4 in the old layout)."""
    for pruner in ("magnitude", "sparsegpt"):
        out = tmp_path / pruner
        report = prune_report("sample:digits-cnn", "-p", pruner, "-s", "0.5", "--mask", "2:4",
                              "--out", str(out))  # fmt: skip
        weight = load_file(out / "model.safetensors")["features.2.weight"]
        groups = (weight != 0).permute(0, 2, 3, 1).reshape(-1, weight.shape[1] // 4, 4)
        assert bool((groups.sum(-1) <= 2).all()), pruner
        assert report["sparsity"]["per_tensor"]["features.2.weight"] == 0.5


def test_help_names_every_model_and_data_form_and_the_real_optimizer():
    """Item 11 of the new-user trial: --help omitted hf:, text: and tensors:TRAIN,TEST, and
    said adam where the optimizer is AdamW."""
    result = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    text = " ".join(result.stdout.split())
    forms = ("hf:ORG/NAME[@REVISION]", "torchvision:ARCH[:WEIGHTS]", "text:FILE",
             "tensors:TRAIN,TEST", "an integer label, a tab and the text", "adamw")  # fmt: skip
    for form in forms:
        assert form in text, form
    assert "sgd or adam." not in text


def test_layer_sparsity_overrides_by_glob_on_the_cli_in_recipes_and_for_layer_wise_pruners(
    tmp_path,
):
    """Per-layer control: the first glob a weight matches sets its own sparsity, exactly;
    -s is the others' (global ranking among them); the same from a recipe and for sparsegpt,
    whose layer requests carry each layer's own fraction."""
    args = ("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--layer-sparsity",
            "classifier.1.*=0.9", "--layer-sparsity", "classifier.*=0.3")  # fmt: skip
    report = prune_report(*args, "--out", str(tmp_path / "cli"))
    per = report["sparsity"]["per_tensor"]
    assert per["classifier.1.weight"] == pytest.approx(0.9, abs=1e-4)  # first glob wins
    assert per["classifier.3.weight"] == pytest.approx(0.3, abs=1e-3)
    others = ("features.0.weight", "features.2.weight")
    weights = load_file(tmp_path / "cli" / "model.safetensors")
    sizes = {n: weights[n].numel() for n in others}
    removed = sum(per[n] * sizes[n] for n in others) / sum(sizes.values())
    assert removed == pytest.approx(0.5, abs=1e-3)
    assert report["sparsity"]["own"] == {"classifier.1.weight": 0.9, "classifier.3.weight": 0.3}
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "sample:digits-cnn"\npruner = "magnitude"\nsparsity = 0.5\n'
                      '[layer_sparsity]\n"classifier.1.*" = 0.9\n'
                      '"classifier.*" = 0.3\n')  # fmt: skip
    again = prune_report("--config", str(recipe), "--out", str(tmp_path / "recipe"))
    assert again["sparsity"]["per_tensor"] == per
    layerwise = prune_report("sample:digits-cnn", "-p", "sparsegpt", "-s", "0.5", "--mask",
                             "layer", "--layer-sparsity", "features.2.*=0.8",
                             "--out", str(tmp_path / "sgpt"))  # fmt: skip
    assert layerwise["sparsity"]["per_tensor"]["features.2.weight"] == pytest.approx(0.8, abs=1e-3)
    assert layerwise["sparsity"]["per_tensor"]["classifier.1.weight"] == pytest.approx(
        0.5, abs=1e-3
    )
    woodfisher = prune_report("sample:digits-mlp", "-p", "woodfisher", "-s", "0.5",
                              "--layer-sparsity", "net.1.*=0.95", "--param", "num_grads=64",
                              "--out", str(tmp_path / "wf"))  # fmt: skip
    assert woodfisher["sparsity"]["per_tensor"]["net.1.weight"] == pytest.approx(0.95, abs=1e-3)
    assert woodfisher["schedule"]["pruning_steps"] > 1  # sub-steps sized for the deepest layer


def test_layer_sparsity_bad_input(tmp_path):
    out = str(tmp_path / "o")
    base = ("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--out", out)
    cases = [
        (("--layer-sparsity", "nothing.*=0.5"), "--layer-sparsity 'nothing.*' matches no pruned"),
        (("--layer-sparsity", "features.*=1.5"), "features.*=1.5: give a fraction in [0, 1)"),
        (("--layer-sparsity", "features.*"), "--layer-sparsity expects GLOB=S"),
        (("--layer-sparsity", "a=0.1", "--layer-sparsity", "a=0.2"), "is given twice"),
        (("--layer-sparsity", "features.*=0.5", "--mask", "2:4"), "does not combine with --mask"),
    ]  # fmt: skip
    for extra, message in cases:
        assert_error(prune(*base, *extra), 2, message)
    assert not Path(out).exists()


def test_every_layer_overridden_never_unprunes_across_steps_and_scales_geometrically(tmp_path):
    """Review finding: with every layer overridden (a sensitivity recipe) a gradual schedule
    restarted each step's sub-steps from 0 and un-pruned weights; with -s 0 the first step
    took the whole cut."""
    from prunekit.engine.step import Pruning

    state = Pruning.__new__(Pruning)
    state.overrides, state.final = {"a": 0.96}, 0.5
    half_way = state.own_sparsities(1 - 0.5**0.5)  # the others half way in log-density
    assert half_way["a"] == pytest.approx(0.8)  # 1 - sqrt(1 - 0.96)
    state.final = 0.0
    assert state.own_sparsities(0.0, 0.5)["a"] == pytest.approx(0.8)
    every = ("--layer-sparsity", "features.*=0.6", "--layer-sparsity", "classifier.*=0.9")
    for sparsity in ("0.7", "0"):
        report = prune_report("sample:digits-cnn", "-p", "magnitude", "-s", sparsity, *every,
                              "--schedule", "gradual", "--steps", "3", "--finetune-epochs", "1",
                              "--recompute", "2", "--out", str(tmp_path / sparsity))  # fmt: skip
        levels = [h["sparsity"] for h in report["history"] if h["phase"].startswith("prune")]
        assert len(levels) == 3 and levels == sorted(levels) and levels[0] < levels[-1] - 0.1
        per = report["sparsity"]["per_tensor"]
        assert per["classifier.1.weight"] == pytest.approx(0.9, abs=1e-3)
        assert per["features.2.weight"] == pytest.approx(0.6, abs=1e-3)
