"""Masked training, the gradual and pbt schedules, and their bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import app
from prunekit.engine.masks import apply, find_targets, select, sparsity_of
from prunekit.engine.schedule import ScheduleConfig, cubic_sparsities, run_schedule
from prunekit.engine.step import Pruning
from prunekit.engine.train import TrainConfig, train
from prunekit.errors import UsageError
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.pruners import registry
from tests.cli_helpers import assert_error, prune_report, runner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def pruned_mlp(sparsity=0.8):
    model = load_model("sample:digits-mlp").model
    targets, _ = find_targets(model)
    apply(targets, select(targets, {t.name: t.weight.abs() for t in targets}, sparsity))
    return model, targets


def test_masked_training_keeps_pruned_weights_exactly_zero(digits):
    model, targets = pruned_mlp()
    history = train(
        model,
        digits.train,
        epochs=3,
        device=CPU,
        targets=targets,
        config=TrainConfig(lr=0.1, optimizer="sgd", weight_decay=1e-3),
    )
    assert len(history) == 3 and all(r["loss"] > 0 for r in history)
    for t in targets:
        assert torch.all(t.weight[~t.mask] == 0.0)
        assert torch.all(t.weight[t.mask] != 0.0)  # the kept ones trained on
    # the same run without the re-masking moves the pruned weights (the test can fail)
    model2, targets2 = pruned_mlp()
    train(model2, digits.train, epochs=1, device=CPU, config=TrainConfig(lr=0.1))
    assert any(torch.any(t.weight[~t.mask] != 0.0) for t in targets2)


def test_training_is_deterministic_and_evaluates_per_epoch(digits):
    from prunekit.validate.metrics import accuracy

    runs = []
    for _ in range(2):
        model, targets = pruned_mlp()
        runs.append(
            train(
                model,
                digits.train,
                epochs=2,
                device=CPU,
                targets=targets,
                seed=5,
                config=TrainConfig(optimizer="adam", lr=1e-3, lr_schedule="multistep"),
                evaluate=lambda m: accuracy(m, digits.test, CPU),
            )
        )
    assert runs[0] == runs[1]
    assert all(0.5 < r["validation_accuracy"] <= 1.0 for r in runs[0])


def test_cubic_schedule_values():
    assert cubic_sparsities(0.0, 0.9, 3) == pytest.approx(
        [0.9 - 0.9 * (2 / 3) ** 3, 0.9 - 0.9 / 27, 0.9]
    )
    assert cubic_sparsities(0.5, 0.9, 1) == [0.9]


def test_gradual_reaches_exactly_the_target(digits):
    model = load_model("sample:digits-mlp").model
    targets, _ = find_targets(model)
    ctx = Pruning.of(model, targets, registry.create("magnitude"), digits.calibration, CPU)
    schedule = ScheduleConfig(kind="gradual", steps=3, initial_sparsity=0.2, finetune_epochs=1)
    _, history = run_schedule(ctx, 0.9, schedule, digits.train)
    levels = [h["sparsity"] for h in history if h["phase"].startswith("prune")]
    assert levels[0] == pytest.approx(0.2, abs=1e-4)
    assert levels[1:] == pytest.approx(cubic_sparsities(0.2, 0.9, 3), abs=1e-4)
    assert sparsity_of(targets)[0] == pytest.approx(0.9, abs=1 / 17024)
    assert all(torch.all(t.weight[~t.mask] == 0) for t in targets)


def prepare_calls(digits, schedule: ScheduleConfig) -> list[tuple[int, int, int]]:
    """(pruner id, step, steps) of every prepare() call during a magnitude run."""
    from prunekit.pruners.magnitude import MagnitudePruner

    calls = []

    class Recording(MagnitudePruner):
        def prepare(self, context, step, steps):
            calls.append((id(self), step, steps))

    model = load_model("sample:digits-mlp").model
    targets, _ = find_targets(model)
    ctx = Pruning.of(model, targets, Recording(), digits.calibration, CPU)
    run_schedule(ctx, 0.8, schedule, digits.train)
    return calls


def test_gradual_calls_the_prepare_hook_and_keeps_the_pruner(digits):
    calls = prepare_calls(digits, ScheduleConfig(kind="gradual", steps=3))
    assert [c[1:] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert len({c[0] for c in calls}) == 1  # one pruner object across the steps


def test_pbt_reinitialises_then_trains_with_the_mask(digits):
    model = load_model("sample:digits-mlp").model
    trained = model.net[1].weight.detach().clone()
    targets, _ = find_targets(model)
    ctx = Pruning.of(
        model,
        targets,
        registry.create("snip", {"num_grads": "64"}),
        digits.calibration,
        CPU,
        seed=3,
    )
    _, history = run_schedule(ctx, 0.9, ScheduleConfig(kind="pbt", epochs=2), digits.train)
    assert not torch.equal(model.net[1].weight[targets[0].mask], trained[targets[0].mask])
    assert [h["phase"] for h in history] == ["prune 1/1", "train", "train"]
    assert sparsity_of(targets)[0] == pytest.approx(0.9, abs=1e-4)
    assert all(torch.all(t.weight[~t.mask] == 0) for t in targets)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "gradual", "steps": 0}, "--steps 0"),
        ({"kind": "gradual", "initial_sparsity": 0.95}, "--initial-sparsity 0.95"),
        ({"kind": "pbt", "epochs": -1}, "--epochs must be from 0 to"),
        ({"kind": "sometimes"}, "--schedule sometimes"),
    ],
)
def test_impossible_schedules(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        ScheduleConfig(**kwargs).check(0.9)


def test_training_split_smaller_than_batch():
    with pytest.raises(UsageError, match="fewer than --batch-size 64"):
        TrainConfig(batch_size=64).check(10)


def test_cli_gradual_and_bad_inputs(tmp_path):
    mlp_90 = ("sample:digits-mlp", "-p", "magnitude", "-s", "0.9")
    report = prune_report(
        *mlp_90,
        "--schedule",
        "gradual",
        "--steps",
        "2",
        "--finetune-epochs",
        "1",
        "--out",
        str(tmp_path / "g"),
    )
    assert report["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert [h["phase"] for h in report["history"]] == [
        "prune 1/2",
        "fine-tune 1/2",
        "prune 2/2",
        "fine-tune 2/2",
    ]
    base = ["prune", *mlp_90, "--out", str(tmp_path / "o")]
    assert_error(
        runner.invoke(app, [*base, "--schedule", "gradual", "--steps", "0"]), 2, "--steps 0"
    )
    assert_error(
        runner.invoke(app, [*base, "--schedule", "gradual", "--initial-sparsity", "0.95"]),
        2,
        "--initial-sparsity 0.95",
    )
    result = runner.invoke(app, [*base, "--finetune-epochs", "-1"])
    assert_error(result, 2, "--finetune-epochs must be from 0 to")
    small = tmp_path / "small.pt"
    torch.save(
        {
            "x_train": torch.zeros(10, 1, 8, 8),
            "y_train": torch.zeros(10).long(),
            "x_test": torch.zeros(4, 1, 8, 8),
            "y_test": torch.zeros(4).long(),
        },
        small,
    )
    assert_error(
        runner.invoke(
            app, [*base, "--schedule", "pbt", "--epochs", "1", "--data", f"tensors:{small}"]
        ),
        2,
        "training split has 9 samples to train on (after the validation part), fewer than "
        "--batch-size 64",
    )
    assert not (tmp_path / "o").exists()


def test_unlabeled_data(tmp_path):
    x = load_data("digits").test.tensors[0]
    path = tmp_path / "x.pt"
    torch.save({"x": x}, path)
    splits = load_data(f"tensors:{path}")
    assert not splits.labeled
    base = [
        "prune",
        "sample:digits-mlp",
        "-s",
        "0.5",
        "--data",
        f"tensors:{path}",
        "--out",
        str(tmp_path / "o"),
    ]
    assert_error(
        runner.invoke(app, [*base, "-p", "snip"]),
        2,
        "pruner 'snip' ranks by the mean gradient, which is zero under --objective kl",
    )
    assert_error(
        runner.invoke(app, [*base, "-p", "snip", "--objective", "labels"]),
        2,
        "--objective labels needs labels",
    )
    gradual = [*base, "-p", "magnitude", "--schedule", "gradual", "--finetune-epochs", "1",
               "--steps", "2"]  # fmt: skip
    assert_error(
        runner.invoke(app, [*gradual, "--no-distill"]), 2, "needs labels or the dense model"
    )
    distilled = runner.invoke(app, [*gradual, "--json"])  # the teacher: labels
    assert distilled.exit_code == 0, distilled.output
    assert json.loads(distilled.stdout)["fine_tuning"]["distill"] is True
    weights = {}
    for name, extra in (("kl", []), ("true", ["--param", "fisher=true"])):
        out = tmp_path / name
        args = [*base[:-1], str(out), "-p", "fisher_pruner", "--param", "num_grads=200", *extra]
        ok = runner.invoke(app, [*args, "--json"])
        assert ok.exit_code == 0, ok.output
        report = json.loads(ok.stdout)
        assert report["objective"] == "kl" and report["accuracy"] == {"dense": None, "pruned": None}
        assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)
        weights[name] = load_file(out / "model.safetensors")
    # no labels: KL to the model's own predictions, i.e. labels drawn from it (fisher=true)
    for key, value in weights["kl"].items():
        assert torch.equal(value, weights["true"][key]), key


def test_prepare_runs_before_every_sub_step(digits):
    calls = prepare_calls(digits, ScheduleConfig(kind="gradual", steps=2, recompute=2))
    assert [c[1:] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_schedules_refuse_options_that_would_do_nothing(tmp_path):
    """Item 9 of the new-user trial: pbt without --epochs trained nothing (4.5 %), gradual
    without --steps ran one step, --steps with oneshot was ignored, and fine-tuning that
    diverged at --lr 5 said "raise --param damp"."""
    base = ["prune", "sample:digits-mlp", "-p", "magnitude", "-s", "0.5",
            "--out", str(tmp_path / "o")]  # fmt: skip
    cases = [
        (["--schedule", "pbt"], "--schedule pbt re-initialises the weights"),
        (["--schedule", "gradual", "--finetune-epochs", "1"], "give --steps"),
        (["--steps", "3"], "--steps 3 applies to --schedule gradual"),
        (["--epochs", "2"], "--epochs applies to --schedule pbt"),
        (["--warmup-epochs", "2"], "--warmup-epochs applies to --schedule pbt"),
        (["--schedule", "pbt", "--epochs", "1", "--finetune-epochs", "1"],
         "drop --finetune-epochs"),
        (["--finetune-epochs", "1", "--lr", "1e30"], "fine-tuning diverged"),
    ]  # fmt: skip
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert_error(result, 2 if "diverged" not in message else 1, message)
        assert not (tmp_path / "o").exists()
    diverged = runner.invoke(app, [*base, "--finetune-epochs", "1", "--lr", "1e30"])
    assert "lower --lr" in diverged.output and "damp" not in diverged.output


def test_fine_tuning_history_is_measured_on_a_validation_split_held_out_of_training(tmp_path):
    """Build item of the new-user trial: the test split is touched only by the final
    evaluation; the history of a run that trains reads a part held out of the training
    split, disjoint from what it trains on."""
    from torch.utils.data import TensorDataset

    from prunekit.load.data import validation_split

    data = TensorDataset(torch.arange(300).float().unsqueeze(1), torch.zeros(300).long())
    fit, held = validation_split(data)
    assert held is not None and len(held) == 30 and len(fit) == 270
    assert not {int(x) for x, _ in fit} & {int(x) for x, _ in held}
    assert validation_split(TensorDataset(torch.zeros(9, 1), torch.zeros(9).long()))[1] is None
    big = validation_split(TensorDataset(torch.zeros(20_000, 1), torch.zeros(20_000).long()))
    assert big[1] is not None and len(big[1]) == 1000  # capped
    report = prune_report("sample:digits-mlp", "-p", "magnitude", "-s", "0.5",
                          "--finetune-epochs", "1", "--batch-size", "32",
                          "--out", str(tmp_path / "o"))  # fmt: skip
    assert report["validation_samples"] == round(0.1 * 1437)
    tuned = [h for h in report["history"] if h["phase"] == "fine-tune"]
    assert tuned and all(0 <= h["validation_accuracy"] <= 1 for h in tuned)
    assert all("accuracy" not in h for h in report["history"])  # the test split stays unseen
