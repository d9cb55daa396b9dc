"""Validate an exported ONNX model in ONNX Runtime: accuracy, parity with PyTorch, latency.

Latency is measured for the model and its dense baseline in the same run, interleaved run by
run, so that the ratio holds on a noisy machine. Unstructured zeros do not make ONNX
Runtime's dense kernels faster: expect a latency ratio near 1.0. The sparse formats save
storage and transfer, not compute.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.errors import InputFileError, ModelMismatchError, UsageError
from prunekit.formats.metadata import ExportMetadata, export_metadata
from prunekit.load.data import UNLABELED
from prunekit.load.hub import cache_only
from prunekit.load.models import brings_weights
from prunekit.runtime.batches import loader
from prunekit.runtime.outputs import file_sha256
from prunekit.validate.metrics import cosine_fidelity, cosines, final_token, token_nll

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PARITY_AGREEMENT = 0.999
PARITY_MAX_DIFF = 1e-4


@dataclass(frozen=True)
class ValidateOptions:
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 0  # 0: ONNX Runtime's default
    provider: str = "cpu"
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None  # gate on the mean cosine similarity to the dense outputs
    warmup: int = 10
    runs: int = 500  # timed runs per model and batch size

    def check(self) -> None:
        if not self.batch_sizes or not all(1 <= b <= MAX_BATCH for b in self.batch_sizes):
            raise UsageError(
                f"--batch-sizes {','.join(map(str, self.batch_sizes))}: every batch size must "
                f"be from 1 to {MAX_BATCH:,}"
            )
        if self.threads < 0:
            raise UsageError(f"--threads {self.threads}: give 0 (default) or more")
        if self.runs < 1:
            raise UsageError("--runs must be at least 1")
        drop = self.max_accuracy_drop
        if drop is not None and not 0.0 <= drop <= 1.0:  # NaN fails this test too
            raise UsageError(
                f"--max-accuracy-drop {drop}: give a fraction in [0, 1], e.g. 0.01 for one point"
            )
        cosine = self.min_cosine
        if cosine is not None and not -1.0 <= cosine <= 1.0:
            raise UsageError(f"--min-cosine {cosine}: give a cosine in [-1, 1], e.g. 0.95")


MAX_BATCH = 65536  # timed batches: more can only be a mistake


def open_session(path: Path, options: ValidateOptions):
    """An InferenceSession with the stated options; clear errors for bad files/providers."""
    import onnxruntime as ort

    if options.provider not in PROVIDERS:
        raise UsageError(f"--provider {options.provider}: use cpu or cuda")
    provider = PROVIDERS[options.provider]
    available = ort.get_available_providers()
    if provider not in available:
        raise UsageError(
            f"ONNX Runtime provider {provider} is not available here (available: "
            f"{', '.join(available)}); use --provider cpu or install onnxruntime-gpu"
        )
    check_onnx_path(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle worker threads of one session must not spin while the other session runs:
    # with interleaved timing that would bill one model for the other's busy-waiting.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=[provider])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(
            f"{path} is not a loadable ONNX model ({first}); re-export it with `prunekit export`"
        ) from exc


def check_onnx_path(path: Path) -> None:
    if not path.is_file():
        raise InputFileError(
            f"{path} is a folder; give the .onnx file in it"
            if path.is_dir()
            else f"{path} does not exist; check the path"
        )


def read_onnx_metadata(path: Path) -> ExportMetadata:
    """What prunekit reads from the file's metadata_props, checked against its schema; a clear
    error for a missing or non-ONNX file."""
    import onnx

    check_onnx_path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InputFileError(
            f"{path} is not an ONNX model ({type(exc).__name__}); re-export it with "
            "`prunekit export`"
        ) from exc
    if not proto.graph.node:
        raise InputFileError(f"{path} holds no ONNX graph; re-export it with `prunekit export`")
    return export_metadata({p.key: p.value for p in proto.metadata_props}, path)


def beside(folder: Path, recorded: str) -> Path | None:
    """A file a metadata value names, if it lies in ``folder`` (never an absolute path or one
    leaving the folder: a file may not make prunekit read elsewhere)."""
    path = PurePath(recorded)
    if not recorded or path.is_absolute() or ".." in path.parts:
        return None
    return folder / path


def parity_model(
    onnx_file: Path,
    meta: ExportMetadata,
    spec: str | None = None,
    weights: Path | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module | None, str | None]:
    """The PyTorch model to check parity against, or None and the reason there is none.

    ``spec`` (and ``weights``) when given. Otherwise the model spec recorded in the ONNX file,
    only if prunekit builds it itself (no code named in a file is imported), with ``weights``
    or the recorded weights file (relative to the ONNX file's folder; skipped when its
    recorded hash no longer matches).
    """
    from prunekit.errors import PrunekitError
    from prunekit.load.models import load_model, names_code

    asked = weights is not None  # the user's own weights: not fitting is an error
    if spec is not None:
        return load_model(spec, weights, num_classes).model, None
    recorded = meta.model
    if not recorded:
        return None, "the file records no model spec; pass --torch SPEC --weights FILE"
    if names_code(recorded):
        return None, (
            f"the file names model factory {recorded}, and prunekit does not import code a "
            f"file names; pass --torch {recorded} --weights FILE"
        )
    if num_classes is None and not recorded.startswith("sample:"):
        num_classes = meta.num_classes
    if weights is None and meta.weights_file:
        weights = beside(onnx_file.parent, meta.weights_file)
        if weights is None:
            return None, (
                f"the recorded weights {meta.weights_file} lie outside the export's folder, "
                "and prunekit reads only files beside it; pass --weights FILE"
            )
        if not weights.is_file():
            return None, f"the recorded weights {weights} are not there; pass --weights FILE"
        if meta.weights_sha256 and file_sha256(weights) != meta.weights_sha256:
            return None, f"the recorded weights {weights} changed since the export"
    elif weights is None and not brings_weights(recorded):
        return None, f"the file records no weights for {recorded}; pass --weights FILE"
    try:
        with cache_only():  # a spec read from the file never makes prunekit download
            return load_model(recorded, weights, num_classes).model, None
    except PrunekitError as exc:
        if asked:
            raise
        return None, f"the recorded model could not be built ({exc})"


def dense_model(
    meta: ExportMetadata, spec: str | None = None, num_classes: int | None = None
) -> nn.Module | None:
    """The unpruned model, where its spec brings its own weights (hf: directories, sample
    models): the reference for the fidelity of unlabeled data. None otherwise."""
    from prunekit.load.models import load_model

    recorded = spec or meta.model or ""
    if not brings_weights(recorded):  # (built without importing user code)
        return None
    with cache_only() if spec is None else nullcontext():  # a file's spec: no download
        return load_model(recorded, None, num_classes).model


def session_settings(session, options: ValidateOptions) -> dict[str, Any]:
    return {
        "provider": session.get_providers()[0],
        "intra_op_threads": options.threads or "default",
        "graph_optimization": "ORT_ENABLE_ALL",
    }


def input_shape(session) -> tuple[Any, ...]:
    return tuple(session.get_inputs()[0].shape)


def check_input_fits(session, path: Path, data_shape: tuple[int, ...]) -> None:
    declared = input_shape(session)[1:]
    fixed = [(d, s) for d, s in zip(declared, data_shape, strict=False) if isinstance(d, int)]
    if len(declared) != len(data_shape) or any(d != s for d, s in fixed):
        raise ModelMismatchError(
            f"{path} expects inputs of shape {list(input_shape(session))} but the data has "
            f"samples of shape {list(data_shape)}; pass --data that matches the model"
        )


def input_dtype(session) -> type:
    """int64 for token-id models, float32 otherwise."""
    return np.int64 if "int64" in session.get_inputs()[0].type else np.float32


def run_logits(
    session, dataset: Dataset, batch_size: int = 256, language: dict[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The outputs and labels on a split. A decoder's (N, L, V) logits are reduced to the
    next-token logits after each text's last token; their negative log-likelihood over the
    real tokens is summed into ``language`` (``nll``, ``tokens``) when given."""
    name = session.get_inputs()[0].name
    dtype = input_dtype(session)
    if dtype == np.int64:
        batch_size = min(batch_size, 16)  # (batch, length, vocabulary) logits can be large
    logits, labels = [], []
    for x, y in loader(dataset, batch_size):
        out = session.run(None, {name: x.numpy().astype(dtype)})[0]
        if out.ndim == 3:
            decoded = torch.from_numpy(out)
            if language is not None:
                language["nll"] = language.get("nll", 0.0) + float(token_nll(decoded, x).sum())
                language["tokens"] = language.get("tokens", 0) + int(x[:, 1, 1:].bool().sum())
            out = final_token(decoded, x).numpy()
        logits.append(out)
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def perplexity_of(language: dict[str, float]) -> float | None:
    """exp(mean next-token NLL) of what ``run_logits`` summed; None for other models."""
    if not language:
        return None
    if not language["tokens"]:
        raise UsageError(
            "perplexity needs texts of at least two tokens; the data has none: give longer texts"
        )
    return math.exp(language["nll"] / language["tokens"])


@torch.no_grad()
def torch_logits(model: nn.Module, dataset: Dataset) -> np.ndarray:
    from prunekit.validate.metrics import outputs_on

    cpu = torch.device("cpu")
    return outputs_on(model.to(cpu), dataset, cpu).numpy()


def parity(onnx_out: np.ndarray, torch_out: np.ndarray) -> dict[str, Any]:
    if onnx_out.shape != torch_out.shape:
        raise ModelMismatchError(
            f"the ONNX model gives outputs of shape {onnx_out.shape} and the PyTorch model "
            f"{torch_out.shape}: --torch/--weights do not belong to this ONNX file"
        )
    agreement = float((onnx_out.argmax(1) == torch_out.argmax(1)).mean())
    max_diff = float(np.abs(onnx_out - torch_out).max())
    cosine = cosines(torch.from_numpy(onnx_out), torch.from_numpy(torch_out))
    return {
        "top1_agreement": agreement,
        "max_abs_diff": max_diff,
        "cosine_min": float(cosine.min()),
        "passed": agreement >= PARITY_AGREEMENT and max_diff <= PARITY_MAX_DIFF,
        "thresholds": {"top1_agreement": PARITY_AGREEMENT, "max_abs_diff": PARITY_MAX_DIFF},
    }


def check_pair(onnx_path: Path, model: nn.Module) -> None:
    """The ONNX initializers must carry the PyTorch model's prunable weights, same shapes."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    shapes.update({s.values.name: tuple(s.dims) for s in proto.graph.sparse_initializer})
    wanted = {
        n: tuple(p.shape)
        for n, p in model.named_parameters(remove_duplicate=False)  # a tied weight: any name
        if n.endswith("weight") and p.dim() > 1
    }
    # The exporter may fold a Linear's weight into a transposed constant of another name:
    # names it kept must match in shape (or transposed), and some must be there; the outputs'
    # parity then settles the rest.
    present = {n: s for n, s in wanted.items() if n in shapes}
    wrong = [n for n, s in present.items() if shapes[n] not in (s, s[::-1])]
    if not present:
        wrong = list(wanted)
    if wrong:
        raise ModelMismatchError(
            f"{onnx_path} does not match the PyTorch model: {', '.join(wrong[:5])} "
            f"{'are' if len(wrong) > 1 else 'is'} missing or shaped differently; pass the "
            "--torch/--weights the ONNX file was exported from"
        )


def _percentiles(times: list[float], batch: int) -> dict[str, float]:
    ms = np.array(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "throughput_per_s": batch / (p50 / 1e3),
    }


def latency(
    sessions: dict[str, Any], sample_shape: tuple[int, ...], options: ValidateOptions
) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and batch size: p50/p90/p99 and throughput, models interleaved run by run."""
    rng = np.random.default_rng(0)
    result: dict[str, dict[str, dict[str, float]]] = {label: {} for label in sessions}
    for batch in options.batch_sizes:
        first = next(iter(sessions.values()))
        if input_dtype(first) == np.int64:  # token ids: all ones (a valid id, mask on)
            x = np.ones((batch, *sample_shape), dtype=np.int64)
        else:
            x = rng.standard_normal((batch, *sample_shape)).astype(np.float32)
        feeds = {label: {s.get_inputs()[0].name: x} for label, s in sessions.items()}
        times: dict[str, list[float]] = {label: [] for label in sessions}
        order = list(sessions.items())
        for i in range(options.warmup + options.runs):
            # alternate which model goes first, so neither always runs on a warm cache
            for label, session in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                session.run(None, feeds[label])
                if i >= options.warmup:
                    times[label].append(time.perf_counter() - start)
        for label in sessions:
            result[label][str(batch)] = _percentiles(times[label], batch)
    return result


def speedup_of(
    model: nn.Module, dense: nn.Module, input_shape: tuple[int, ...], runs: int = 100
) -> dict[str, float]:
    """ONNX Runtime p50 latency at batch 1 of ``model`` and ``dense``, exported to a
    temporary folder and timed interleaved; and the speed-up dense / model."""
    import tempfile

    from prunekit.formats.onnx_file import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        paths = {label: Path(tmp) / f"{label}.onnx" for label in ("model", "dense")}
        for label, m in (("model", model), ("dense", dense)):
            export_onnx(m.cpu().eval(), input_shape, paths[label], {}, sparse=False)
        return speedup_of_files(paths["model"], paths["dense"], input_shape, runs)


def speedup_of_files(
    model: Path, dense: Path, input_shape: tuple[int, ...], runs: int = 100
) -> dict[str, float]:
    """ONNX Runtime p50 latency at batch 1 of two ONNX files, timed interleaved; and the
    speed-up dense / model."""
    options = ValidateOptions(batch_sizes=(1,), runs=runs)
    sessions = {"model": open_session(model, options), "dense": open_session(dense, options)}
    timed = latency(sessions, input_shape, options)
    ms = {label: timed[label]["1"]["p50_ms"] for label in timed}
    return {"latency_ms": ms["model"], "dense_latency_ms": ms["dense"],
            "speedup": ms["dense"] / ms["model"]}  # fmt: skip


def validate(
    onnx_path: Path,
    dataset: Dataset,
    sample_shape: tuple[int, ...],
    options: ValidateOptions,
    baseline: Path | None = None,
    torch_model: nn.Module | None = None,
    reference_accuracy: float | None = None,
    parity_skipped: str | None = None,
    dense_model: nn.Module | None = None,
    parity_reference: Path | None = None,
) -> dict[str, Any]:
    """Everything ``prunekit validate`` reports; ``passed`` is false when a gate fails.

    ``parity_skipped`` says why there is no ``torch_model`` to compare with; it is reported.
    ``parity_reference``: another ONNX file the outputs are compared with, reported, not a
    gate (a quantized export against its FP32 form: what quantization changed).
    ``fidelity`` is the cosine similarity of the outputs to the dense reference: the
    ``baseline``'s outputs, else those of ``dense_model`` (PyTorch), when given.
    """
    options.check()
    session = open_session(onnx_path, options)
    check_input_fits(session, onnx_path, sample_shape)
    sessions = {"model": session}
    if baseline is not None:
        sessions["baseline"] = open_session(baseline, options)
        check_input_fits(sessions["baseline"], baseline, sample_shape)
    report: dict[str, Any] = {
        "model": str(onnx_path),
        "baseline": str(baseline or "") or None,
        "session": session_settings(session, options),
        "failures": [],
    }
    language: dict[str, float] = {}
    logits, labels = run_logits(session, dataset, language=language)
    report["perplexity"] = perplexity_of(language)  # decoders: of the held-out text
    labeled = bool((labels != UNLABELED).any())
    if labeled and labels.max() >= logits.shape[1]:
        raise ModelMismatchError(
            f"the data has labels up to {int(labels.max())} but {onnx_path} has "
            f"{logits.shape[1]} outputs; pass the --data the model was trained on"
        )
    if not labeled and options.max_accuracy_drop is not None:
        raise UsageError(
            "--max-accuracy-drop needs labeled data; this data has no labels, so no accuracy"
        )
    report["accuracy"] = float((logits.argmax(1) == labels).mean()) if labeled else None
    reference: tuple[np.ndarray, str] | None = None
    if baseline is not None:
        base_language: dict[str, float] = {}
        base_logits, _ = run_logits(sessions["baseline"], dataset, language=base_language)
        report["baseline_perplexity"] = perplexity_of(base_language)
        report["baseline_accuracy"] = reference_accuracy = (
            float((base_logits.argmax(1) == labels).mean()) if labeled else None
        )
        reference = base_logits, f"the baseline {baseline} (ONNX Runtime)"
    elif dense_model is not None:
        reference = torch_logits(dense_model, dataset), "the dense model (PyTorch)"
    if reference is not None:
        dense = torch.from_numpy(reference[0])
        report["fidelity"] = {
            **cosine_fidelity(dense, torch.from_numpy(logits)),
            "reference": reference[1],
        }
    if options.min_cosine is not None:
        if reference is None:
            raise UsageError("--min-cosine needs the dense outputs: pass --baseline dense.onnx")
        cosine = report["fidelity"]["cosine_mean"]
        if cosine < options.min_cosine:
            report["failures"].append(
                f"mean cosine similarity to the dense outputs {cosine:.4f} is below "
                f"--min-cosine {options.min_cosine}"
            )
    if parity_reference is not None:
        reference_logits, _ = run_logits(open_session(parity_reference, options), dataset)
        report["parity_fp32"] = {
            "reference": str(parity_reference),
            "top1_agreement": float((logits.argmax(1) == reference_logits.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(logits - reference_logits).max()),
            **cosine_fidelity(torch.from_numpy(reference_logits), torch.from_numpy(logits)),
        }
    if torch_model is None:
        report["parity_skipped"] = parity_skipped or "no PyTorch model was given"
    else:
        check_pair(onnx_path, torch_model)
        report["parity"] = parity(logits, torch_logits(torch_model, dataset))
        if not report["parity"]["passed"]:
            report["failures"].append(
                f"parity with PyTorch failed: top-1 agreement "
                f"{report['parity']['top1_agreement']:.4%}, max |diff| "
                f"{report['parity']['max_abs_diff']:.2e}"
            )
    if options.max_accuracy_drop is not None:
        if reference_accuracy is None:
            raise UsageError(
                "--max-accuracy-drop needs --baseline (or an export that records "
                "the dense accuracy)"
            )
        drop = reference_accuracy - report["accuracy"]
        report["accuracy_drop"] = drop
        if drop > options.max_accuracy_drop:
            report["failures"].append(
                f"accuracy dropped by {drop:.2%} (from {reference_accuracy:.2%} to "
                f"{report['accuracy']:.2%}), more than --max-accuracy-drop "
                f"{options.max_accuracy_drop:.2%}"
            )
    report["latency"] = latency(sessions, sample_shape, options)
    if baseline is not None:
        report["latency_ratio"] = {
            b: report["latency"]["model"][b]["p50_ms"] / report["latency"]["baseline"][b]["p50_ms"]
            for b in report["latency"]["model"]
        }
        report["speedup"] = {b: 1.0 / r for b, r in report["latency_ratio"].items()}
    report["note"] = (
        "channels were removed: the ONNX model is a smaller dense model, and the latency "
        "ratio to the dense baseline is its speed-up in ONNX Runtime"
        if "structure" in session.get_modelmeta().custom_metadata_map  # (no second load)
        else "unstructured zeros do not speed up ONNX Runtime's dense kernels; "
        "sparse files save storage and transfer, not compute"
    )
    report["passed"] = not report["failures"]
    return report


def gate_baseline(onnx_file: Path) -> Path:
    """The dense model whose accuracy --max-accuracy-drop compares with, measured now: the
    dense.onnx prunekit wrote beside the export (an accuracy recorded in a file's metadata
    is reported, never trusted for a gate)."""
    from prunekit.runtime.outputs import written_by_prunekit

    dense = onnx_file.parent / "dense.onnx"
    if dense.resolve() != onnx_file.resolve() and dense.is_file() and written_by_prunekit(dense):
        return dense
    raise UsageError(
        f"--max-accuracy-drop compares with the dense model's accuracy measured now, and there "
        f"is no dense.onnx beside {onnx_file}: pass --baseline DENSE.onnx"
    )


def validate_file(
    onnx_file: Path,
    options: ValidateOptions,
    baseline: Path | None = None,
    data: str | None = None,
    normalize: str | None = None,
    image_size: int | None = None,
    torch_model: str | None = None,
    weights: Path | None = None,
    num_classes: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """`prunekit validate`: the data, its preprocessing and the parity model default to what
    prunekit recorded in the file. Returns the result and the warnings."""
    from prunekit.load.data import load_data
    from prunekit.load.preprocess import Preprocess

    options.check()
    meta = read_onnx_metadata(onnx_file)
    spec = data or meta.data
    if spec is None:
        raise UsageError(f"{onnx_file} records no dataset; pass --data SPEC")
    if data is None:  # the recorded data comes with its recorded preprocessing
        normalize = normalize or meta.normalize
        image_size = image_size or meta.image_size
    with cache_only():  # the tokenizer of the model the file names: never downloaded
        splits = load_data(spec, Preprocess(normalize, image_size), meta.model, meta.max_length)
    model, skipped = parity_model(onnx_file, meta, torch_model, weights, num_classes)
    if options.max_accuracy_drop is not None and baseline is None:
        baseline = gate_baseline(onnx_file)
    dense = None
    if not splits.labeled and baseline is None:  # the dense model, for the fidelity
        dense = dense_model(meta, torch_model, num_classes)
    result = validate(
        onnx_file, splits.test, splits.input_shape, options, baseline, model, None, skipped,
        dense,
    )  # fmt: skip
    return result, [f"parity with PyTorch not checked: {skipped}"] if skipped else []
