import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from prunekit.data import load_data
from prunekit.errors import InputFileError, UnknownNameError, UsageError


def test_digits_splits_are_fixed():
    a, b = load_data("digits"), load_data("digits")
    assert (len(a.train), len(a.calibration), len(a.test)) == (1438, 1438, 359)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    x, _ = a.train.tensors
    assert x.min() == 0.0 and x.max() == 1.0


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_tensor_files(tmp_path, suffix):
    x = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    y = torch.arange(50) % 4
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    elif suffix == ".pt":
        torch.save({"x": x, "y": y}, path)
    else:
        save_file({"x": x, "y": y}, path)
    splits = load_data(f"tensors:{path}")
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert splits.num_classes == 4 and splits.input_shape == (3,)
    seen = torch.cat([splits.train.tensors[0], splits.test.tensors[0]])
    assert sorted(seen[:, 0].tolist()) == x[:, 0].tolist()  # a partition of the rows


def test_tensor_file_with_explicit_splits(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file(
        {
            "x_train": torch.zeros(6, 2),
            "y_train": torch.tensor([0, 1, 2, 0, 1, 2]),
            "x_test": torch.ones(3, 2),
            "y_test": torch.tensor([0, 1, 2]),
        },
        path,
    )
    splits = load_data(f"tensors:{path}")
    assert (len(splits.train), len(splits.test)) == (6, 3)


def test_tensor_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_data(f"tensors:{tmp_path / 'none.npz'}")
    path = tmp_path / "d.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(InputFileError, match="needs x and y"):
        load_data(f"tensors:{path}")


def test_cifar10_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(InputFileError, match="cifar-10-batches-py"):
        load_data(f"cifar10:{tmp_path}")


def test_imagefolder(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    splits = load_data(f"imagefolder:{tmp_path}")
    assert splits.num_classes == 2 and splits.input_shape == (3, 4, 4)
    assert (len(splits.train), len(splits.test)) == (8, 2)


def test_bad_specs():
    with pytest.raises(UnknownNameError, match="use one of digits"):
        load_data("mnist")
    with pytest.raises(UsageError, match="needs a path"):
        load_data("cifar10")


def test_imagefolder_with_only_a_train_folder_is_split(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(
                tmp_path / "train" / cls / f"{i}.png"
            )
    splits = load_data(f"imagefolder:{tmp_path}")
    assert splits.num_classes == 2 and (len(splits.train), len(splits.test)) == (8, 2)
