"""Dataset specs and deterministic train / calibration / test splits.

Specs: ``digits`` (embedded UCI digits), ``cifar10:DIR``, ``imagefolder:DIR`` and
``tensors:FILE`` (x and y in .pt, .npz or .safetensors; ``tensors:TRAIN,TEST`` for two
files). Inputs are preprocessed by ``prunekit.load.preprocess`` (uint8 scaling, ``--normalize``,
``--image-size``). Splits never depend on --seed, so runs with different seeds are compared
on the same data.
"""

from __future__ import annotations

import numbers
import pickle
import re
import warnings
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from prunekit.errors import InputFileError, ModelMismatchError, UnknownNameError, UsageError
from prunekit.load.preprocess import PRESETS, Normalization, Preprocess

SPLIT_SEED = 0
TEST_FRACTION = 0.2
CALIBRATION_MAX = 2048
DIGITS_FILE = Path(__file__).parent / "datasets" / "digits.safetensors"
SPEC_FORMS = (
    "digits, cifar10:DIR, imagefolder:DIR, tensors:FILE, tensors:TRAIN,TEST, text:FILE (hf: models)"
)
UNLABELED = -1
MIN_TRAIN, MIN_TEST = 2, 1  # samples: the least that calibration and the test split run on


@dataclass
class Splits:
    """The three splits of a dataset plus what a model needs to know about it."""

    spec: str
    train: Dataset
    calibration: Dataset  # a fixed subset of train used for pruning statistics
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    labeled: bool = True  # False: labels are UNLABELED; no accuracy, no empirical Fisher
    notes: list[str] = field(default_factory=list)  # worth a warning (e.g. texts cut)

    def __post_init__(self) -> None:
        check_sizes(self.spec, len(cast(Sized, self.train)), len(cast(Sized, self.test)))


def check_sizes(spec: str, n_train: int, n_test: int) -> None:
    if n_train < MIN_TRAIN or n_test < MIN_TEST:
        raise InputFileError(
            f"{spec} gives {n_train} training and {n_test} test samples; prunekit needs at "
            f"least {MIN_TRAIN} and {MIN_TEST} ({MIN_TRAIN + MIN_TEST} samples in one file): "
            "add data"
        )


def _permutation(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))


def calibration_of(train: Dataset) -> Dataset:
    n = len(cast(Sized, train))
    return Subset(train, _permutation(n)[: min(n, CALIBRATION_MAX)].tolist())


VALIDATION_FRACTION, VALIDATION_MAX = 0.1, 1000  # of the training split, when a run trains


def validation_size(n: int) -> int:
    """Samples held out of a training split of ``n`` (none below 10 samples)."""
    return min(VALIDATION_MAX, round(n * VALIDATION_FRACTION)) if n >= 10 else 0


def validation_split(train: Dataset) -> tuple[Dataset, Dataset | None]:
    """The training split without its held-out validation part, and that part: the last
    samples of the split's fixed permutation, so that where the split holds more than the
    calibration subset (its first samples) the two are disjoint. Training history is measured
    there; the test split is touched only by the final evaluation."""
    n = len(cast(Sized, train))
    held = validation_size(n)
    if held == 0:
        return train, None
    order = _permutation(n).tolist()
    return Subset(train, order[: n - held]), Subset(train, order[n - held :])


def _split_tensors(spec: str, x: torch.Tensor, y: torch.Tensor, prep: Preprocess) -> Splits:
    """Shuffle once with the fixed split seed; the last TEST_FRACTION is the test split."""
    y = check_pair(spec, x, y)
    order = _permutation(len(x))
    n_test = max(MIN_TEST, round(len(x) * TEST_FRACTION)) if len(x) > MIN_TEST else 0
    train_idx, test_idx = order[: len(x) - n_test], order[len(x) - n_test :]
    return _assemble(spec, x[train_idx], y[train_idx], x[test_idx], y[test_idx], prep)


def _from_tensors(
    spec: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    prep: Preprocess,
) -> Splits:
    """Splits given by the user, each checked."""
    y_train = check_pair(f"{spec} (train)", x_train, y_train)
    y_test = check_pair(f"{spec} (test)", x_test, y_test)
    return _assemble(spec, x_train, y_train, x_test, y_test, prep)


def _assemble(
    spec: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    prep: Preprocess,
) -> Splits:
    """Splits of checked tensors (int64 labels)."""
    check_sizes(spec, len(x_train), len(x_test))
    shape = tuple(x_train.shape[1:])
    x_train, x_test = prep.tensors(x_train, spec), prep.tensors(x_test, spec)
    train = TensorDataset(x_train, y_train)
    unlabeled = [bool((y == UNLABELED).all()) for y in (y_train, y_test)]
    if unlabeled[0] != unlabeled[1]:
        raise InputFileError(
            f"{spec}: one split has labels and the other none; label both or neither"
        )
    labeled = not unlabeled[0]
    return Splits(
        spec=spec,
        train=train,
        calibration=calibration_of(train),
        test=TensorDataset(x_test, y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1 if labeled else 0,
        input_shape=shape,
        labeled=labeled,
    )


def labels_of(spec: str, y: torch.Tensor) -> torch.Tensor:
    """Integer labels as int64 (unsigned types included); anything else is an error."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise InputFileError(
            f"{spec}: y is {str(y.dtype).removeprefix('torch.')}; labels must be integer "
            "class indices 0..C-1"
        )
    return y.to(torch.int64)  # uint64 beyond int64 wraps negative: refused as a label below


def check_pair(spec: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Same length, one integer label per sample (all -1: unlabeled), finite inputs; returns
    the labels as int64."""
    if x.dim() == 0 or y.dim() == 0:
        raise InputFileError(f"{spec}: x and y must have a sample dimension; got scalars")
    if len(x) != len(y):
        raise InputFileError(
            f"{spec}: x has {len(x)} samples and y {len(y)}; give one label per sample"
        )
    if y.dim() != 1:
        raise InputFileError(
            f"{spec}: y has shape {tuple(y.shape)}; labels must be one class index per sample, "
            "shape (N,): save y.reshape(-1) (or argmax of one-hot labels)"
        )
    y = labels_of(spec, y)
    negative = (y < 0) & (y != UNLABELED)
    partly_unlabeled = bool((y == UNLABELED).any()) and not bool((y == UNLABELED).all())
    if negative.any() or partly_unlabeled:
        i = int(torch.nonzero(negative | (y == UNLABELED))[0])
        raise InputFileError(
            f"{spec}: label {int(y[i])} at sample {i}; labels are class indices 0..C-1 "
            f"(all {UNLABELED}, or no y, for unlabeled data)"
        )
    if (x.dtype.is_floating_point or x.dtype.is_complex) and not torch.isfinite(x).all():
        i = int(torch.nonzero(~torch.isfinite(x.reshape(len(x), -1)).all(1))[0])
        raise InputFileError(f"{spec}: x holds NaN or Inf (first at sample {i}); clean the data")
    return y


class CheckedDataset(Dataset):
    """A Dataset read through the data gate (the Python API's Datasets and DataLoaders, the
    image folders): each sample is checked as it is read, as tensors files are on load: an
    (x, y) pair, x finite, y one integer class index (or UNLABELED for all), below the
    model's number of outputs once that is known (``classes``)."""

    def __init__(self, dataset: Dataset, spec: str) -> None:
        self.dataset, self.spec = dataset, spec
        self.classes: int | None = None
        self.labeled: bool | None = None  # from the first sample read

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{self.spec}: sample {index}"
        try:
            item = self.dataset[index]
        except Exception as exc:  # the caller's own __getitem__ (or a __len__ that lies)
            first = (str(exc).splitlines() or [""])[0][:120]
            raise InputFileError(
                f"{where} of {len(self)} could not be read ({type(exc).__name__}: {first}); "
                "check the dataset's __getitem__ and __len__"
            ) from None
        if not isinstance(item, tuple | list) or len(item) != 2:
            kind = f"{len(item)} items" if isinstance(item, tuple | list) else type(item).__name__
            raise InputFileError(
                f"{where} is {kind}; a dataset gives (x, y) pairs (y = {UNLABELED} for "
                "unlabeled data): wrap a dataset of dicts to return (inputs, label)"
            )
        x, y = item
        if not isinstance(x, torch.Tensor):
            raise InputFileError(f"{where}: x is a {type(x).__name__}; give a tensor")
        label = self._label(where, y)
        if x.dtype.is_floating_point and not torch.isfinite(x).all():
            raise InputFileError(f"{where}: x holds NaN or Inf; clean the data")
        return x, torch.tensor(label)

    def _label(self, where: str, y: object) -> int:
        integer_tensor = isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point()
        if integer_tensor or (isinstance(y, numbers.Integral) and not isinstance(y, bool)):
            y = int(cast(int, y))  # a 0-dim integer tensor, numpy's int64...
        if isinstance(y, bool) or not isinstance(y, int):
            shape = f" of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else ""
            raise InputFileError(
                f"{where}: label {str(y)[:40]}{shape} ({type(y).__name__}) is not one class "
                "index; give an integer (a 0-dim integer tensor), not one-hot or float labels"
            )
        labeled = y != UNLABELED
        if self.labeled is None:
            self.labeled = labeled
        if labeled != self.labeled or (labeled and y < 0):
            raise InputFileError(
                f"{where}: label {y}; labels are class indices 0..C-1 (all {UNLABELED} for "
                "unlabeled data)"
            )
        if labeled and self.classes is not None and y >= self.classes:
            raise ModelMismatchError(
                f"{where}: label {y}, but the model has {self.classes} outputs; check the "
                "labels (0..C-1) or the model's number of classes"
            )
        return y


def limit_labels(data: Splits, outputs: int) -> None:
    """Labels read from here on must be below the model's number of outputs."""
    for split in (data.train, data.test):
        if isinstance(split, CheckedDataset):
            split.classes = outputs


def digits(prep: Preprocess) -> Splits:
    """The UCI handwritten digits: 1797 8x8 images scaled to [0, 1], one channel."""
    from safetensors.torch import load_file

    tensors = load_file(DIGITS_FILE)
    x = tensors["images"].float().div(16.0).unsqueeze(1)
    return _split_tensors("digits", x, tensors["labels"], prep)


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputFileError(f"data file {path} does not exist; check the path after tensors:")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as arrays:
                return {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        if path.suffix in {".pt", ".pth"}:
            with warnings.catch_warnings():  # a damaged file is an error, not a warning
                warnings.simplefilter("ignore", UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict):
                return loaded
            raise InputFileError(f"{path} must hold a dict of tensors with keys x and y")
    except InputFileError:
        raise
    except pickle.UnpicklingError as exc:  # torch's advice (weights_only=False) runs code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise InputFileError(
            f"data file {path} holds pickled Python objects"
            f"{f' ({found[1]})' if found else ''}, which prunekit does not load (unpickling "
            "can run code); save x and y as plain tensors with safetensors, numpy.savez or "
            "torch.save({'x': x, 'y': y})"
        ) from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:120]
        raise InputFileError(
            f"cannot read data file {path} ({type(exc).__name__}: {first}); "
            "save x and y with safetensors, numpy.savez or torch.save"
        ) from exc
    raise InputFileError(f"{path}: use a .safetensors, .npz or .pt file for tensors:FILE")


XY_KEYS = (("x", "y"), ("x_train", "y_train"), ("x_test", "y_test"))


def _read_xy(path: Path) -> dict[str, torch.Tensor]:
    data = _read_tensor_file(path)
    used = {k: v for k, v in data.items() if any(k in pair for pair in XY_KEYS)}
    for key, value in used.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise InputFileError(
                f"{path}: {key} is not an array with one entry per sample; fix the file"
            )
    for x_key, y_key in XY_KEYS:
        if x_key in used and y_key not in used:
            used[y_key] = torch.full((len(used[x_key]),), UNLABELED)
    return used


def _needs_xy(path: Path, data: dict[str, torch.Tensor], also: str = "") -> InputFileError:
    return InputFileError(
        f"{path} holds {', '.join(sorted(data)) or 'nothing'}; it needs x and y{also}"
    )


def tensors(arg: str, prep: Preprocess) -> Splits:
    """Tensors ``x``/``y`` (split 80/20), or ``x_train``/``y_train``/``x_test``/``y_test``;
    ``TRAIN,TEST``: two files of ``x``/``y``, the first for training and calibration.

    uint8 inputs are images (scaled to [0, 1]); float inputs are used as they are; other
    integers (token ids) stay integers. Without ``y`` the data is unlabeled: enough for
    magnitude pruning and true-Fisher statistics, not for accuracy, training or the
    empirical Fisher.
    """
    spec = f"tensors:{arg}"
    paths = [Path(p).expanduser() for p in arg.split(",")]
    if len(paths) == 2:
        train, test = (_read_xy(p) for p in paths)
        for path, data in zip(paths, (train, test), strict=True):
            if not {"x", "y"} <= data.keys():
                raise _needs_xy(path, data)
        return _from_tensors(spec, train["x"], train["y"], test["x"], test["y"], prep)
    if len(paths) != 1:
        raise UsageError(f"data spec '{spec}': give one file, or TRAIN,TEST (two files)")
    path = paths[0]
    data = _read_xy(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= data.keys():
        return _from_tensors(
            spec, data["x_train"], data["y_train"], data["x_test"], data["y_test"], prep
        )
    if {"x", "y"} <= data.keys():
        return _split_tensors(spec, data["x"], data["y"], prep)
    raise _needs_xy(path, data, " (or x_train, y_train, x_test, y_test)")


def cifar10(root: Path, prep: Preprocess) -> Splits:
    """CIFAR-10 from torchvision's python-format files in ``root`` (never downloaded).

    Normalised with CIFAR-10's own channel statistics unless ``--normalize`` says otherwise.
    """
    from torchvision import datasets, transforms

    norm = prep.normalization() or Normalization(*PRESETS["cifar10"])
    norm.check_channels(3, f"cifar10:{root}")
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)]
    )
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=normalize, download=False)
        test = datasets.CIFAR10(str(root), train=False, transform=normalize, download=False)
    except RuntimeError as exc:
        raise InputFileError(
            f"CIFAR-10 not found in {root}: download cifar-10-python.tar.gz from the CIFAR "
            f"site and extract it there, so that {root}/cifar-10-batches-py exists"
        ) from exc
    return Splits(f"cifar10:{root}", train, calibration_of(train), test, 10, (3, 32, 32))


def _image_transform(root: Path, prep: Preprocess):
    """Resize (shorter side) and centre-crop every image to one size, then normalise.

    The size is ``--image-size`` (square) or, by default, the size of the first image, so
    folders of mixed sizes load.
    """
    from PIL import Image
    from torchvision import transforms

    first = next((p for p in sorted(root.rglob("*")) if _is_image(p)), None)
    if first is None:
        raise InputFileError(f"image folder {root} holds no images; check the path")
    try:
        with Image.open(first) as image:
            width, height = image.size
    except OSError as exc:
        raise InputFileError(f"cannot read image {first}: {exc}") from exc
    size = (prep.image_size,) * 2 if prep.image_size else (height, width)
    steps = [transforms.Resize(min(size)), transforms.CenterCrop(size), transforms.ToTensor()]
    norm = prep.normalization()
    if norm is not None:
        norm.check_channels(3, f"imagefolder:{root}")  # the folder loader gives RGB
        steps.append(transforms.Normalize(norm.mean, norm.std))
    return transforms.Compose(steps)


def _open_rgb(path: str):
    """ImageFolder's loader, with a one-line error naming an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputFileError(f"cannot read image {path} ({exc}); remove or replace it") from exc


def _is_image(path: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def imagefolder(root: Path, prep: Preprocess) -> Splits:
    """Class-per-folder images; ``root/train`` + ``root/test`` (or ``val``), else an 80/20 split."""
    from torchvision import datasets

    if not root.is_dir():
        raise InputFileError(f"image folder {root} does not exist; check the path")
    to_tensor = _image_transform(root, prep)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    try:
        if (root / "train").is_dir() and test_dir is not None:
            train = datasets.ImageFolder(str(root / "train"), to_tensor, loader=_open_rgb)
            test = datasets.ImageFolder(str(test_dir), to_tensor, loader=_open_rgb)
            if test.classes != train.classes:
                raise InputFileError(
                    f"image folder {root}: {test_dir.name}/ has classes "
                    f"{', '.join(test.classes)} but train/ has {', '.join(train.classes)}; "
                    f"give {test_dir.name}/ the same class folders as train/"
                )
        else:  # split root/train when it stands alone, else root itself
            source = root / "train" if (root / "train").is_dir() else root
            full = datasets.ImageFolder(str(source), to_tensor, loader=_open_rgb)
            order = _permutation(len(full)).tolist()
            n_test = round(len(full) * TEST_FRACTION)
            train, test = Subset(full, order[n_test:]), Subset(full, order[:n_test])
    except (FileNotFoundError, OSError) as exc:
        raise InputFileError(f"cannot read image folder {root}: {exc}") from exc
    classes = getattr(train, "classes", None) or train.dataset.classes
    shape = tuple(train[0][0].shape)
    return Splits(f"imagefolder:{root}", train, calibration_of(train), test, len(classes), shape)


def text(arg: str, model_spec: str | None, max_length: int | None) -> Splits:
    """``text:FILE``: one text per line (or ``LABEL<TAB>TEXT`` on every line, for hf
    classifiers), tokenised with the ``hf:DIR`` model's tokenizer, split 80/20 with the fixed
    split seed."""
    from prunekit.load.hf import DEFAULT_MAX_LENGTH, labelled, load_tokenizer, read_texts, tokenize

    if not model_spec or not model_spec.startswith("hf:"):
        raise UsageError(
            "text:FILE data is tokenised by the model's tokenizer: use an hf:DIR model"
        )
    from prunekit.load.hub import hf_root

    tokenizer, limit = load_tokenizer(hf_root(model_spec[3:]))
    texts = read_texts(Path(arg).expanduser())
    labels = torch.full((len(texts),), UNLABELED)
    pairs = labelled(texts, Path(arg))
    if pairs is not None:
        texts, labels = pairs[0], torch.tensor(pairs[1])
    x, cut = tokenize(texts, tokenizer, max_length or DEFAULT_MAX_LENGTH, limit)
    splits = _split_tensors(f"text:{arg}", x, labels, Preprocess())
    splits.notes = [f"{cut} of {len(texts)} texts cut to {x.shape[-1]} tokens"] if cut else []
    return splits


def load_data(
    spec: str,
    prep: Preprocess | None = None,
    model_spec: str | None = None,
    max_length: int | None = None,
) -> Splits:
    """Parse a dataset spec and return its splits, preprocessed by ``prep`` (``text:`` data
    is tokenised by the ``hf:`` model ``model_spec`` to at most ``max_length`` tokens)."""
    prep = prep or Preprocess()
    prep.check()
    kind, _, arg = spec.partition(":")
    if kind == "text":
        if not arg:
            raise UsageError("data spec 'text:' needs a file: text:FILE (one text per line)")
        return text(arg, model_spec, max_length)
    if kind == "digits" and not arg:
        return digits(prep)
    if kind in {"cifar10", "imagefolder", "tensors"}:
        if not arg:
            raise UsageError(f"data spec '{spec}' needs a path: {kind}:PATH")
        if kind == "tensors":
            return tensors(arg, prep)
        return {"cifar10": cifar10, "imagefolder": imagefolder}[kind](Path(arg).expanduser(), prep)
    raise UnknownNameError(f"unknown data spec '{spec}': use one of {SPEC_FORMS}")
