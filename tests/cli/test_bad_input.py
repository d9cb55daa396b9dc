"""Bad input and faults through the CLI: exit code, the one-line message, and what is left on
disk. One test per finding of the fault trial (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.load.models import load_model
from tests.cli_helpers import CNN_HALF, MLP_HALF, assert_error, invoke, prune, prune_report

ALL_NUMPY_DIGITS = 40


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs without --out write prunekit-out/ here, never into the checkout."""
    monkeypatch.chdir(tmp_path)


def digits_like(path: Path, n: int = ALL_NUMPY_DIGITS, **override) -> Path:
    """An .npz of n digits-shaped samples with labels 0..9 (``override`` replaces x or y)."""
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.random((n, 1, 8, 8), dtype=np.float32),
        "y": np.arange(n) % 10,
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def data_arg(path: Path) -> tuple[str, str]:
    return "--data", f"tensors:{path}"


# --- wrong results with exit 0 -------------------------------------------------------------


def test_labels_shaped_n_by_1_are_refused(tmp_path):
    path = digits_like(tmp_path / "d.npz", y=(np.arange(40) % 10)[:, None])
    result = prune(*CNN_HALF, *data_arg(path), "--out", str(tmp_path / "o"))
    assert_error(result, 2, "y has shape (40, 1)", "y.reshape(-1)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("pruner", ["magnitude", "woodfisher", "snip"])
def test_labels_beyond_the_model_outputs(tmp_path, pruner):
    path = digits_like(tmp_path / "d.npz", y=np.where(np.arange(40) == 3, 50, np.arange(40) % 10))
    result = prune("sample:digits-cnn", "-p", pruner, "-s", "0.5", *data_arg(path))
    assert_error(result, 1, "labels up to 50", "10 outputs", "--num-classes")


def test_nan_in_input_data(tmp_path):
    x = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    x[7, 0, 2, 2] = np.nan
    result = prune(*CNN_HALF, *data_arg(digits_like(tmp_path / "d.npz", x=x)))
    assert_error(result, 2, "x holds NaN or Inf", "sample")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_an_excluded_weight_is_refused_and_named(tmp_path, value):
    state = load_model("sample:digits-cnn").model.state_dict()
    state["classifier.3.weight"][0, 0] = value  # the last layer, excluded from pruning
    path = tmp_path / "w.pt"
    torch.save(state, path)
    out = tmp_path / "o"
    result = prune(
        *CNN_HALF, "--weights", str(path), "--exclude", "classifier.3.*", "--out", str(out)
    )
    assert_error(result, 2, "classifier.3.weight holds 1 NaN/Inf", str(path))
    assert not out.exists()


def test_one_negative_label_is_an_error_not_unlabeled(tmp_path):
    y = np.arange(40) % 10
    y[17] = -3
    result = prune(*CNN_HALF, *data_arg(digits_like(tmp_path / "d.npz", y=y)))
    assert_error(result, 2, "label -3 at sample", "0..C-1")


def test_float_labels_are_refused(tmp_path):
    path = digits_like(tmp_path / "d.npz", y=(np.arange(40) % 10).astype(np.float32))
    assert_error(prune(*CNN_HALF, *data_arg(path)), 2, "y is float32", "integer class")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A pruned run with ONNX exports (module-wide: validate tests only read it)."""
    out = tmp_path_factory.mktemp("run") / "o"
    prune_report(*CNN_HALF, "--export", "safetensors,onnx", "--out", str(out))
    return out


def test_validate_unlabeled_data_has_no_accuracy_and_no_gate(tmp_path, exported):
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "u.npz", x=x)
    spec = f"tensors:{tmp_path / 'u.npz'}"
    args = ("validate", str(exported / "model.onnx"), "--data", spec, "--runs", "2")
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] is None
    assert_error(invoke(*args, "--max-accuracy-drop", "0.01"), 2, "needs labeled data")


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5"])
def test_validate_accuracy_gate_values(exported, value):
    result = invoke("validate", str(exported / "model.onnx"), "--max-accuracy-drop", value)
    assert_error(result, 2, f"--max-accuracy-drop {float(value)}", "[0, 1]")


def test_validate_checks_parity_of_a_prunekit_export(tmp_path, exported):
    onnx_file = tmp_path / "m.onnx"
    weights = exported / "model.safetensors"
    args = ("export", "sample:digits-cnn", "--weights", str(weights), "--out", str(onnx_file))
    assert invoke(*args).exit_code == 0
    result = invoke("validate", str(onnx_file), "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the recorded weights lie in another folder: unread
    assert "outside the export's folder" in report["parity_skipped"]
    result = invoke("validate", str(onnx_file), "--runs", "2", "--json", "--weights", str(weights))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parity"]["passed"] and "parity_skipped" not in report
    beside = tmp_path / "w.safetensors"  # recorded beside the export: read
    beside.write_bytes(weights.read_bytes())
    args = ("export", "sample:digits-cnn", "--weights", str(beside), "--out", str(onnx_file))
    assert invoke(*args, "--force").exit_code == 0
    report = json.loads(invoke("validate", str(onnx_file), "--runs", "2", "--json").stdout)
    assert report["parity"]["passed"] and "parity_skipped" not in report


def test_validate_says_when_parity_is_skipped(tmp_path, exported):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((exported / "model.safetensors").read_bytes())
    onnx_file = tmp_path / "m.onnx"
    args = ("export", "sample:digits-cnn", "--weights", str(weights), "--out", str(onnx_file))
    assert invoke(*args).exit_code == 0
    weights.unlink()
    result = invoke("validate", str(onnx_file), "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert "are not there" in json.loads(result.stdout)["parity_skipped"]
    assert "warning: parity with PyTorch not checked" in result.stderr


# --- where outputs go ----------------------------------------------------------------------


def test_out_dot_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    for out in (".", "..", "./"):
        assert_error(prune(*MLP_HALF, "--out", out, "--force"), 2, "current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_out_that_is_a_device_or_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_error(prune(*MLP_HALF, "--out", str(fifo), "--force"), 2, "special file", "--out")
    assert fifo.is_fifo()
    plain = tmp_path / "plain.txt"
    plain.write_text("mine")
    assert_error(prune(*MLP_HALF, "--out", str(plain), "--force"), 2, "is a file, not a folder")
    assert plain.read_text() == "mine"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = invoke("export", "sample:digits-mlp", "--out", str(folder), "--force")
    assert_error(result, 2, "is a folder, not a file")


def test_force_replaces_only_files_and_folders_prunekit_wrote(tmp_path):
    mine = tmp_path / "mine.onnx"
    mine.write_text("a user's own file")
    for args in (("export", "sample:digits-mlp", "--out", str(mine), "--force"),
                 ("export", "sample:digits-mlp", "--format", "safetensors", "--out", str(mine),
                  "--force")):  # fmt: skip
        assert_error(invoke(*args), 2, "was not written by prunekit", "pick another path")
    assert mine.read_text() == "a user's own file"
    ours = tmp_path / "ours.onnx"
    assert invoke("export", "sample:digits-mlp", "--out", str(ours)).exit_code == 0
    assert_error(invoke("export", "sample:digits-mlp", "--out", str(ours)), 2, "--force")
    assert invoke("export", "sample:digits-mlp", "--out", str(ours), "--force").exit_code == 0
    compact = tmp_path / "c.safetensors"
    assert invoke("export", "sample:digits-mlp", "--format", "safetensors",
                  "--out", str(compact)).exit_code == 0  # fmt: skip
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    result = invoke("densify", str(compact), str(notes), "--force")
    assert_error(result, 2, "was not written by prunekit")
    assert notes.read_text() == "notes"
    dense = tmp_path / "d.safetensors"
    assert invoke("densify", str(compact), str(dense)).exit_code == 0
    assert invoke("densify", str(compact), str(dense), "--force").exit_code == 0
    # another tool's run folder whose report.json has prunekit's keys is not prunekit's
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    keys = {"model": "m", "pruner": "p", "sparsity": 0.5, "schedule": "s"}
    (decoy / "report.json").write_text(json.dumps(keys))
    (decoy / "checkpoint.pt").write_text("weights")
    assert_error(prune(*MLP_HALF, "--out", str(decoy), "--force"), 2, "not a prunekit output")
    assert (decoy / "checkpoint.pt").read_text() == "weights"


# --- tracebacks turned into one-line errors ------------------------------------------------


def test_x_and_y_of_different_lengths(tmp_path):
    path = digits_like(tmp_path / "d.npz", y=np.arange(39) % 10)
    assert_error(prune(*CNN_HALF, *data_arg(path)), 2, "x has 40 samples and y 39")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_datasets_too_small(tmp_path, n):
    path = digits_like(tmp_path / "d.npz", n=n)
    assert_error(prune(*CNN_HALF, *data_arg(path)), 2, "prunekit needs at least", "add data")


def test_three_samples_are_enough(tmp_path):
    path = digits_like(tmp_path / "d.npz", n=3)
    args = ("sample:digits-cnn", "-p", "woodfisher", "-s", "0.5", *data_arg(path))
    report = prune_report(*args, "--out", str(tmp_path / "o"))
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert any("num_grads lowered from 1000 to 2" in w for w in report["warnings"])


def test_explicit_num_grads_beyond_the_split_is_an_error(tmp_path):
    path = digits_like(tmp_path / "d.npz", n=20)
    result = prune(
        "sample:digits-cnn", "-p", "woodfisher", "-s", "0.5", *data_arg(path),
        "--param", "num_grads=1000",
    )  # fmt: skip
    assert_error(result, 2, "num_grads=1000", "lower --param num_grads")


def test_disk_full_in_the_safetensors_writer(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o"
    result = prune(*MLP_HALF, "--out", str(out))
    assert_error(result, 1, "writing safetensors failed", "the disk is full")
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder


def test_inconsistent_compact_index(tmp_path):
    from safetensors.torch import load_file, save_file

    from prunekit.formats.compact import save_compact
    from prunekit.run.exports import read_metadata

    path = tmp_path / "m.compact.safetensors"
    state = load_model("sample:digits-cnn").model.state_dict()
    state["features.0.weight"][:, :, :2] = 0
    save_compact(state, path, {})
    tensors, meta = load_file(path), read_metadata(path)
    del tensors["features.0.weight::mask"]
    save_file(tensors, path, metadata=meta)
    result = invoke("densify", str(path), str(tmp_path / "d.safetensors"))
    assert_error(result, 2, "compact index is inconsistent", "features.0.weight::mask")
    assert not (tmp_path / "d.safetensors").exists()


SWEEP = ("sweep", *MLP_HALF[:1], "--pruners", "magnitude", "--sparsities", "0.5,0.6")


@pytest.mark.parametrize(
    "victim, text, fragment",
    [
        ("cells/magnitude_s0.5_seed0.json", "{not json", "the document: invalid JSON"),
        ("cells/magnitude_s0.5_seed0.json", '{"accuracy": 21.3}', "accuracy: input should be"),
        ("sweep.json", "{not json", "is corrupt"),
    ],
)
def test_corrupt_sweep_files(tmp_path, victim, text, fragment):
    out = tmp_path / "sw"
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    cell = json.loads((out / "cells/magnitude_s0.5_seed0.json").read_text())
    if text.startswith('{"'):  # one edited value of a real cell
        text = json.dumps({**cell, **json.loads(text)})
    (out / victim).write_text(text)
    assert_error(invoke(*SWEEP, "--out", str(out)), 2, fragment, "delete")


def test_interrupted_sweep_says_how_many_cells_are_kept(tmp_path, monkeypatch):
    import prunekit.run.pipeline

    real, calls = prunekit.run.pipeline.execute, []

    def execute(config, reporter=None):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, reporter)

    monkeypatch.setattr(prunekit.run.pipeline, "execute", execute)
    result = invoke(*SWEEP, "--out", str(tmp_path / "sw"))
    assert result.exit_code == 130
    assert "interrupted; 1 of 2 cells are kept" in result.stderr
    assert "nothing was written" not in result.stderr


def _images(root: Path, sizes: list[tuple[int, int]]) -> None:
    from PIL import Image

    for i, (h, w) in enumerate(sizes):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w), 40 * i, np.uint8)).save(folder / f"{i}.png")


def test_image_folder_of_mixed_sizes_loads_at_one_size(tmp_path):
    from prunekit.load.data import load_data

    _images(tmp_path / "imgs", [(8, 8), (20, 6), (6, 30), (9, 9), (8, 12), (30, 30)])
    splits = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    shapes = {tuple(splits.train[i][0].shape) for i in range(len(splits.train))}
    shapes |= {tuple(splits.test[i][0].shape) for i in range(len(splits.test))}
    assert shapes == {(3, 8, 8)}


def test_unreadable_image_is_named(tmp_path):
    _images(tmp_path / "imgs", [(8, 8)] * 6)
    bad = tmp_path / "imgs" / "class0" / "bad.png"
    bad.write_bytes(b"not an image")
    result = prune(
        "torchvision:resnet18", "-p", "woodfisher", "-s", "0.5",
        "--data", f"imagefolder:{tmp_path / 'imgs'}", "--param", "num_grads=4",
    )  # fmt: skip
    assert_error(result, 2, "cannot read image", "bad.png")


FACTORY = """
from torch import nn

def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""


def test_factory_in_the_current_folder_and_num_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "localmodels", raising=False)
    (tmp_path / "localmodels.py").write_text(FACTORY)
    report = prune_report("localmodels:net", "-p", "magnitude", "-s", "0.5", "--data", "digits")
    assert any("randomly initialised" in w for w in report["warnings"])
    args = ("-p", "magnitude", "-s", "0.5", "--data", "digits")
    result = prune("localmodels:net", *args, "--num-classes", "10", "--out", "o2")
    assert_error(result, 2, "has no num_classes argument", "drop --num-classes")
    missing = prune("nowhere_models:net", *args, "--out", "o3")
    assert_error(missing, 2, "cannot import model factory", "current folder")


# --- plugins -------------------------------------------------------------------------------


def test_plugin_that_exits_or_prints_at_import(tmp_path, monkeypatch):
    from tests.fake_plugins import GOOD, install, unique

    exiting, chatty = unique("exiting"), unique("chatty")
    install(
        tmp_path / "site",
        monkeypatch,
        "odd-plugins",
        {exiting: "raise SystemExit(3)", chatty: "print('hello from import')\n" + GOOD},
        {"exiting": f"{exiting}:P", "chatty": f"{chatty}:Fixed"},
    )
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "odd-plugins")
    listing = invoke("pruners", "list", "--json")
    assert listing.exit_code == 0
    rows = {r["name"]: r for r in json.loads(listing.stdout)}  # stdout is JSON only
    assert "SystemExit" in rows["exiting"]["error"] and rows["chatty"]["error"] is None
    assert "hello from import" in listing.stderr


def test_pruner_hidden_by_the_plugin_filter(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "")
    result = prune("sample:digits-mlp", "-p", "fishleg", "-s", "0.5")
    assert_error(result, 2, "pruner 'fishleg' from prunekit-fishleg is hidden", "PRUNEKIT_PLUGINS")


# --- messages ------------------------------------------------------------------------------


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x00" + bytes(np.random.default_rng(0).integers(0, 256, 255).tolist()))
    result = prune(*CNN_HALF, "--weights", str(path))
    assert_error(result, 2, "is not a PyTorch checkpoint")
    assert "--trust-checkpoint" not in result.stderr


def test_folder_as_weights(tmp_path):
    assert_error(prune(*CNN_HALF, "--weights", str(tmp_path)), 2, "is a folder")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_hyperparameter(value):
    result = prune("sample:digits-mlp", "-p", "woodfisher", "-s", "0.5", "--param", f"damp={value}")
    assert_error(result, 2, f"--param damp={value}: must be a finite number")


def test_os_errors_name_their_own_fix():
    import errno

    from prunekit.cli import os_error_line

    exists = os_error_line(FileExistsError(errno.EEXIST, "File exists", "x"))
    assert "already exists" in exists and "free space" not in exists
    assert "the disk is full" in os_error_line(OSError(errno.ENOSPC, "No space", "x"))
    assert "permission" in os_error_line(PermissionError(errno.EACCES, "Denied", "x"))


# --- trust and the report ------------------------------------------------------------------


def test_trusted_checkpoint_is_warned_and_recorded(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(load_model("sample:digits-mlp").model, path)
    args = (*MLP_HALF, "--weights", str(path), "--trust-checkpoint", "--out", str(tmp_path / "o"))
    result = prune(*args, "--json")
    assert result.exit_code == 0, result.output
    assert f"warning: --trust-checkpoint: {path} was unpickled" in result.stderr
    assert json.loads(result.stdout)["trusted_checkpoint"] == str(path)


def test_report_records_versions_command_time_and_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prunekit", "prune", *CNN_HALF, "--out", "rel/o"])
    report = prune_report(*CNN_HALF, "--out", "rel/o")
    assert set(report["versions"]) == {"prunekit", "torch", "onnx", "onnxruntime", "python"}
    assert report["versions"]["torch"] == torch.__version__
    assert report["created"].endswith("+00:00")
    assert report["command"] == "prunekit prune sample:digits-cnn -p magnitude -s 0.5 --out rel/o"
    params = dict(load_model("sample:digits-cnn").model.named_parameters())
    total = sum(p.numel() for p in params.values())
    removed = sum(round(f * params[n].numel()) for n, f in report["sparsity"]["per_tensor"].items())
    assert report["parameters"] == {"total": total, "nonzero": total - removed}
    assert report["outputs"][0] == "rel/o/model.safetensors"  # relative, as given
    assert report["weights"] == "shipped"


# --- N:M and leftovers ---------------------------------------------------------------------


def test_nm_mask_leaves_misfit_layers_dense_with_a_warning(tmp_path):
    report = prune_report("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--mask", "2:4")
    assert any("left dense features.0.weight" in w for w in report["warnings"])
    assert "features.0.weight" not in report["sparsity"]["per_tensor"]
    assert report["sparsity"]["per_tensor"]["features.2.weight"] == 0.5


def test_nm_masks_are_chosen_in_one_step(tmp_path):
    # an OBS pruner's automatic sub-steps would pass through sparsities no N:M pattern has
    report = prune_report("sample:digits-cnn", "-p", "woodfisher", "-s", "0.5", "--mask", "2:4",
                          "--param", "num_grads=64", "--out", str(tmp_path / "wf"))  # fmt: skip
    assert report["schedule"]["pruning_steps"] == 1
    assert report["sparsity"]["per_tensor"]["features.2.weight"] == 0.5
    base = ("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--mask", "2:4",
            "--out", str(tmp_path / "x"))  # fmt: skip
    for extra in (("--recompute", "3"), ("--schedule", "gradual", "--steps", "2")):
        assert_error(prune(*base, *extra), 2, "--mask 2:4 is chosen in one step")
    assert not (tmp_path / "x").exists()


def test_stale_staging_of_a_killed_run_is_cleaned(tmp_path):
    from prunekit.runtime import outputs

    out = tmp_path / "o"
    dead = tmp_path / ".o.staging-111-0123abcd"  # its lock file is gone with its process
    other = tmp_path / ".o.something-else"
    for folder in (dead, other):
        folder.mkdir()
        (folder / "model.safetensors").write_text("x")
    with outputs._held(out) as token:  # a live run, holding its lock
        live = tmp_path / f".o.staging-{token}"
        live.mkdir()
        report = prune_report(*MLP_HALF, "--out", str(out))
        assert f"removed {dead}, left by a killed run" in report["warnings"]
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["o", live.name, other.name, f".o.lock-{token}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", live.name, other.name])


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from prunekit.runtime import outputs
if sys.argv[2] == "fallback":  # no renameat2: die between the two renames of the replace
    outputs._renameat2 = lambda src, dst, flags: False
    real = os.rename
    def rename(src, dst):
        real(src, dst)
        if ".previous-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
with outputs.staged_dir(Path(sys.argv[1]), force=True) as stage:
    (stage / "report.json").write_text("new")
    if sys.argv[2] == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["writing", "fallback"])
def test_a_kill_never_loses_the_old_output(tmp_path, when):
    from prunekit.runtime.outputs import write_marker

    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("old")
    write_marker(out, "run")  # as a run that wrote report.json leaves it
    script = [sys.executable, "-c", KILLED_MID_WRITE, str(out), when]
    assert subprocess.run(script, check=False).returncode == -9
    if when == "writing":
        assert (out / "report.json").read_text() == "old"
    else:  # parked, not deleted
        assert not out.exists()
        assert [p.name for p in tmp_path.glob(".o.previous-*")]
    # without --force: the old output is put back (or kept), and not replaced
    assert_error(prune(*MLP_HALF, "--out", str(out)), 2, "already exists", "--force")
    assert (out / "report.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    report = prune_report(*MLP_HALF, "--out", str(out), "--force")
    assert report["model"] == "sample:digits-mlp"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_force_never_replaces_a_folder_with_a_foreign_report(tmp_path):
    out = tmp_path / "proj"
    (out / "src").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    (out / "src" / "main.py").write_text("code")
    result = prune(*MLP_HALF, "--out", str(out), "--force")
    assert_error(result, 2, "is not a prunekit output", "pick another --out")
    assert (out / "src" / "main.py").read_text() == "code"


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replace_is_one_step_and_leaks_nothing(tmp_path, monkeypatch, exchange):
    from prunekit.runtime import outputs

    if not exchange:  # where renameat2 is missing: the three-rename fallback
        monkeypatch.setattr(outputs, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "o"
    for content in ("first", "second"):
        with outputs.staged_dir(out, force=True) as stage:
            (stage / "report.json").write_text(content)
    assert (out / "report.json").read_text() == "second"
    # two runs with --force finishing in turn: the last one wins, nothing is leaked
    with outputs.staged_dir(out, force=True) as a, outputs.staged_dir(out, force=True) as b:
        (a / "report.json").write_text("a")
        (b / "report.json").write_text("b")
    assert (out / "report.json").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_concurrent_run_without_force_loses_cleanly(tmp_path):
    from prunekit.errors import OutputExistsError
    from prunekit.runtime.outputs import staged_dir

    out = tmp_path / "o"
    with (
        pytest.raises(OutputExistsError, match="created by another run"),
        staged_dir(out, force=False) as a,
        staged_dir(out, force=False) as b,
    ):
        (a / "report.json").write_text("a")
        (b / "report.json").write_text("b")
    assert (out / "report.json").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_prune_help_is_grouped_and_fits_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke("prune", "--help")
    assert result.exit_code == 0
    for panel in ("Targets", "Model and data", "Statistics and device", "Schedule and training"):
        assert f"─ {panel} ─" in result.stdout
    assert "─ Export and validation ─" in result.stdout and "─ Output ─" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "--no-force" not in result.stdout  # flags are single switches


# --- review findings -----------------------------------------------------------------------

ODD_FACTORIES = {
    "exiting_models": "import sys\nsys.exit(0)\n",
    "chatty_models": "print('hello')\n" + FACTORY,
    "bn_first_models": (
        "from torch import nn\n\ndef net():\n"
        "    return nn.Sequential(nn.BatchNorm1d(64), nn.Flatten(), nn.Linear(64, 10))\n"
    ),
}


def test_factories_that_exit_print_or_do_not_fit(tmp_path, monkeypatch):
    for name, source in ODD_FACTORIES.items():
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
    args = ("-p", "magnitude", "-s", "0.5", "--data", "digits")
    exiting = prune("exiting_models:net", *args, "--json", "--out", "a")
    assert_error(exiting, 2, "importing model factory 'exiting_models:net' failed", "SystemExit")
    assert exiting.stdout == ""
    chatty = prune("chatty_models:net", *args, "--json", "--out", "b")
    assert chatty.exit_code == 0 and json.loads(chatty.stdout)["model"] == "chatty_models:net"
    assert "hello" in chatty.stderr
    result = prune("bn_first_models:net", *args, "--out", "c")
    assert_error(result, 1, "the model cannot take inputs of shape (1, 8, 8)", "ValueError")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32])
def test_integer_label_types(tmp_path, dtype):
    path = digits_like(tmp_path / "d.npz", y=(np.arange(40) % 10).astype(dtype))
    report = prune_report(*CNN_HALF, *data_arg(path), "--out", "o")
    assert report["num_classes"] == 10
    y = (np.arange(40) % 10).astype(dtype)
    y[5] = 255  # a real class index for uint8, not "unlabeled"
    result = prune(*CNN_HALF, *data_arg(digits_like(tmp_path / "e.npz", y=y)), "--out", "p")
    assert_error(result, 1, "labels up to 255", "10 outputs")


def test_data_file_with_extra_entries_loads(tmp_path):
    rng = np.random.default_rng(0)
    torch.save(
        {
            "x": torch.from_numpy(rng.random((20, 1, 8, 8), dtype=np.float32)),
            "y": torch.arange(20) % 10,
            "classes": [str(i) for i in range(10)],
            "version": 2,
        },
        tmp_path / "d.pt",
    )
    report = prune_report(*CNN_HALF, "--data", f"tensors:{tmp_path / 'd.pt'}", "--out", "o")
    assert report["data"].endswith("d.pt")


def test_legacy_protocol_0_checkpoint_is_a_checkpoint(tmp_path):
    """torch's safe loader cannot read protocol 0: say that (not "not a checkpoint")."""
    path = tmp_path / "w.pt"
    state = load_model("sample:digits-cnn").model.state_dict()
    torch.save(state, path, pickle_protocol=0, _use_new_zipfile_serialization=False)
    result = prune(*CNN_HALF, "--weights", str(path))
    assert_error(result, 2, "safe loading refuses", "--trust-checkpoint")


def test_imagefolder_val_classes_must_match_train(tmp_path):
    from PIL import Image

    for split, classes in (("train", ["cat", "dog", "eel"]), ("val", ["dog", "eel"])):
        for c in classes:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(
                tmp_path / "imgs" / split / c / "a.png"
            )
    result = prune(*CNN_HALF, "--data", f"imagefolder:{tmp_path / 'imgs'}")
    assert_error(result, 2, "val/ has classes dog, eel but train/ has cat, dog, eel")


def test_sweep_never_writes_into_a_foreign_folder(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "results.csv").write_text("my,data\n")
    assert_error(invoke(*SWEEP, "--out", str(out)), 2, "holds files and is not a prunekit sweep")
    assert (out / "results.csv").read_text() == "my,data\n"
    assert_error(invoke(*SWEEP, "--out", "."), 2, "current folder")
    # a sweep.json copied into a folder of yours does not make it a sweep's
    (out / "sweep.json").write_text("{}")
    assert_error(invoke(*SWEEP, "--out", str(out)), 2, "is not a prunekit sweep")
    assert (out / "results.csv").read_text() == "my,data\n"


def test_sweep_cells_must_be_the_cell_they_are_named_for(tmp_path):
    out = tmp_path / "sw"
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    cell = out / "cells" / "magnitude_s0.5_seed0.json"
    row = json.loads(cell.read_text())
    for key, value in (("seed", 42), ("sparsity", 0.6), ("model", "evil:fn"),
                       ("schedule", "gradual"), ("pruner", "random")):  # fmt: skip
        cell.write_text(json.dumps({**row, key: value}))
        assert_error(invoke(*SWEEP, "--out", str(out)), 2, "holds the result of another cell",
                     f"{key} {value!r}")  # fmt: skip
    cell.unlink()
    cell.symlink_to(out / "sweep.json")
    assert_error(invoke(*SWEEP, "--out", str(out)), 2, "is not a plain file")


def test_sweep_json_that_is_not_an_object(tmp_path):
    out = tmp_path / "sw"
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    (out / "sweep.json").write_text("[]")
    assert_error(invoke(*SWEEP, "--out", str(out)), 2, "is not a sweep's settings")


PWNED = "from pathlib import Path\nPath('PWNED').write_text('x')\n" + FACTORY


def test_validate_never_imports_a_factory_named_in_the_file(tmp_path, monkeypatch):
    (tmp_path / "evil_models.py").write_text(PWNED)
    monkeypatch.delitem(sys.modules, "evil_models", raising=False)
    args = ("-p", "magnitude", "-s", "0.5", "--data", "digits", "--export", "safetensors,onnx")
    assert prune("evil_models:net", *args, "--out", "o").exit_code == 0
    Path("PWNED").unlink()
    monkeypatch.delitem(sys.modules, "evil_models", raising=False)
    result = invoke("validate", "o/model.onnx", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert "does not import code" in json.loads(result.stdout)["parity_skipped"]
    assert not Path("PWNED").exists()


def test_validate_weights_with_the_recorded_spec_and_changed_weights(tmp_path, exported):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.onnx", "model.safetensors"):
        (run / name).write_bytes((exported / name).read_bytes())
    args = ("validate", str(run / "model.onnx"), "--runs", "2", "--json")
    given = invoke(*args, "--weights", str(exported / "model.safetensors"))
    assert given.exit_code == 0 and json.loads(given.stdout)["parity"]["passed"]
    dense = load_model("sample:digits-cnn").model  # replace the recorded weights
    from prunekit.run.exports import save_safetensors

    save_safetensors(dense, run / "model.safetensors", {})
    changed = invoke(*args)
    assert changed.exit_code == 0, changed.output
    assert "changed since the export" in json.loads(changed.stdout)["parity_skipped"]


def test_sweep_resumed_after_a_kill_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sw"
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    cell = out / "cells" / "magnitude_s0.5_seed0.json"
    cell.unlink()
    (out / "cells" / f".{cell.name}.staging-999-0123abcd.tmp").write_text("half")
    (out / "cells" / f".{cell.name}.lock-999-0123abcd").write_text("")
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        "magnitude_s0.5_seed0.json",
        "magnitude_s0.6_seed0.json",
    ]


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (("--seed", "99999999999999999999"), ("--seed", "from 0 to")),
        (("--num-classes", "-3"), ("--num-classes -3", "from 1")),
        (("--max-length", "-5"), ("--max-length -5", "from 1")),
        (("--recompute", "1000000"), ("--recompute 1000000", "1 to 1000")),
        (("--schedule", "gradual", "--steps", "1000000000"), ("--steps", "1 to 1000")),
        (("--finetune-epochs", "1", "--lr", "nan"), ("lr: input should be a finite number",)),
        (("--finetune-epochs", "1", "--weight-decay", "inf"), ("weight_decay: input should",)),
        (("--normalize", "nan/1"), ("--normalize nan/1", "finite")),
        (("--normalize", "0/1e-45"), ("at least 1e-6",)),
        (("--structure", "channels", "--channel-multiple", "1000"), ("none could be removed",)),
    ],
    ids=[
        "seed",
        "num-classes",
        "max-length",
        "recompute",
        "steps",
        "lr-nan",
        "wd-inf",
        "normalize-nan",
        "normalize-tiny-std",
        "channel-multiple",
    ],
)
def test_values_that_can_only_be_mistakes_are_refused(tmp_path, extra, fragments):
    out = tmp_path / "o"
    args = ("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--out", str(out), *extra)
    assert_error(prune(*args), 2, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("accuracy_dense", "nan", "should be a finite number"),
        ("accuracy_dense", "-5", "should be greater than or equal to 0"),
        ("accuracy_pruned", "1.5", "should be less than or equal to 1"),
        ("num_classes", "abc", "should be a valid integer, unable to parse"),
        ("image_size", "99999999999", "should be less than or equal to 16384"),
        ("max_length", "-1", "should be greater than or equal to 1"),
    ],
)
def test_validate_checks_the_metadata_it_reads(tmp_path, exported, key, value, fragment):
    import onnx

    proto = onnx.load(str(exported / "model.onnx"))
    onnx.helper.set_model_props(
        proto, {**{p.key: p.value for p in proto.metadata_props}, key: value}
    )
    tampered = tmp_path / "model.onnx"
    onnx.save_model(proto, str(tampered))
    result = invoke("validate", str(tampered), "--runs", "2", "--max-accuracy-drop", "0.001")
    expected = (f"its metadata: {key}: input {fragment}", f"(got {value!r})", "re-export")
    assert_error(result, 2, *expected)


def test_validate_with_weights_that_do_not_fit_is_an_error(tmp_path, exported):
    from prunekit.run.exports import save_safetensors

    other = tmp_path / "other.safetensors"
    save_safetensors(load_model("sample:digits-mlp").model, other, {})
    result = invoke("validate", str(exported / "model.onnx"), "--runs", "2", "--weights",
                    str(other))  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output


BROKEN = """
import sys
import torch
from prunekit.api import Pruner

class Base(Pruner):
    \"\"\"A broken pruner.\"\"\"
    contract = 1

class Exits(Base):
    name = "exits"
    def score(self, target, stats):
        sys.exit({code})

class Raises(Base):
    name = "raises"
    def score(self, target, stats):
        raise ValueError("bad index")

class Declines(Base):
    name = "declines"
    def score(self, target, stats):
        return None

class Chatty(Base):
    name = "chatty"
    def score(self, target, stats):
        print("debug output")
        return target.weight.detach().abs()

class Writes(Base):
    name = "writes"
    def score(self, target, stats):
        with torch.no_grad():
            target.weight.mul_(2)
        return target.weight.detach().abs()

class NanUpdate(Base):
    name = "nan_update"
    def score(self, target, stats):
        return target.weight.detach().abs()
    def update(self, target, keep, stats):
        return target.weight.detach() * float("nan")
"""


@pytest.mark.parametrize(
    "pruner, code, fragments",
    [
        ("exits0", 1, ("pruner 'exits' failed in score() (SystemExit: 0)",)),
        ("exits5", 1, ("pruner 'exits' failed in score() (SystemExit: 5)",)),
        ("raises", 1, ("failed in score() (ValueError: bad index)", "fix the plugin")),
        ("declines", 1, ("declined every tensor",)),
        ("writes", 1, ("changed a weight in score()",)),
        ("nan_update", 1, ("update() for", "NaN or Inf")),
    ],
)
def test_a_broken_plugin_is_one_line_naming_it_and_writes_nothing(
    tmp_path, monkeypatch, pruner, code, fragments
):
    from tests.fake_plugins import install, unique

    module = unique("broken")
    exit_code = pruner.removeprefix("exits") if pruner.startswith("exits") else "0"
    classes = {"exits0": "Exits", "exits5": "Exits", "raises": "Raises", "declines": "Declines",
               "writes": "Writes", "nan_update": "NanUpdate"}  # fmt: skip
    install(tmp_path / "site", monkeypatch, "broken-plugins",
            {module: BROKEN.format(code=exit_code)},
            {pruner.rstrip("05"): f"{module}:{classes[pruner]}"})  # fmt: skip
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "broken-plugins")
    out = tmp_path / "o"
    result = prune("sample:digits-mlp", "-p", pruner.rstrip("05"), "-s", "0.5", "--out", str(out))
    assert_error(result, code, *fragments)
    assert not out.exists()


def test_a_plugins_prints_never_reach_the_json_on_stdout(tmp_path, monkeypatch):
    from tests.fake_plugins import install, unique

    module = unique("broken")
    install(tmp_path / "site", monkeypatch, "broken-plugins", {module: BROKEN.format(code=0)},
            {"chatty": f"{module}:Chatty"})  # fmt: skip
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "broken-plugins")
    result = prune("sample:digits-mlp", "-p", "chatty", "-s", "0.5", "--json",
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pruner"] == "chatty"
    assert "debug output" in result.stderr


def test_sweep_refuses_repeated_values_and_resumes_after_a_failed_start(tmp_path):
    out = tmp_path / "sw"
    repeated = ("sweep", "sample:digits-mlp", "--pruners", "magnitude", "--sparsities", "0.5",
                "--seeds", "0,0,1", "--out", str(out))  # fmt: skip
    assert_error(invoke(*repeated), 2, "--seeds lists 0 more than once")
    assert not out.exists()
    (out / "cells").mkdir(parents=True)  # what a disk-full failure before sweep.json leaves
    (out / ".prunekit-output").write_text("written by prunekit\n")
    assert invoke(*SWEEP, "--out", str(out)).exit_code == 0
    assert (out / "sweep.json").is_file()


@pytest.fixture(scope="module")
def channel_pruned(tmp_path_factory) -> Path:
    """A run folder of the digits CNN with 30 % of its channels removed."""
    out = tmp_path_factory.mktemp("structured") / "run"
    prune_report("sample:digits-cnn", "-p", "magnitude", "-s", "0.3", "--structure", "channels",
                 "--out", str(out))  # fmt: skip
    return out


def test_repruning_a_channel_pruned_model_keeps_its_record(tmp_path, channel_pruned):
    """M1: a run that starts from channel-pruned weights writes weights that load again, with
    or without --structure (then the two cuts compose)."""
    start = ("sample:digits-cnn", "--weights", str(channel_pruned / "model.safetensors"))
    first = json.loads((channel_pruned / "report.json").read_text())["channels_kept"]["kept"]
    for extra, name in (((), "plain"), (("--structure", "channels"), "again")):
        out = tmp_path / name
        report = prune_report(*start, "-p", "magnitude", "-s", "0.3", *extra, "--out", str(out),
                              "--export", "onnx", "--validate")  # fmt: skip
        assert report["validation"]["parity"]["passed"]
        kept = report["channels_kept"]["kept"]
        assert set(kept) == set(first)
        for group, channels in kept.items():  # a subset of what the first cut kept
            assert set(channels) <= set(first[group])
        if not extra:
            assert kept == first
        else:
            assert sum(map(len, kept.values())) < sum(map(len, first.values()))
        result = invoke("validate", str(out / "model.onnx"), "--runs", "2", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["parity"]["passed"]
        weights = str(out / "model.safetensors")
        again = prune_report(start[0], "--weights", weights, "-p", "magnitude", "-s", "0.0",
                             "--out", str(tmp_path / f"{name}-2"))  # fmt: skip
        assert again["channels_kept"]["kept"] == kept


def _with_structure(source: Path, target: Path, structure: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    save_file(tensors, str(target), {**meta, "structure": structure})
    return target


GOOD_SHAPE = '"input_shape": [1, 8, 8]'


@pytest.mark.parametrize(
    "structure, fragment",
    [
        ('{"kept": {"features.0": [-1, 2]}, ' + GOOD_SHAPE + "}", "greater than or equal to 0"),
        ('{"kept": {"features.0": [2, 999999]}, ' + GOOD_SHAPE + "}", "keeps channel 999999"),
        ('{"kept": {"features.0": ["a"]}, ' + GOOD_SHAPE + "}", "valid integer"),
        ('{"kept": {"features.0": [[1]]}, ' + GOOD_SHAPE + "}", "valid integer"),
        ('{"kept": {"features.0": [3, 2]}, ' + GOOD_SHAPE + "}", "not strictly increasing"),
        ('{"kept": {"features.0": []}, ' + GOOD_SHAPE + "}", "at least 1 item"),
        ('{"kept": {"nowhere": [1]}, ' + GOOD_SHAPE + "}", "does not have as a channel group"),
        ("{" + GOOD_SHAPE + "}", "structure.kept: field required"),
        ('{"kept": {}}', "structure.input_shape: field required"),
        ("{not json", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "recursion limit"),
        ('{"kept": {"features.0": [' + ",".join(map(str, range(1_100_000))) + "]}}", "at most"),
        ('{"kept": {}, "input_shape": [1, 3000, 3000]}', "at most 4,194,304"),
        ('{"kept": {}, "input_shape": [100000, 100000, 1000]}', "10,000,000,000,000 elements"),
        ('{"kept": {}, "input_shape": [1, 8, 8], "run": 1}', "structure.run: unknown option"),
    ],
)
def test_a_tampered_structure_record_is_refused(tmp_path, channel_pruned, structure, fragment):
    """M2: every way of editing the kept-channel record is a one-line error naming it."""
    weights = _with_structure(channel_pruned / "model.safetensors", tmp_path / "w.safetensors",
                              structure)  # fmt: skip
    result = invoke("export", "sample:digits-cnn", "--weights", str(weights), "--out",
                    str(tmp_path / "m.onnx"))  # fmt: skip
    assert_error(result, 2, fragment)
    assert not (tmp_path / "m.onnx").exists()


def test_reported_sparsity_counts_the_zeros_already_there(tmp_path):
    """M7: starting from 50 %-sparse weights and asking 30 %, the report says what the file
    holds (50 % zeros), what this run masked and what was zero before, with a warning."""
    prune_report("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--out", str(tmp_path / "a"))
    weights = tmp_path / "a" / "model.safetensors"
    report = prune_report("sample:digits-cnn", "--weights", str(weights), "-p", "magnitude",
                          "-s", "0.3", "--out", str(tmp_path / "b"))  # fmt: skip
    sparsity = report["sparsity"]
    assert sparsity["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity["zero_before"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity["pruned"] == pytest.approx(0.3, abs=1e-3)
    assert any("were zero before this run" in w for w in report["warnings"])
    from safetensors.torch import load_file

    state = load_file(tmp_path / "b" / "model.safetensors")
    zeros = sum(int((state[name] == 0).sum()) for name in sparsity["per_tensor"])
    total = sum(state[name].numel() for name in sparsity["per_tensor"])
    assert zeros / total == pytest.approx(sparsity["achieved"])


class _Custom:
    """Not a tensor: a pickled instance of it needs unpickling code to load."""


def test_low_findings_are_one_line_errors(tmp_path):
    """Low findings of the second trial: a pickled tensors file, an empty input shape for
    export, a folder given to validate, --max-length 0."""
    torch.save({"x": torch.randn(10, 1, 8, 8), "y": torch.arange(10), "c": _Custom()},
               tmp_path / "pickled.pt")  # fmt: skip
    result = prune("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--data",
                   f"tensors:{tmp_path / 'pickled.pt'}", "--out", str(tmp_path / "a"))  # fmt: skip
    assert_error(result, 2, "holds pickled Python objects", "_Custom", "does not load")
    assert "weights_only" not in result.output
    for shape in ("0,0", "-1,8,8", "100000,100000,10"):
        result = invoke("export", "sample:digits-cnn", "--input-shape", shape, "--out",
                        str(tmp_path / "m.onnx"))  # fmt: skip
        assert_error(result, 2, f"--input-shape {shape}: give the sizes of one sample")
        assert "\x1b[" not in result.output and not (tmp_path / "m.onnx").exists()
    (tmp_path / "folder").mkdir()
    assert_error(invoke("validate", str(tmp_path / "folder")), 2, "is a folder; give the .onnx")
    result = prune("sample:digits-cnn", "-p", "magnitude", "-s", "0.5", "--max-length", "0")
    assert_error(result, 2, "--max-length 0: give an integer from 1")


def test_the_safetensors_writer_names_a_full_disk(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from prunekit.formats import safetensors_file

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error No space left (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as caught:
        safetensors_file.write_safetensors({"w": torch.zeros(1)}, tmp_path / "w.st", {})
    assert caught.value.errno == 28


def test_export_num_classes_and_validate_batch_sizes_are_bounded(tmp_path, exported):
    result = invoke("export", "torchvision:resnet18", "--num-classes", "-1", "--input-shape",
                    "3,32,32", "--out", str(tmp_path / "r.onnx"))  # fmt: skip
    assert_error(result, 2, "--num-classes -1: give an integer from 1")
    result = invoke("validate", str(exported / "model.onnx"), "--batch-sizes", "1000000000000")
    assert_error(result, 2, "--batch-sizes 1000000000000: every batch size must be from 1")


def test_force_replaces_a_run_folder_only_as_prunekit_wrote_it(tmp_path):
    """The marker lists what a run wrote (size, sha256): a file added or changed since, or a
    sweep's folder, is never replaced by --force."""
    out = tmp_path / "run"
    args = ("sample:digits-mlp", "-p", "magnitude", "-s", "0.5", "--out", str(out), "--force")
    assert prune(*args).exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert_error(prune(*args), 2, "notes.txt was not written by prunekit", "move it out")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    report = (out / "report.json").read_text()
    (out / "report.json").write_text(report.replace('"magnitude"', '"edited!!!"', 1))
    assert_error(prune(*args), 2, "report.json changed since prunekit wrote it")
    (out / "report.json").write_text(report)
    assert prune(*args).exit_code == 0
    sweep = tmp_path / "sw"
    assert invoke(*SWEEP, "--out", str(sweep)).exit_code == 0
    result = prune("sample:digits-mlp", "-p", "magnitude", "-s", "0.5", "--out", str(sweep),
                   "--force")  # fmt: skip
    assert_error(result, 2, "it is a sweep's folder")
    assert (sweep / "sweep.json").is_file()


def test_second_trial_file_findings(tmp_path, channel_pruned):
    """Findings of the re-run trial: a compact file without its index, a structure record
    whose input shape the model cannot take, duplicate keys and deep nesting in a recipe, a
    NUL in a path, a report.json whose recipe is not a table, a repeated --param, an older
    marker."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prune_report(*MLP_HALF, "--out", str(tmp_path / "u"))
    compact = tmp_path / "u" / "model.compact.safetensors"
    with safe_open(str(compact), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = {k: v for k, v in f.metadata().items() if k != "prunekit_sparse"}
    save_file(tensors, str(tmp_path / "c.safetensors"), meta)
    result = invoke("densify", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors"))
    assert_error(result, 2, "is stored compact but prunekit_sparse does not describe it")
    assert not (tmp_path / "d.safetensors").exists()
    with safe_open(str(channel_pruned / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["structure"])
    weights = _with_structure(channel_pruned / "model.safetensors", tmp_path / "w.safetensors",
                              json.dumps({**record, "input_shape": [1, 16, 16]}))  # fmt: skip
    result = invoke("export", "sample:digits-cnn", "--weights", str(weights), "--out",
                    str(tmp_path / "m.onnx"))  # fmt: skip
    assert_error(result, 2, "cannot be traced with its structure record's input shape [1, 16, 16]")
    recipes = {
        "dup.json": '{"model": "sample:digits-mlp", "pruner": "magnitude", "sparsity": 0.5, '
        '"sparsity": 0.9}',
        "deep.json": '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nul.toml": 'model = "sample:digits-mlp"\npruner = "magnitude"\nsparsity = 0.5\n'
        'out = "a\\u0000b"\n',
        "report.json": '{"recipe": [1, 2], "model": "x"}',
    }
    fragments = {"dup.json": "sparsity is given more than once",
                 "deep.json": "nested too deeply", "nul.toml": "out holds a NUL character",
                 "report.json": "recipe is not a table"}  # fmt: skip
    for name, text in recipes.items():
        (tmp_path / name).write_text(text)
        assert_error(invoke("prune", "--config", str(tmp_path / name)), 2, fragments[name])
    result = prune(*MLP_HALF, "--param", "a=1", "--param", "a=2")
    assert_error(result, 2, "--param a is given twice")
    old = tmp_path / "old"
    old.mkdir()
    (old / ".prunekit-output").write_text("written by prunekit\n")
    result = prune(*MLP_HALF, "--out", str(old), "--force")
    assert_error(result, 2, "written by an older prunekit, whose marker lists no files")


SIZED_FACTORY = """
from torch import nn

def net(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

def fixed():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
"""


def test_a_factory_takes_its_class_count_from_the_data(tmp_path, monkeypatch):
    """Item 5 of the new-user trial: a 3-class tensors: file built a 10-output head (0 %
    accuracy, no warning). A factory that takes num_classes now gets the data's count; one
    that does not is warned about."""
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "sizedmodels", raising=False)
    (tmp_path / "sizedmodels.py").write_text(SIZED_FACTORY)
    torch.manual_seed(0)
    save_file({"x": torch.randn(60, 16), "y": torch.arange(60) % 3}, tmp_path / "three.safetensors")
    args = ("-p", "magnitude", "-s", "0.5", "--data", "tensors:three.safetensors")
    sized = prune_report("sizedmodels:net", *args, "--out", "sized")
    assert sized["num_classes"] == 3
    assert not any("outputs but" in w for w in sized["warnings"])
    fixed = prune_report("sizedmodels:fixed", *args, "--out", "fixed")
    assert fixed["num_classes"] == 10
    assert any("10 outputs but" in w and "3 classes" in w for w in fixed["warnings"])
    # a checkpoint of the factory keeps its own head: 10 outputs from 3-class data
    save_file(
        dict(load_file(tmp_path / "fixed" / "model.safetensors")), tmp_path / "ten.safetensors"
    )
    again = prune_report("sizedmodels:net", *args, "--weights", "ten.safetensors", "--out", "w")
    assert again["num_classes"] == 10
