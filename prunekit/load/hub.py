"""Models by name, as users type them, through the libraries' own caches.

``hf:ORG/NAME`` (``@REVISION``: a branch, tag or commit) is a Hugging Face hub id: its
config, safetensors weights and tokenizer files are fetched by huggingface_hub into its
cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub, default ~/.cache/huggingface/hub) and read from
there; with ``HF_HUB_OFFLINE=1`` only the cache is looked at. The snapshot folder then goes
through every check an ``hf:DIR`` folder meets. A local folder of that name wins.

``torchvision:ARCH:WEIGHTS`` (``DEFAULT`` or a name such as ``IMAGENET1K_V2``) takes the
published weights of torchvision's weights API: downloaded (checksum verified) into torch's
hub cache (``TORCH_HOME``/hub/checkpoints) and read from there as a state dict of tensors,
never unpickled as code.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.errors import InputFileError, UnknownNameError, UsageError, did_you_mean

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
REVISION = re.compile(r"^[\w./-]{1,200}$")
# what prunekit reads of a hub model: config, safetensors weights and tokenizer files (never
# pickled .bin weights, never code)
WANTED = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece*.model",
]
TRUE_WORDS = {"1", "ON", "YES", "TRUE"}


def is_hub_id(rest: str) -> bool:
    """Whether ``hf:REST`` names a hub model (ORG/NAME[@REVISION]) and not a local folder."""
    if Path(rest).expanduser().exists():
        return False
    name, _, revision = rest.partition("@")
    return bool(HUB_ID.match(name)) and (not revision or bool(REVISION.match(revision)))


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / (
        "huggingface"
    )
    return Path(home).expanduser() / "hub"


_CACHE_ONLY: ContextVar[bool] = ContextVar("cache_only", default=False)


def offline() -> bool:
    """HF_HUB_OFFLINE is set, or the model was named by a file (``cache_only``)."""
    return _CACHE_ONLY.get() or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_WORDS


@contextmanager
def cache_only() -> Iterator[None]:
    """Hub ids resolve from the cache alone: for a model named in a file's metadata, which
    never makes prunekit download anything."""
    token = _CACHE_ONLY.set(True)
    try:
        yield
    finally:
        _CACHE_ONLY.reset(token)


def hub_snapshot(rest: str) -> Path:
    """The local snapshot folder of hub model ``ORG/NAME[@REVISION]``, downloaded into the
    cache when the hub can be reached and ``HF_HUB_OFFLINE`` is not set."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise UsageError(
            "hf: models need the optional Hugging Face support: pip install 'prunekit[hf]'"
        ) from None
    name, _, revision = rest.partition("@")
    cache = hub_cache()
    try:
        folder = Path(
            snapshot_download(
                name,
                revision=revision or None,
                cache_dir=cache,
                local_files_only=offline(),
                allow_patterns=WANTED,
            )
        )
    except LocalEntryNotFoundError:
        why = (
            "a model named in a file is read from the cache only"
            if _CACHE_ONLY.get()
            else "HF_HUB_OFFLINE is set"
            if offline()
            else "the hub cannot be reached"
        )
        raise InputFileError(
            f"hf:{rest} is not in the Hugging Face cache ({cache}) and {why}: run the same "
            f"command once on a machine with network access (it downloads {name} into that "
            "cache) and copy the cache here, or set HF_HUB_CACHE to where it is"
        ) from None
    except RevisionNotFoundError:
        raise InputFileError(
            f"hf:{rest}: {name} has no revision '{revision}' on the hub; give a branch, tag "
            "or commit it has"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise InputFileError(
            f"hf:{name} is not a model the hub gives this machine (no such id, or private or "
            "gated: log in with `hf auth login`); check the id"
        ) from None
    except HfHubHTTPError as exc:
        raise InputFileError(
            f"hf:{rest}: the hub answered {str(exc).splitlines()[0][:160]}; try again later"
        ) from None
    except OSError as exc:  # the cache folder not writable, the disk full
        raise InputFileError(f"hf:{rest}: cannot use the cache {cache}: {exc}") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise InputFileError(
            f"hf:{rest}: the snapshot in the cache ({folder}) has no config.json or no "
            "safetensors weights: the model publishes only pickled weights (which prunekit "
            "never reads), or the download was cut short; download it again with network "
            "access"
        )
    return folder


def hf_root(rest: str) -> Path:
    """The folder of ``hf:REST``: a local folder, or a hub id's snapshot in the cache."""
    return hub_snapshot(rest) if is_hub_id(rest) else Path(rest).expanduser()


@dataclass(frozen=True)
class PublishedWeights:
    """torchvision's published weights of an architecture, found in (or fetched into) the
    torch hub cache."""

    arch: str
    name: str
    path: Path
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    size: int | None  # the side the weights were evaluated at


def _published(arch: str, name: str):
    """torchvision's weights enum member ``name`` (or DEFAULT) of ``arch`` (nothing read)."""
    from torchvision import models

    try:
        enum = models.get_model_weights(arch)
    except (ValueError, KeyError):
        available = models.list_models(module=models)
        raise UnknownNameError(
            f"unknown torchvision architecture '{arch}': {did_you_mean(arch, available)}"
            "see torchvision.models.list_models()"
        ) from None
    names = ["DEFAULT", *(w.name for w in enum)]
    if name not in names:
        raise UnknownNameError(
            f"torchvision:{arch} has no weights '{name}': {did_you_mean(name, names)}"
            f"use one of {', '.join(names)}"
        )
    return enum.DEFAULT if name == "DEFAULT" else enum[name]


def torchvision_weights(arch: str, name: str) -> PublishedWeights:
    """The weights ``name`` (``DEFAULT`` or an enum member) of torchvision's ``arch``, in the
    torch hub cache (fetched there when missing)."""
    weights = _published(arch, name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        _download(weights.url, path, f"torchvision:{arch}:{name}")
    mean, std, size = published_preprocessing(arch, name)
    return PublishedWeights(arch, weights.name, path, len(weights.meta["categories"]), mean,
                            std, size)  # fmt: skip


def published_preprocessing(
    arch: str, name: str
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, int | None]:
    """The normalisation (mean, std) and image side the weights were evaluated with."""
    transforms = _published(arch, name).transforms()
    mean = tuple(getattr(transforms, "mean", ())) or None
    std = tuple(getattr(transforms, "std", ())) or None
    return mean, std, _first(getattr(transforms, "crop_size", None))


def _first(value: object) -> int | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def _download(url: str, path: Path, spec: str) -> None:
    """Fetch ``url`` into ``path`` (a temporary file renamed when complete), checking the
    sha256 prefix its name carries, as torch.hub does."""
    found = HASH_IN_NAME.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            partial = Path(tmp) / path.name
            torch.hub.download_url_to_file(
                url, str(partial), hash_prefix=found.group(1) if found else None, progress=False
            )
            partial.replace(path)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputFileError(
            f"{spec}: its weights are not in torch's hub cache ({path}) and cannot be "
            f"downloaded ({reason}): run the same command once on a machine with network "
            f"access, or download {url} into {path.parent} (TORCH_HOME sets where)"
        ) from None
    except RuntimeError as exc:  # the checksum did not match
        raise InputFileError(
            f"{spec}: the download of {url} is damaged ({exc}); try again"
        ) from None
    except OSError as exc:
        raise InputFileError(
            f"{spec}: cannot write torch's hub cache {path.parent}: {exc}"
        ) from None
