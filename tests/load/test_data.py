import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from prunekit.errors import InputFileError, UnknownNameError, UsageError
from prunekit.load.data import load_data
from prunekit.load.preprocess import Preprocess


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


def test_uint8_images_with_normalisation_equal_float_inputs_normalised_by_hand(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=gen)
    labels = torch.arange(10) % 3
    np.savez(tmp_path / "train.npz", x=images.numpy(), y=labels.numpy())
    np.savez(tmp_path / "test.npz", x=images[:4].numpy(), y=labels[:4].numpy())
    spec = f"tensors:{tmp_path / 'train.npz'},{tmp_path / 'test.npz'}"
    splits = load_data(spec, Preprocess(normalize="imagenet"))
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    by_hand = (images.double() / 255 - mean.double()) / std.double()
    x_train, y_train = splits.train.tensors
    assert x_train.dtype == torch.float32 and torch.equal(y_train, labels)
    torch.testing.assert_close(x_train.double(), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(splits.test.tensors[0].double(), by_hand[:4], rtol=0, atol=1e-6)
    assert (len(splits.train), len(splits.test), splits.input_shape) == (10, 4, (3, 4, 4))
    explicit = load_data(spec, Preprocess(normalize="0.485,0.456,0.406/0.229,0.224,0.225"))
    assert torch.equal(explicit.train.tensors[0], x_train)
    plain = load_data(spec).train.tensors[0]  # uint8 alone is only scaled to [0, 1]
    torch.testing.assert_close(plain, images.float() / 255)


def test_integer_inputs_are_never_cast_to_float(tmp_path):
    tokens = torch.randint(0, 1000, (20, 7))
    np.savez(tmp_path / "d.npz", x=tokens.numpy(), y=(torch.arange(20) % 2).numpy())
    x = load_data(f"tensors:{tmp_path / 'd.npz'}").train.tensors[0]
    assert x.dtype == torch.int64
    assert set(x[:, 0].tolist()) <= set(tokens[:, 0].tolist())


def test_normalisation_with_the_wrong_number_of_channels_names_both(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 1, 4, 4), np.uint8), y=np.arange(10) % 2)
    with pytest.raises(UsageError, match=r"gives 3 channel\(s\) but .* has 1; give 1 mean"):
        load_data(f"tensors:{tmp_path / 'd.npz'}", Preprocess(normalize="imagenet"))
    with pytest.raises(UsageError, match="one value per channel"):
        Preprocess(normalize="0.5,0.5/0.2").check()
    with pytest.raises(UsageError, match="must be at least 1e-6"):
        Preprocess(normalize="0.5/0").check()


def test_imagefolder_of_mixed_sizes_resizes_and_crops(tmp_path):
    sizes = [(6, 6), (8, 12), (10, 7), (5, 9)]  # (height, width)
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    splits = load_data(f"imagefolder:{tmp_path}")  # the first image's size, 6x6
    assert splits.input_shape == (3, 6, 6)
    assert {tuple(splits.train[i][0].shape) for i in range(len(splits.train))} == {(3, 6, 6)}
    sized = load_data(f"imagefolder:{tmp_path}", Preprocess(normalize="imagenet", image_size=4))
    x, label = sized.test[0]
    assert x.shape == (3, 4, 4)
    expected = (255 * label / 255 - 0.485) / 0.229  # cat = black, dog = white; red channel
    torch.testing.assert_close(x[0], torch.full((4, 4), expected), rtol=0, atol=1e-5)
