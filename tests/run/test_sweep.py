"""`prunekit sweep`: results files, resuming without recomputation, interruption."""

import csv
import dataclasses

import pytest
from typer.testing import CliRunner

from prunekit.cli import app
from prunekit.errors import UsageError
from prunekit.run.config import PruneConfig
from prunekit.run.sweep import run_sweep

BASE = PruneConfig(model="sample:digits-mlp", pruner="magnitude", sparsity=0.5, exports=())


def fake_execute(calls, fail_at=None):
    def execute(config):
        calls.append((config.pruner, config.sparsity, config.seed))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        accuracy = 1.0 - config.sparsity / 2 - (0.01 * config.seed if config.pruner == "a" else 0.0)
        return {
            "model": config.model,
            "sparsity": {"achieved": config.sparsity},
            "accuracy": {"dense": 1.0, "pruned": accuracy},
            "seconds": 0.1,
        }

    return execute


def test_results_and_resume(tmp_path):
    calls = []
    rows = run_sweep(BASE, ["a", "b"], [0.5, 0.9], [0, 1], tmp_path, fake_execute(calls))
    assert len(calls) == 8 and len(rows) == 8
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[0]["pruner"] == "a"
    md = (tmp_path / "results.md").read_text()
    # a at 0.5: accuracies 75 and 74 -> 74.50 ± 0.71; b: 75 and 75
    assert "| 50% | 74.50 ± 0.71 | 75.00 ± 0.00 |" in md
    assert "| 90% | 54.50 ± 0.71 | 55.00 ± 0.00 |" in md
    png = tmp_path / "accuracy_vs_sparsity.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    calls.clear()
    run_sweep(BASE, ["a", "b"], [0.5, 0.9], [0, 1], tmp_path, fake_execute(calls))
    assert calls == []  # nothing recomputed


def test_interrupted_sweep_leaves_no_partial_files_and_resumes(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(BASE, ["a"], [0.5, 0.9], [0, 1], tmp_path, fake_execute(calls, fail_at=3))
    cells = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert cells == ["a_s0.5_seed0.json", "a_s0.5_seed1.json"]
    hidden = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert hidden == [".prunekit-output"]  # the marker, no temp files
    calls.clear()
    run_sweep(BASE, ["a"], [0.5, 0.9], [0, 1], tmp_path, fake_execute(calls))
    assert calls == [("a", 0.9, 0), ("a", 0.9, 1)]


def test_resume_with_other_settings_is_refused(tmp_path):
    run_sweep(BASE, ["a"], [0.5], [0], tmp_path, fake_execute([]))
    other = dataclasses.replace(BASE, mask="layer")
    with pytest.raises(UsageError, match=r"other settings \(mask\)"):
        run_sweep(other, ["a"], [0.5], [0], tmp_path, fake_execute([]))


def test_sweep_command_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "sample:digits-mlp",
        "--pruners",
        "magnitude,woodfisher",
        "--sparsities",
        "0.5,0.9",
        "--seeds",
        "0",
        "--param",
        "num_grads=64",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| sparsity | magnitude | woodfisher |" in result.stdout
    assert len(list((out / "cells").iterdir())) == 4
    bad = CliRunner().invoke(app, [*args[:-4], "--param", "nonsense=1", "--out", str(out)])
    assert bad.exit_code == 2 and "none of the pruners accepts it" in bad.stderr


def test_structured_sweep_charts_accuracy_against_latency(tmp_path):
    out = tmp_path / "structured"
    args = ["sweep", "sample:digits-cnn", "--pruners", "magnitude", "--sparsities",
            "0.25,0.75", "--seeds", "0", "--structure", "channels", "--mask", "layer",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sparsity"]) for r in rows] == [0.25, 0.75]
    assert all(float(r["latency_ms"]) > 0 and float(r["speedup"]) > 0 for r in rows)
    assert (out / "accuracy_vs_latency.png").stat().st_size > 1000
    # item 4 of the new-user trial: progress without a terminal, every file named, latency
    # columns, the dense accuracy, and toy-model timings called noise
    assert "progress: cell 1/2 magnitude_s0.25_seed0 done" in result.stderr
    assert "accuracy_vs_latency.png" in result.stdout
    md = (out / "results.md").read_text()
    assert "ONNX Runtime latency at batch 1, ms (speed-up over the dense model)" in md
    assert f"{float(rows[0]['latency_ms']):.3f} ({float(rows[0]['speedup']):.2f}x)" in md
    assert f"Dense model: {100 * float(rows[0]['accuracy_dense']):.2f} %." in md
    assert "timings are noise" in md


def test_quantized_sweep_times_every_cells_int8_export(tmp_path):
    out = tmp_path / "quantized"
    args = ["sweep", "sample:digits-cnn", "--pruners", "magnitude,fisher_pruner",
            "--sparsities", "0.5", "--seeds", "0", "--quantize", "int8",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["pruner"] for r in rows] == ["magnitude", "fisher_pruner"]
    assert all(float(r["latency_ms"]) > 0 and float(r["speedup"]) > 0 for r in rows)
    assert (out / "accuracy_vs_latency.png").stat().st_size > 1000
