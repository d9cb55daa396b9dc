"""The GPU check script runs end to end on the CPU with tiny models (what CI can run), so it is
known to work the moment a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_small_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PRUNEKIT_PLUGINS"}  # fishleg too
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tests"] == {"ran": False, "why": "no CUDA device: the CUDA tests need one"}
    names = [r["name"] for r in result["runs"]]
    assert names[:3] == ["digits-cnn woodfisher", "digits-cnn fishleg", "digits-mlp sparsegpt"]
    for run in result["runs"]:
        assert run["ok"] and run["device"] == "cpu" and 0.9 < run["accuracy"]["pruned"] <= 1
    woodfisher = result["runs"][0]
    assert woodfisher["passes"] >= 1 and woodfisher["planned_peak_bytes"] > 0
    assert "| digits-cnn fishleg | yes |" in (tmp_path / "gpu_check.md").read_text()
