"""Causal language models (hf: decoders): a tiny GPT-2 and a tiny Llama built and briefly
trained here on patterned text (no download), pruned with the layer-wise pruners (50 % and
2:4) and label-free woodfisher; perplexity against transformers' own loss, before and after;
the output projection tied to the embeddings is never pruned; the ONNX export (no KV cache)
takes any batch and length and matches PyTorch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli_helpers import assert_error, invoke, prune_report

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "rug", "ran", "to", "red", "big", "."]
SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def _tokenizer():
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def _sentences(count: int, seed: int) -> list[str]:
    """Patterned text a small model learns: 'the ADJ NOUN VERB on the NOUN .' repeated."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        parts = []
        for _ in range(rng.integers(1, 3)):
            noun, place = rng.choice(["cat", "dog"]), rng.choice(["mat", "rug"])
            parts.append(f"the {rng.choice(['red', 'big'])} {noun} sat on the {place} .")
        lines.append(" ".join(parts))
    return lines


def _config(family: str, vocab: int):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=64, pad_token_id=0)  # fmt: skip
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request, tmp_path_factory) -> tuple[Path, Path, str]:
    """A 2-layer decoder (width 32) trained for 150 steps on patterned text, its tokenizer,
    and 80 held-out-able sentences."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM.from_config(_config(family, len(tokenizer)))
    batch = tokenizer(_sentences(64, 1), padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(auto.parameters(), lr=3e-3)
    for _ in range(150):
        loss = auto(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model_dir = root / "model"
    auto.eval().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = root / "texts.txt"
    texts.write_text("\n".join(_sentences(80, 2)) + "\n")
    return model_dir, texts, family


def _prune(decoder, tmp_path, pruner: str, *extra: str) -> dict:
    model_dir, texts, _ = decoder
    return prune_report(
        f"hf:{model_dir}", "-p", pruner, "-s", "0.5", "--data", f"text:{texts}",
        "--out", str(tmp_path / pruner), *extra,
    )  # fmt: skip


def test_perplexity_equals_transformers_own_loss(decoder):
    from prunekit.load.data import load_data
    from prunekit.load.models import load_model
    from prunekit.validate.metrics import perplexity

    model_dir, texts, _ = decoder
    wrapped = load_model(f"hf:{model_dir}").model
    assert wrapped.kind == "decoder"
    split = load_data(f"text:{texts}", model_spec=f"hf:{model_dir}").test
    ours = perplexity(wrapped, split, torch.device("cpu"), batch_size=7)
    x = torch.stack([split[i][0] for i in range(len(split))])
    ids, mask = x[:, 0], x[:, 1]
    auto = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        # transformers' mean over the predicted tokens, as one batch
        theirs = auto(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert ours == pytest.approx(math.exp(float(theirs.loss)), rel=1e-4)
    assert ours < 4.0  # the patterned text is learnt (a uniform guess: 16)


@pytest.mark.parametrize("mask", ["layer", "2:4"])
def test_layerwise_pruning_keeps_perplexity_and_the_tied_head(decoder, tmp_path, mask):
    from safetensors.torch import load_file

    reports = {p: _prune(decoder, tmp_path / mask, p, "--mask", mask)
               for p in ("sparsegpt", "magnitude")}  # fmt: skip
    for report in reports.values():
        assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
        assert all("lm_head" not in name for name in report["sparsity"]["per_tensor"])
        assert report["accuracy"] == {"dense": None, "pruned": None}
    sparse, magnitude = reports["sparsegpt"]["perplexity"], reports["magnitude"]["perplexity"]
    assert sparse["dense"] == magnitude["dense"] < 4.0
    assert sparse["pruned"] <= magnitude["pruned"] * 1.02  # second order at least as good
    assert sparse["pruned"] < 2 * sparse["dense"]
    state = load_file(tmp_path / mask / "sparsegpt" / "model.safetensors")
    embeddings = next(v for k, v in state.items() if "embed_tokens" in k or "wte" in k)
    assert int((embeddings == 0).sum()) == 0  # the tied output projection is whole


def test_label_free_woodfisher_on_a_decoder(decoder, tmp_path):
    report = _prune(decoder, tmp_path, "woodfisher", "--param", "num_grads=32", "--mask", "layer")
    assert report["objective"] == "kl"
    assert report["perplexity"]["pruned"] < 2 * report["perplexity"]["dense"]
    assert 0.5 < report["fidelity"]["cosine_mean"] <= 1.0


def test_onnx_export_takes_any_batch_and_length_and_matches_pytorch(decoder, tmp_path):
    import onnxruntime as ort

    from prunekit.load.models import load_model

    model_dir, _, _ = decoder
    report = _prune(decoder, tmp_path, "wanda", "--mask", "2:4", "--export", "safetensors,onnx")
    out = tmp_path / "wanda"
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    model = load_model(f"hf:{model_dir}", out / "model.safetensors").model.eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 4), (3, 11)):
        ids = torch.randint(3, 3 + len(WORDS), (batch, length))
        x = torch.stack([ids, torch.ones_like(ids)], dim=1)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, length, len(SPECIALS) + len(WORDS))
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_validate_reports_the_onnx_perplexity_and_the_dense_baseline(decoder, tmp_path):
    import json

    _, texts, _ = decoder
    report = _prune(decoder, tmp_path, "sparsegpt", "--mask", "layer", "--export",
                    "safetensors,onnx")  # fmt: skip
    out = tmp_path / "sparsegpt"
    result = invoke("validate", str(out / "model.onnx"), "--data", f"text:{texts}",
                    "--baseline", str(out / "dense.onnx"), "--runs", "2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    validation = json.loads(result.stdout)
    assert validation["perplexity"] == pytest.approx(report["perplexity"]["pruned"], rel=1e-3)
    assert validation["baseline_perplexity"] == pytest.approx(
        report["perplexity"]["dense"], rel=1e-3
    )
    assert validation["parity"]["passed"]


def test_perplexity_of_a_model_that_is_not_a_decoder_is_a_usage_error():
    from torch.utils.data import TensorDataset

    from prunekit.errors import UsageError
    from prunekit.validate.metrics import perplexity

    data = TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UsageError, match="needs a causal language model"):
        perplexity(torch.nn.Linear(3, 2), data, torch.device("cpu"))


def test_text_too_short_for_perplexity(decoder, tmp_path):
    model_dir, _, _ = decoder
    short = tmp_path / "short.txt"
    short.write_text("\n".join(["cat"] * 40) + "\n")
    result = invoke("prune", f"hf:{model_dir}", "-p", "magnitude", "-s", "0.5", "--data",
                    f"text:{short}", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_error(result, 2, "perplexity needs texts of at least two tokens")
    assert not (tmp_path / "o").exists()


def test_block_by_block_pruning_equals_the_whole_model_path(decoder, monkeypatch):
    """A decoder is pruned one block at a time (each layer measured through its block only);
    the weights equal those of the path that runs the whole model for every layer."""
    import prunekit
    from prunekit.engine import step
    from prunekit.load.data import load_data
    from prunekit.load.models import load_model

    model_dir, texts, _ = decoder
    data = load_data(f"text:{texts}", model_spec=f"hf:{model_dir}")
    weights, captured = {}, []
    real = step.BlockInputs
    monkeypatch.setattr(step, "BlockInputs", lambda *a, **k: captured.append(1) or real(*a, **k))
    for path in ("blocks", "whole"):
        if path == "whole":
            monkeypatch.setattr(step, "repeated_blocks", lambda model: None)
        model = load_model(f"hf:{model_dir}").model
        prunekit.prune(model, "sparsegpt", 0.5, data.calibration, mask="layer")
        weights[path] = {k: v.clone() for k, v in model.state_dict().items()}
    assert captured == [1]  # the first run went block by block, the second did not
    for name, tensor in weights["whole"].items():
        torch.testing.assert_close(weights["blocks"][name], tensor, rtol=1e-4, atol=1e-5)


def test_a_decoder_larger_than_the_free_gpu_memory_stays_on_the_host(decoder):
    from prunekit.engine.schedule import ScheduleConfig
    from prunekit.load.models import load_model
    from prunekit.pruners import registry
    from prunekit.run.config import PruneConfig
    from prunekit.run.pipeline import host_of

    model_dir, _, _ = decoder
    model = load_model(f"hf:{model_dir}").model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    layerwise, config = registry.create("sparsegpt"), PruneConfig("hf:x", "sparsegpt", 0.5)
    assert host_of(model, layerwise, config, gpu, free=weights) == cpu  # over half the memory
    assert host_of(model, layerwise, config, gpu, free=4 * weights) == gpu
    assert host_of(model, layerwise, config, cpu, free=0) == cpu
    assert host_of(model, registry.create("woodfisher"), config, gpu, free=0) == gpu
    trains = PruneConfig("hf:x", "sparsegpt", 0.5, schedule=ScheduleConfig(finetune_epochs=1))
    assert host_of(model, layerwise, trains, gpu, free=0) == gpu  # training needs the device


def test_block_inputs_are_captured_where_the_model_is_and_moved_to_the_device(decoder):
    from prunekit.calibrate.blocks import BlockInputs, moved, repeated_blocks
    from prunekit.load.data import load_data
    from prunekit.load.models import load_model

    model_dir, texts, family = decoder
    model = load_model(f"hf:{model_dir}").model
    data = load_data(f"text:{texts}", model_spec=f"hf:{model_dir}")
    name, blocks = repeated_blocks(model)
    assert name == ("model.transformer.h" if family == "gpt2" else "model.model.layers")
    inputs = BlockInputs(model, blocks[0], data.calibration, 20, torch.device("cpu"), 8)
    assert [len(c.hidden) for c in inputs.chunks] == [8, 8, 4]
    assert all(c.token_mask is not None for c in inputs.chunks)
    nested = moved({"a": (torch.ones(1), [torch.zeros(2)]), "b": None}, torch.device("cpu"))
    assert nested["b"] is None and isinstance(nested["a"], tuple)
    assert isinstance(nested["a"][1], list) and torch.equal(nested["a"][1][0], torch.zeros(2))


def test_a_decoder_whose_config_names_code_is_refused(decoder, tmp_path):
    import json
    import shutil

    from prunekit.errors import InputFileError
    from prunekit.load.models import load_model

    model_dir, _, _ = decoder
    copy = tmp_path / "remote"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="never sets trust_remote_code"):
        load_model(f"hf:{copy}")
