"""Issue-9 features through the CLI: CIFAR ResNets with uint8 data and normalisation,
phase timings, the memory record, plain progress lines and `--recompute auto`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunekit.load.cifar_resnet import cifar_resnet
from tests.cli_helpers import assert_error, prune, prune_report


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A random-weight ResNet-20 checkpoint and small uint8 16x16 train/test files."""
    folder = tmp_path_factory.mktemp("cifar")
    torch.manual_seed(0)
    model = cifar_resnet("resnet20")
    save_file(model.state_dict(), str(folder / "r20.safetensors"))
    gen = np.random.default_rng(0)
    for name, n in (("train", 96), ("test", 40)):
        x = gen.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
        np.savez(folder / f"{name}.npz", x=x, y=np.arange(n) % 10)
    data = f"tensors:{folder / 'train.npz'},{folder / 'test.npz'}"
    return folder, ("cifar:resnet20", "--weights", str(folder / "r20.safetensors"), "--data", data)


def test_cifar_resnet_woodfisher_run_records_phases_memory_and_damping(cifar_like, tmp_path):
    _, base = cifar_like
    report = prune_report(
        *base,
        "--normalize",
        "imagenet",
        "-p",
        "woodfisher",
        "-s",
        "0.5",
        "--param",
        "num_grads=32",
        "--out",
        str(tmp_path / "run"),
    )
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)
    assert report["preprocess"] == {"normalize": "imagenet", "image_size": None, "max_length": None}
    assert report["schedule"]["recompute"] == "auto" and report["schedule"]["pruning_steps"] == 3
    phases = report["phases"]
    assert {"load", "evaluation", "statistics", "inverse", "prune", "export"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) <= report["seconds"] + 0.1
    steps = report["statistics"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    memory = steps[0]["memory"]
    assert memory["passes"] == 1 and memory["activation_bytes_per_sample"] > 0
    assert memory["planned_peak_bytes"] > 0 and "measured_peak_bytes" in memory
    damping = steps[0]["damping"]
    assert damping["mode"] == "relative" and damping["mean_fisher_diag"] > 0
    lam = damping["alpha"] * damping["mean_fisher_diag"]
    assert all(v == pytest.approx(lam) for v in damping["per_target"].values())
    meta = json.loads((tmp_path / "run" / "report.json").read_text())["preprocess"]
    assert meta["normalize"] == "imagenet"


def test_plain_progress_lines_when_stderr_is_not_a_terminal(cifar_like, tmp_path):
    _, base = cifar_like
    result = prune(*base, "-p", "magnitude", "-s", "0.5", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    assert "progress: loading model and data" in lines
    assert any(
        line.startswith("progress: oneshot pruning with magnitude: done in") for line in lines
    )


def test_bad_preprocessing_is_a_one_line_usage_error(cifar_like, tmp_path):
    _, base = cifar_like
    out = tmp_path / "run"
    common = (*base, "-p", "magnitude", "-s", "0.5", "--out", str(out))
    assert_error(
        prune(*common, "--normalize", "0.5/0.2"),
        2,
        "--normalize gives 1 channel(s) but",
        "has 3; give 3 mean and 3 std values",
    )
    assert_error(prune(*common, "--normalize", "bogus"), 2, "use imagenet or cifar10")
    assert_error(prune(*common, "--recompute", "many"), 2, "give auto or a number")
    assert not out.exists()


def test_small_memory_budget_gives_more_passes_and_the_same_masks(cifar_like, tmp_path):
    _, base = cifar_like
    masks, passes = [], []
    for budget in (None, "30MB"):
        out = tmp_path / f"run-{budget}"
        extra = ("--memory-budget", budget) if budget else ()
        report = prune_report(
            *base,
            "-p",
            "woodfisher",
            "-s",
            "0.6",
            "--recompute",
            "1",
            "--param",
            "num_grads=24",
            "--param",
            "block_size=16",
            "--out",
            str(out),
            *extra,
        )
        passes.append(report["statistics"][0]["memory"]["passes"])
        from safetensors.torch import load_file

        masks.append({k: v != 0 for k, v in load_file(str(out / "model.safetensors")).items()})
    assert passes[0] == 1 and passes[1] > 2
    assert masks[0].keys() == masks[1].keys()
    differing = sum(int((masks[0][k] != masks[1][k]).sum()) for k in masks[0])
    assert differing == 0


def test_out_of_memory_outside_the_statistics_is_one_line(monkeypatch, tmp_path):
    import prunekit.run.pipeline

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(prunekit.run.pipeline, "accuracy", exhausted)
    result = prune(
        "sample:digits-mlp", "-p", "magnitude", "-s", "0.5", "--out", str(tmp_path / "o")
    )
    assert_error(result, 1, "out of memory (CUDA out of memory.", "lower --batch-size")
    assert not (tmp_path / "o").exists()


def test_a_cifar_resnets_residual_stream_is_pruned_saved_and_loaded_back(cifar_like, tmp_path):
    import onnxruntime as ort

    from prunekit.load.models import load_model

    _, base = cifar_like
    out = tmp_path / "run"
    report = prune_report(*base, "-p", "layer_obs", "-s", "0.3", "--mask", "layer",
                          "--structure", "channels", "--export", "safetensors,onnx",
                          "--out", str(out))  # fmt: skip
    stream = next(name for name in report["structure"]["kept"] if name.startswith("conv1+"))
    assert len(report["structure"]["kept"][stream]) < 64  # the stream lost channels
    loaded = load_model("cifar:resnet20", out / "model.safetensors").model.eval()
    assert loaded.conv1.out_channels < 16 and loaded.linear.in_features < 64
    shortcut = loaded.layer3[0].shortcut  # carries stage 2's kept channels into stage 3
    assert shortcut.inputs == loaded.layer2[2].conv2.out_channels
    assert shortcut.front + shortcut.inputs + shortcut.back == loaded.layer3[0].conv2.out_channels
    x = torch.rand(4, 3, 16, 16)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = loaded(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
