import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.engine.batchnorm import recalibrate_batchnorm
from tests.cli_helpers import prune_report


def test_running_statistics_become_the_exact_data_statistics():
    x = torch.arange(60, dtype=torch.float32).reshape(20, 3) ** 1.5
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(100.0)
    model.eval()
    assert (
        recalibrate_batchnorm(
            model,
            TensorDataset(x, torch.zeros(20)),
            torch.device("cpu"),
            batch_size=5,  # equal batches: their means average to the mean
        )
        == 1
    )
    torch.testing.assert_close(model[0].running_mean, x.mean(0))
    assert model[0].momentum == 0.1 and not model.training


def test_recalibration_recovers_a_pruned_resnet(tmp_path):
    accuracy = []
    for extra in ([], ["--recalibrate-bn"]):
        out = str(tmp_path / str(len(extra)))
        report = prune_report(
            "sample:digits-resnet", "-p", "magnitude", "-s", "0.9", "--out", out, *extra
        )
        accuracy.append(report["accuracy"]["pruned"])
    assert accuracy[0] < 0.75 and accuracy[1] > 0.9  # measured: 66.9 % -> 95.8 %
