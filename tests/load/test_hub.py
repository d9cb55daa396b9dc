"""Models by name: hf:ORG/NAME[@REVISION] from a Hugging Face cache laid out here (offline,
no network), and torchvision:ARCH:WEIGHTS from a torch hub cache laid out here; with an empty
cache and no network, one line saying what to download and where it would be cached."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunekit.errors import InputFileError, UnknownNameError, UsageError
from prunekit.load.hub import hf_root, is_hub_id
from prunekit.load.models import load_model
from tests.cli_helpers import assert_error, prune, prune_report

transformers = pytest.importorskip("transformers")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, bert_folder) -> Path:
    """A Hugging Face cache holding org/tiny-bert (main and tag v1) as huggingface_hub lays it
    out: refs/NAME -> commit, snapshots/COMMIT/files; offline."""
    model_dir, _ = bert_folder
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-bert"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_loads_from_the_cache_offline_like_its_folder(hub_cache, bert_folder):
    model_dir, _ = bert_folder
    assert is_hub_id("org/tiny-bert") and is_hub_id("org/tiny-bert@v1")
    assert not is_hub_id(str(model_dir)) and not is_hub_id("a/b/c")
    assert hf_root("org/tiny-bert@v1") == hub_cache / "models--org--tiny-bert" / "snapshots" / (
        COMMIT
    )
    by_id = load_model("hf:org/tiny-bert").model.state_dict()
    by_folder = load_model(f"hf:{model_dir}").model.state_dict()
    assert by_id.keys() == by_folder.keys()
    assert all(torch.equal(by_id[k], by_folder[k]) for k in by_id)


def test_prune_a_hub_id_on_its_own_tokenizer_offline(hub_cache, bert_folder, tmp_path):
    _, texts = bert_folder
    report = prune_report(
        "hf:org/tiny-bert@v1", "-p", "magnitude", "-s", "0.5", "--mask", "layer",
        "--data", f"text:{texts}", "--max-length", "16", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert report["model"] == "hf:org/tiny-bert@v1"
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)


def test_not_in_the_cache_offline_says_what_to_download_and_where(hub_cache, bert_folder, tmp_path):
    with pytest.raises(InputFileError, match=r"hf:org/other is not in the Hugging Face cache"):
        hf_root("org/other")
    with pytest.raises(InputFileError, match="HF_HUB_OFFLINE is set"):
        hf_root("org/tiny-bert@v2")  # a revision the cache does not hold
    result = prune("hf:org/other", "-p", "magnitude", "-s", "0.5", "--data",
                   f"text:{bert_folder[1]}", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_error(result, 2, "hf:org/other is not in the Hugging Face cache", str(hub_cache),
                 "network access")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_hub_id_named_by_a_file_is_read_from_the_cache_only(hub_cache, monkeypatch):
    from prunekit.load.hub import cache_only

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online as far as the user said
    with cache_only(), pytest.raises(InputFileError, match="read from the cache only"):
        hf_root("org/not-cached")  # no download attempted
    with cache_only():
        assert hf_root("org/tiny-bert").is_dir()


def test_a_cached_snapshot_without_safetensors_weights_is_refused(hub_cache):
    snapshot = hub_cache / "models--org--tiny-bert" / "snapshots" / COMMIT
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(InputFileError, match=r"no config\.json or no safetensors weights"):
        hf_root("org/tiny-bert")


def test_trust_remote_code_architectures_are_refused(hub_cache):
    snapshot = hub_cache / "models--org--tiny-bert" / "snapshots" / COMMIT
    config = (snapshot / "config.json").read_text()
    (snapshot / "config.json").write_text(
        config.replace('"model_type"', '"auto_map": {"AutoModel": "modeling.Net"}, "model_type"')
    )
    with pytest.raises(InputFileError, match="never runs a model folder's code"):
        load_model("hf:org/tiny-bert")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and no download ever reaching the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls: list[str] = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


def test_torchvision_published_weights_from_the_cache(torch_home):
    from torchvision import models

    weights = models.SqueezeNet1_1_Weights.DEFAULT
    torch.manual_seed(0)
    state = models.squeezenet1_1(num_classes=1000).state_dict()
    cached = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    loaded = load_model("torchvision:squeezenet1_1:DEFAULT")
    assert loaded.weights == str(cached)
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    same = load_model("torchvision:squeezenet1_1:IMAGENET1K_V1").model.state_dict()
    assert all(torch.equal(same[k], state[k]) for k in state)
    with pytest.raises(UsageError, match="trained for 1000 classes, not --num-classes 10"):
        load_model("torchvision:squeezenet1_1:DEFAULT", num_classes=10)
    from prunekit.run.config import PruneConfig

    prep = PruneConfig("torchvision:squeezenet1_1:DEFAULT", "magnitude", 0.5).preprocess()
    assert prep.image_size == 224 and prep.normalize == "0.485,0.456,0.406/0.229,0.224,0.225"


def test_torchvision_weights_not_cached_and_no_network(torch_home, tmp_path):
    with pytest.raises(InputFileError, match=r"not in torch's hub cache .* cannot be downloaded"):
        load_model("torchvision:squeezenet1_1:DEFAULT")
    with pytest.raises(UnknownNameError, match="has no weights 'IMAGENET'"):
        load_model("torchvision:squeezenet1_1:IMAGENET")
    images = tmp_path / "images.npz"
    np.savez(images, x=np.zeros((20, 3, 32, 32), np.uint8), y=np.arange(20) % 1000)
    result = prune("torchvision:squeezenet1_1:DEFAULT", "-p", "magnitude", "-s", "0.5",
                   "--data", f"tensors:{images}", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_error(result, 2, "torchvision:squeezenet1_1:DEFAULT", "download https://", "TORCH_HOME")
    assert not list(torch_home.rglob("*.pth"))  # nothing partial left in the cache


def test_a_damaged_cached_weights_file_is_an_input_error(torch_home):
    from torchvision import models

    cached = (
        torch_home / "hub" / "checkpoints" / Path(models.SqueezeNet1_1_Weights.DEFAULT.url).name
    )
    cached.parent.mkdir(parents=True)
    save_file({"features.0.weight": torch.zeros(1)}, cached.with_suffix(".safetensors"))
    cached.write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError, match="not a PyTorch checkpoint"):
        load_model("torchvision:squeezenet1_1:DEFAULT")
