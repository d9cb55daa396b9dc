"""Distillation loss and gradient against a hand computation; augmentation only for images;
distillation fine-tunes unlabeled data and encoders; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.engine.distill import augment_images, distillation_loss, is_image_batch
from tests.cli_helpers import CNN_HALF, MLP_HALF, assert_error, prune, prune_report


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_distillation_loss_and_gradient_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.5, 0.5, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    temp, weight = 2.0, 0.9
    loss = distillation_loss(s, t, y, temp, weight)
    kd = ce = 0.0
    grad = []
    for i in range(2):
        ps = _softmax([v / temp for v in s[i].tolist()])
        pt = _softmax([v / temp for v in t[i].tolist()])
        kd += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True)) * temp**2 / 2
        p1 = _softmax(s[i].tolist())
        ce -= math.log(p1[y[i]]) / 2
        onehot = [1.0 if j == y[i] else 0.0 for j in range(3)]
        grad.append([
            weight * temp * (a - b) / 2 + (1 - weight) * (c - d) / 2
            for a, b, c, d in zip(ps, pt, p1, onehot, strict=True)
        ])  # fmt: skip
    assert loss.item() == pytest.approx(weight * kd + (1 - weight) * ce, rel=1e-12)
    loss.backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, torch.tensor(grad, dtype=torch.float64))


def test_unlabeled_batches_distill_only_and_embeddings_use_the_cosine():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    none = torch.tensor([-1])
    kd = distillation_loss(s, t, none, 1.0, 0.5)
    p_t, p_s = torch.softmax(t, 1), torch.softmax(s, 1)
    assert kd.item() == pytest.approx(float((p_t * (p_t / p_s).log()).sum()), rel=1e-6)
    cosine = distillation_loss(s, t, none, 1.0, 0.5, embeddings=True)
    assert cosine.item() == pytest.approx(1 - 24 / 25, rel=1e-6)


def test_augmentation_crops_and_flips_each_image_and_is_seeded():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = augment_images(x, torch.Generator().manual_seed(0), padding=1)
    again = augment_images(x, torch.Generator().manual_seed(0), padding=1)
    assert torch.equal(out, again) and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):  # each output is a crop of the padded image, flipped or not
        crops = [padded[i, :, r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    assert is_image_batch((3, 32, 32), torch.float32)
    assert not is_image_batch((64,), torch.float32)  # flat features
    assert not is_image_batch((16,), torch.int64) and not is_image_batch((1, 4, 4), torch.float32)


def test_fine_tuning_augments_images_by_default_and_distills_when_asked(tmp_path):
    report = prune_report(*CNN_HALF, "--finetune-epochs", "1", "--out", str(tmp_path / "a"))
    assert report["fine_tuning"] == {"distill": False, "temperature": None,
                                     "distill_weight": None, "augment": True}  # fmt: skip
    asked = prune_report(*CNN_HALF, "--finetune-epochs", "1", "--distill",
                         "--out", str(tmp_path / "d"))  # fmt: skip
    assert asked["fine_tuning"] == {"distill": True, "temperature": 4.0,
                                    "distill_weight": 0.9, "augment": True}  # fmt: skip
    flat = prune_report(*MLP_HALF, "--data", _flat_digits(tmp_path), "--finetune-epochs", "1",
                        "--no-distill", "--out", str(tmp_path / "b"))  # fmt: skip
    assert flat["fine_tuning"]["augment"] is False and flat["fine_tuning"]["distill"] is False
    assert prune_report(*CNN_HALF, "--out", str(tmp_path / "c"))["fine_tuning"] is None


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--distill",), ("--distill applies to fine-tuning", "add --finetune-epochs")),
        (("--augment",), ("--augment applies to fine-tuning",)),
    ],
)
def test_distill_or_augment_without_training_is_a_usage_error(tmp_path, args, fragments):
    assert_error(prune(*CNN_HALF, *args, "--out", str(tmp_path / "x")), 2, *fragments)


def _flat_digits(folder) -> str:
    """The digits as flat 64-feature rows (not images), as a tensors: spec."""
    from prunekit.load.data import load_data

    x, y = load_data("digits").test.tensors
    torch.save({"x": x.reshape(len(x), -1), "y": y}, folder / "flat.pt")
    return f"tensors:{folder / 'flat.pt'}"


def test_augmentation_asked_on_non_image_data_is_a_usage_error(tmp_path):
    result = prune(*MLP_HALF, "--data", _flat_digits(tmp_path), "--finetune-epochs", "1",
                   "--augment", "--out", str(tmp_path / "x"))  # fmt: skip
    assert_error(result, 2, "--augment crops and flips images", "shape (64,)")
