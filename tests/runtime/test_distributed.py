"""torchrun data parallelism on CPU (gloo): two processes give the masks and weights of one,
the collectives against their single-process oracles, and a failure ends every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from prunekit.runtime import distributed
from tests.cli_helpers import prune_report

RUNS = {
    "woodfisher": ("sample:digits-mlp", "-p", "woodfisher", "-s", "0.8",
                   "--param", "num_grads=200"),  # m >= B: Gram blocks all-reduced
    "woodfisher-rows": ("sample:digits-mlp", "-p", "woodfisher", "-s", "0.8",
                        "--param", "num_grads=64"),  # m < B: gradient rows gathered
    "fisher_pruner": ("sample:digits-cnn", "-p", "fisher_pruner", "-s", "0.6",
                      "--param", "num_grads=200"),
    "sparsegpt": ("sample:digits-cnn", "-p", "sparsegpt", "-s", "0.6", "--mask", "layer"),
    "layer_obs": ("sample:digits-cnn", "-p", "layer_obs", "-s", "0.5", "--mask", "layer",
                  "--structure", "channels"),  # input Gram matrices all-reduced
}  # fmt: skip


def torchrun(procs: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}", "-m", "prunekit", "prune", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("run", RUNS)
def test_two_processes_prune_like_one(tmp_path, run):
    args = (*RUNS[run], "--device", "cpu")
    one = prune_report(*args, "--out", str(tmp_path / "one"))
    result = torchrun(2, *args, "--out", "two", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)  # printed once, by rank 0
    assert (one["world_size"], two["world_size"]) == (1, 2)
    dense = load_file(tmp_path / "one" / "model.safetensors")
    shared = load_file(tmp_path / "two" / "model.safetensors")
    for name, weight in dense.items():
        assert torch.equal(weight == 0, shared[name] == 0), name  # the same masks
        # the same OBS update, up to float32 sums taken in another order
        torch.testing.assert_close(shared[name], weight, rtol=1e-3, atol=1e-3 * weight.abs().max())
    assert one["sparsity"]["achieved"] == two["sparsity"]["achieved"]


def test_a_failure_ends_every_rank_with_one_error_line(tmp_path):
    # every rank meets it: rank 0 prints it, torchrun stops rank 1 before it does
    result = torchrun(2, "sample:digits-mlp", "-p", "woodfisher", "-s", "0.5", "--param",
                      "num_grads=1", "--device", "cpu", "--out", "out", cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert ours == [
        "error on rank 0 of 2: 1 calibration gradients cannot be shared by 2 processes; "
        "raise --param num_grads (num_samples) or start fewer processes"
    ], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failure_on_one_rank_ends_the_others_with_its_line_only(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "import os\nfrom torch import nn\n\n\ndef make(num_classes=10):\n"
        "    if os.environ['RANK'] == '1':\n        raise ValueError('rank 1 cannot')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    result = torchrun(2, "flaky:make", "--data", "digits", "-p", "woodfisher", "-s", "0.5",
                      "--param", "num_grads=64", "--device", "cpu", "--out", "out",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error", "[rank"))]
    assert ours == [
        "error on rank 1 of 2: model factory 'flaky:make' failed (ValueError: rank 1 cannot); "
        "fix the factory"
    ], result.stderr  # rank 0, waiting in a collective, was stopped without a traceback
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = torch.arange(6 * rank + 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank
        gathered = distributed.gather_rows(rows)  # rank 0: 1 row, rank 1: 4 rows
        total = torch.full((3,), float(rank + 1))
        distributed.all_reduce_sum([total])
        mask = torch.tensor([rank == 0, rank == 1])
        distributed.broadcast([mask])
        agree = distributed.all_agree(rank == 0, torch.device("cpu"))
        torch.save(
            {"rows": gathered, "sum": total, "mask": mask, "agree": agree,
             "shard": tuple(distributed.shard(7))}, f"{out}/{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_collectives_against_their_single_process_meaning(tmp_path):
    mp.spawn(_collectives, args=(_free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    expected = torch.cat([torch.arange(2.0).reshape(1, 2), torch.arange(8.0).reshape(4, 2) + 10])
    for r in (r0, r1):
        torch.testing.assert_close(r["rows"], expected)  # rank order, uneven lengths
        torch.testing.assert_close(r["sum"], torch.full((3,), 3.0))
        assert r["mask"].tolist() == [True, False]  # rank 0's
        assert r["agree"] is False  # rank 1 said no
    assert (r0["shard"], r1["shard"]) == ((0, 1, 2), (3, 4, 5, 6))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nccl)")
def test_nccl_world_size_one_masks_equal_a_plain_run(tmp_path):
    args = (*RUNS["woodfisher"], "--device", "cuda")
    plain = prune_report(*args, "--out", str(tmp_path / "plain"))
    result = torchrun(1, *args, "--out", "nccl", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["world_size"] == 1
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "nccl" / "model.safetensors")
    assert plain["world_size"] == 1
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name


def test_sweep_under_several_processes_says_to_prune_per_cell(tmp_path, monkeypatch):
    from tests.cli_helpers import invoke

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("sweep", "sample:digits-mlp", "--pruners", "magnitude", "--sparsities",
                    "0.5", "--out", str(tmp_path / "s"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "error on rank 0 of 2: prunekit sweep runs in one process" in result.stderr
    assert not (tmp_path / "s").exists()
