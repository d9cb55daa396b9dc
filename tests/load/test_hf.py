"""hf:DIR models and text:FILE data, with a tiny randomly initialised BERT built here (no
download): token ids stay integers through pruning and export; the layer-wise pruners run
without labels; the ONNX export takes any batch and sequence length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.cli_helpers import assert_error, invoke, prune, prune_report
from tests.load.conftest import WORDS

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(bert_folder) -> tuple[Path, Path]:
    return bert_folder


def _run(bert, tmp_path, pruner: str, *extra: str) -> dict:
    model_dir, texts = bert
    return prune_report(
        f"hf:{model_dir}", "-p", pruner, "-s", "0.5", "--data", f"text:{texts}",
        "--max-length", "16", "--out", str(tmp_path / pruner), *extra,
    )  # fmt: skip


def test_layerwise_pruning_of_an_encoder_keeps_its_embeddings(bert, tmp_path):
    reports = {p: _run(bert, tmp_path, p, "--mask", "layer") for p in ("sparsegpt", "magnitude")}
    sparse = reports["sparsegpt"]
    assert sparse["accuracy"] == {"dense": None, "pruned": None}  # no labels
    assert sparse["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert "texts cut to 16 tokens" in " ".join(sparse["warnings"])
    fidelity = {p: r["fidelity"]["cosine_mean"] for p, r in reports.items()}
    assert fidelity["sparsegpt"] > 0.9 and fidelity["sparsegpt"] >= fidelity["magnitude"]
    assert sparse["fidelity"]["cosine_p5"] <= sparse["fidelity"]["cosine_mean"]


def test_two_of_four_and_onnx_with_any_sequence_length(bert, tmp_path):
    import onnxruntime as ort

    from prunekit.load.models import load_model

    report = _run(bert, tmp_path, "wanda", "--mask", "2:4", "--export", "safetensors,onnx")
    assert set(report["sparsity"]["per_tensor"].values()) == {0.5}
    out = tmp_path / "wanda"
    model = load_model(f"hf:{bert[0]}", out / "model.safetensors").model
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "int64" in session.get_inputs()[0].type
    for batch, length in ((1, 5), (3, 21)):
        ids = torch.randint(5, 5 + len(WORDS), (batch, length))
        x = torch.stack([ids, torch.ones_like(ids)], dim=1)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
    validated = invoke("validate", str(out / "model.onnx"), "--runs", "2", "--json")
    assert validated.exit_code == 0, validated.output
    result = json.loads(validated.stdout)
    assert result["accuracy"] is None and result["parity"]["max_abs_diff"] < 1e-4
    assert result["parity"]["cosine_min"] > 0.99999
    # ONNX vs the dense PyTorch model on the held-out texts = the run's own measurement
    fidelity = result["fidelity"]
    assert fidelity["reference"] == "the dense model (PyTorch)"
    assert fidelity["cosine_mean"] == pytest.approx(report["fidelity"]["cosine_mean"], abs=1e-5)
    gate = ("validate", str(out / "model.onnx"), "--runs", "1", "--min-cosine")
    assert invoke(*gate, str(fidelity["cosine_mean"] - 1e-3)).exit_code == 0
    failed = invoke(*gate, str(min(1.0, fidelity["cosine_mean"] + 1e-3)))
    assert failed.exit_code == 1 and "below --min-cosine" in failed.output
    assert_error(invoke(*gate, "1.5"), 2, "--min-cosine 1.5: give a cosine in [-1, 1]")


def test_vmapped_gradients_through_the_encoder_equal_a_backward_loop(bert):
    from prunekit.calibrate.gradients import per_sample_gradients
    from prunekit.contract.objectives import COSINE
    from prunekit.engine.masks import find_targets
    from prunekit.load.data import load_data
    from prunekit.load.hf import load_hf

    model_dir, texts = bert
    model = load_hf(model_dir).module
    x = load_data(f"text:{texts}", model_spec=f"hf:{model_dir}", max_length=16).calibration[:6][0]
    assert (x[:, 1] == 0).any()  # some texts are padded
    targets, _ = find_targets(model, ())
    y = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    rows = per_sample_gradients(model, targets, x, y, objective=COSINE)  # eager, 4-D mask
    for i in range(6):  # SDPA and the 2-D mask, one sample at a time
        model.zero_grad()
        COSINE.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for t in targets:
            torch.testing.assert_close(
                rows[t.name][i], t.weight.grad.flatten(), atol=1e-6, rtol=1e-4
            )
    assert model.model.config._attn_implementation != "eager"  # restored


def test_label_free_gradient_pruners_on_an_encoder_and_a_classifier(bert, tmp_path):
    model_dir, texts = bert
    encoder = _run(bert, tmp_path, "woodfisher", "--param", "num_grads=32")
    assert encoder["objective"] == "cosine" and encoder["fidelity"]["cosine_mean"] > 0.9
    assert encoder["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    classifier_dir = tmp_path / "classifier"
    config = transformers.BertConfig.from_pretrained(model_dir, num_labels=3)
    config.architectures = ["BertForSequenceClassification"]
    transformers.BertForSequenceClassification(config).save_pretrained(classifier_dir)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(classifier_dir)
    classifier = prune_report(
        f"hf:{classifier_dir}", "-p", "fisher_pruner", "-s", "0.5", "--data", f"text:{texts}",
        "--max-length", "16", "--out", str(tmp_path / "cls"),
    )  # fmt: skip
    assert classifier["objective"] == "kl" and classifier["num_classes"] == 3
    args = (f"hf:{model_dir}", "-s", "0.5", "--data", f"text:{texts}", "--out", str(tmp_path / "x"))
    assert_error(prune(*args, "-p", "woodfisher", "--objective", "kl"), 2,
                 "--objective kl needs class logits but the model returns embeddings")  # fmt: skip
    assert_error(prune(*args, "-p", "snip"), 2, "'snip' ranks by the mean gradient, which is "
                 "zero under --objective cosine")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_bad_text_input(bert, tmp_path):
    model_dir, texts = bert
    args = (f"hf:{model_dir}", "-s", "0.5", "--mask", "layer")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_error(prune(*args, "-p", "wanda", "--data", f"text:{empty}"), 2, "holds no text")
    no_config = tmp_path / "nocfg"
    no_config.mkdir()
    assert_error(prune(f"hf:{no_config}", "-p", "wanda", "-s", "0.5", "--data",
                       f"text:{texts}"), 2, "has no config.json")  # fmt: skip
    assert_error(prune("sample:digits-mlp", "-p", "wanda", "-s", "0.5", "--mask", "layer",
                       "--data", f"text:{texts}"), 2, "use an hf:DIR model")  # fmt: skip
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 32


def test_model_directory_without_weights_or_with_a_foreign_tokenizer(bert, tmp_path):
    import shutil

    model_dir, texts = bert
    args = ("-p", "wanda", "-s", "0.5", "--mask", "layer", "--data", f"text:{texts}")
    no_weights = tmp_path / "noweights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert_error(
        prune(f"hf:{no_weights}", *args, "--out", str(tmp_path / "a")), 2, "has no weights"
    )
    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokens += [f"extra{i}" for i in range(50)]  # 50 tokens the model has no embedding for
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (foreign / name).unlink(missing_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    transformers.BertTokenizerFast(vocab=vocab).save_pretrained(foreign)
    result = prune(f"hf:{foreign}", *args, "--out", str(tmp_path / "b"))
    assert_error(result, 2, "do not belong together")


def test_mlp_neurons_removed_from_an_encoder(bert, tmp_path):
    import onnxruntime as ort

    from prunekit.load.models import load_model

    report = _run(bert, tmp_path, "wanda", "--structure", "channels", "--mask", "layer",
                  "--export", "safetensors,onnx")  # fmt: skip
    structure = report["structure"]
    assert structure["groups"] == 2 and structure["removed"] == pytest.approx(0.5)
    assert structure["parameters"]["after"] < structure["parameters"]["before"]
    out = tmp_path / "wanda"
    model = load_model(f"hf:{bert[0]}", out / "model.safetensors").model
    layer = model.model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 32
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(5, 5 + len(WORDS), (3, 9))
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert report["fidelity"]["cosine_mean"] > 0.9


def test_quantized_encoder_dynamic_int8_and_weight_only_int4(bert, tmp_path, monkeypatch):
    """Text models get dynamic INT8 (activation ranges per batch); int4 is weight-only
    MatMulNBits with the held codes, so it matches the FP32 export of the same weights.
    ONNX Runtime's shape inference gives up on this graph and would leave its temporary
    files in the current folder: nothing is left there."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    int8 = _run(bert, tmp_path, "magnitude", "--mask", "layer", "--quantize", "int8",
                "--validate", "--out", str(tmp_path / "q8"))  # fmt: skip
    assert int8["quantize"]["onnx"]["mode"] == "dynamic"
    assert int8["quantize"]["onnx"]["float_ops"] == {}
    assert int8["validation"]["quantized"]["parity_fp32"]["cosine_mean"] > 0.99
    int4 = _run(bert, tmp_path, "sparsegpt", "--mask", "layer", "--quantize", "int4",
                "--group-size", "16", "--validate", "--out", str(tmp_path / "q4"))  # fmt: skip
    layers = int4["quantize"]["layers"]
    assert set(layers.values()) == {"int4"} and len(layers) == 2 * 6  # q k v o, up, down
    graph = onnx.load(str(tmp_path / "q4" / "model.int4.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == len(layers)
    parity = int4["validation"]["quantized"]["parity_fp32"]
    assert parity["cosine_p5"] > 0.99999 and parity["max_abs_diff"] < 1e-3
    assert list(here.iterdir()) == []


def test_an_encoder_fine_tunes_on_unlabeled_text_by_distillation(bert, tmp_path):
    """No labels: the pruned encoder learns the dense encoder's embeddings (cosine)."""
    args = ("--mask", "layer", "-s", "0.9")  # the later -s wins over _run's
    one_shot = _run(bert, tmp_path, "magnitude", *args, "--out", str(tmp_path / "a"))
    tuned = _run(bert, tmp_path, "magnitude", *args, "--finetune-epochs", "4", "--batch-size",
                 "16", "--lr", "0.001", "--optimizer", "adam",
                 "--out", str(tmp_path / "b"))  # fmt: skip
    assert tuned["fine_tuning"] == {"distill": True, "temperature": 4.0, "distill_weight": None,
                                    "augment": False}  # fmt: skip
    losses = [h["loss"] for h in tuned["history"] if h["phase"] == "fine-tune"]
    assert len(losses) == 4 and losses[-1] < losses[0] and all(0 <= v < 1 for v in losses)
    assert one_shot["fine_tuning"] is None and tuned["fidelity"]["cosine_mean"] > 0.99


def test_weights_that_do_not_cover_the_config_or_a_tokenizer_without_vocabulary(bert, tmp_path):
    import shutil

    model_dir, texts = bert
    args = ("-p", "wanda", "-s", "0.5", "--mask", "layer", "--data", f"text:{texts}")
    deeper = tmp_path / "deeper"  # one more layer in config.json than in the weights
    shutil.copytree(model_dir, deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    result = prune(f"hf:{deeper}", *args, "--out", str(tmp_path / "a"))
    assert_error(result, 2, "weights do not cover", "encoder.layer.2.", "would be random")
    headless = tmp_path / "headless"  # an encoder's weights under a classifier's config
    shutil.copytree(model_dir, headless)
    config = {**config, "architectures": ["BertForSequenceClassification"], "num_labels": 3}
    (headless / "config.json").write_text(json.dumps(config))
    result = prune(f"hf:{headless}", *args, "--out", str(tmp_path / "b"))
    assert_error(result, 2, "weights do not cover", "classifier.")
    unknown = tmp_path / "unknown"  # the tokenizer knows none of the text's words
    shutil.copytree(model_dir, unknown)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (unknown / name).unlink(missing_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra"]
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(special)}).save_pretrained(
        unknown
    )
    result = prune(f"hf:{unknown}", *args, "--out", str(tmp_path / "c"))
    assert_error(result, 2, "unknown token ([UNK])", "tokenizer files")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_relative_model_and_text_paths_are_recorded_absolute(bert, tmp_path, monkeypatch):
    model_dir, texts = bert  # side by side in one folder
    monkeypatch.chdir(model_dir.parent)
    report = prune_report(f"hf:{model_dir.name}", "-p", "wanda", "-s", "0.5", "--mask", "layer",
                          "--data", f"text:{texts.name}", "--out", str(tmp_path / "a"))  # fmt: skip
    assert report["recipe"]["model"] == f"hf:{model_dir.absolute()}"
    assert report["recipe"]["data"] == f"text:{texts.absolute()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recipe means the same files from another folder
    again = prune_report("--config", str(tmp_path / "a"), "--out", str(tmp_path / "b"))
    assert again["sparsity"] == report["sparsity"]


def _edited(model_dir: Path, target: Path, config: object = None, drop: str = "") -> Path:
    """A copy of the model folder with config.json replaced (when given) and a file removed."""
    import shutil

    shutil.copytree(model_dir, target)
    if config is not None:
        (target / "config.json").write_text(json.dumps(config))
    if drop:
        (target / drop).unlink()
    return target


def test_config_json_and_weight_files_are_checked_before_anything_is_built(bert, tmp_path):
    """Low findings of the second trial: hf configs and weight files that used to end in a
    traceback or a 281 s, 2 GB load are one-line errors, before any allocation."""
    model_dir, texts = bert
    config = json.loads((model_dir / "config.json").read_text())
    args = ("-p", "wanda", "-s", "0.5", "--mask", "layer", "--data", f"text:{texts}")
    cases = [
        ([config], "config.json: the document: input should be an object"),
        ({k: v for k, v in config.items() if k != "model_type"}, "model_type: field required"),
        ({**config, "model_type": "no-such-model"}, "transformers cannot read it"),
        ({**config, "auto_map": {"AutoModel": "x.Y"}}, "auto_map: AutoModel"),
        ({**config, "num_hidden_layers": 3000}, "describes about"),
        ({**config, "hidden_size": 4096}, "describes about"),
        ({**config, "num_hidden_layers": 1.5}, "num_hidden_layers: input should be"),
        ({**config, "vocab_size": "many"}, "vocab_size: input should be"),
    ]
    for i, (edited, fragment) in enumerate(cases):
        folder = _edited(model_dir, tmp_path / f"m{i}", edited)
        assert_error(prune(f"hf:{folder}", *args, "--out", str(tmp_path / f"o{i}")), 2, fragment)
    truncated = _edited(model_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = prune(f"hf:{truncated}", *args, "--out", str(tmp_path / "t"))
    assert_error(result, 2, "model.safetensors is not a readable safetensors file")
    pickled = _edited(model_dir, tmp_path / "pickled", drop="model.safetensors")
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    result = prune(f"hf:{pickled}", *args, "--out", str(tmp_path / "p"))
    assert_error(result, 2, "as a pickle (pytorch_model.bin)", "safe_serialization=True")
    assert not any(p.name.startswith(("o", "t", "p")) and p.is_dir() and p.name != "pickled"
                   and (p / "report.json").exists() for p in tmp_path.iterdir())  # fmt: skip


def test_a_fifo_and_a_huge_line_of_text(bert, tmp_path):
    """A pipe is named as such; a 10 MB line is cut before tokenising, and counted as cut."""
    import os

    from prunekit.load.data import load_data

    model_dir, texts = bert
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = prune(f"hf:{model_dir}", "-p", "wanda", "-s", "0.5", "--data", f"text:{fifo}")
    assert_error(result, 2, "is not a regular file (a folder, pipe or device)")
    long = tmp_path / "long.txt"
    lines = texts.read_text().splitlines()
    long.write_text("\n".join([*lines[:8], " ".join(["word"] * 2_000_000)]) + "\n")
    splits = load_data(f"text:{long}", model_spec=f"hf:{model_dir}", max_length=16)
    assert any("cut to" in note or "longer than" in note for note in splits.notes), splits.notes
    assert splits.train[0][0].shape[-1] <= 16


def test_fuzzed_config_json_loads_or_is_a_clean_error(bert, tmp_path):
    """Mutated config.json files (random values for the keys prunekit and transformers read)
    load or give a prunekit error, never a traceback nor random weights."""
    import contextlib
    import shutil

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from prunekit.errors import PrunekitError
    from prunekit.load.hf import load_hf

    model_dir, _ = bert
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = json.loads((model_dir / "config.json").read_text())
    value = (st.none() | st.booleans() | st.integers(-5, 10**7) | st.floats()
             | st.text(max_size=10) | st.lists(st.integers(0, 5), max_size=3))  # fmt: skip

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(changes=st.dictionaries(st.sampled_from(sorted(config)), value, min_size=1, max_size=3))
    def run(changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with contextlib.suppress(PrunekitError):
            loaded = load_hf(folder)
            # what loaded holds the folder's own weights (nothing was filled in at random)
            state = loaded.module.model.state_dict()
            reference = load_hf(model_dir).module.model.state_dict()
            assert all(torch.equal(state[k], reference[k]) for k in reference if k in state)

    run()


def test_labelled_text_evaluates_and_fine_tunes_an_hf_classifier(bert, tmp_path):
    """Item 6 of the new-user trial: text: data could not carry labels, so an hf classifier
    could neither be evaluated nor fine-tuned on text from the CLI. LABEL<TAB>TEXT lines can."""
    model_dir, texts = bert
    classifier_dir = tmp_path / "classifier"
    config = transformers.BertConfig.from_pretrained(model_dir, num_labels=3)
    config.architectures = ["BertForSequenceClassification"]
    transformers.BertForSequenceClassification(config).save_pretrained(classifier_dir)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(classifier_dir)
    lines = [line for line in texts.read_text().splitlines() if line.strip()]
    labelled = tmp_path / "labelled.txt"
    labelled.write_text("".join(f"{i % 3}\t{line}\n" for i, line in enumerate(lines)))
    report = prune_report(
        f"hf:{classifier_dir}", "-p", "magnitude", "-s", "0.5", "--data", f"text:{labelled}",
        "--max-length", "16", "--finetune-epochs", "1", "--batch-size", "16",
        "--out", str(tmp_path / "cls"),
    )  # fmt: skip
    assert report["objective"] == "labels" and report["num_classes"] == 3
    assert 0.0 <= report["accuracy"]["dense"] <= 1.0 and report["accuracy"]["pruned"] is not None
    # fine-tuned from the labels (distillation is the default only on unlabelled data)
    assert report["fine_tuning"] == {"distill": False, "temperature": None,
                                     "distill_weight": None, "augment": False}  # fmt: skip
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"1\t{lines[0]}\n{lines[1]}\n")
    result = prune(f"hf:{classifier_dir}", "-p", "magnitude", "-s", "0.5", "--data",
                   f"text:{mixed}", "--out", str(tmp_path / "mixed"))  # fmt: skip
    assert_error(result, 2, "text 2 has no label", "label every line, or none")


def test_labelled_text_needs_a_sequence_classifier(bert, tmp_path):
    """Review finding: labels on an encoder scored argmax over the embedding dimensions."""
    from prunekit.load.hf import labelled

    model_dir, texts = bert
    lines = [line for line in texts.read_text().splitlines() if line.strip()]
    tagged = tmp_path / "tagged.txt"
    tagged.write_text("".join(f"{i % 3}\t{line}\n" for i, line in enumerate(lines)))
    result = prune(f"hf:{model_dir}", "-p", "magnitude", "-s", "0.5", "--data",
                   f"text:{tagged}", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_error(result, 2, "holds labels, but", "is not a sequence classifier", "embeddings")
    assert labelled(["²\tthe cat sat"], tagged) is None  # a Unicode digit is not a label
