"""Hugging Face models from a local directory (``hf:DIR``) and text data (``text:FILE``).

Needs the optional extra ``prunekit[hf]`` (transformers). A model is wrapped so that it takes
one integer tensor (N, 2, L) — token ids and attention mask stacked — and returns (N, K):
the logits of a sequence classifier, or the attention-masked mean of the last hidden states
of an encoder (sentence embeddings). Token ids stay integers through statistics, evaluation
and export.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import torch
from pydantic import Field
from torch import nn

from prunekit.errors import InputFileError, UsageError
from prunekit.runtime.schema import Lenient, parsed
from prunekit.structured.groups import Group, Member

INSTALL = "install the extra: pip install 'prunekit[hf]'"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
DEFAULT_MAX_LENGTH = 128


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never the network
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers
    except ImportError:
        raise UsageError(f"hf: models need transformers; {INSTALL}") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class PackedInputs(nn.Module):
    """A transformers model taking (N, 2, L) = ids and attention mask, returning (N, K): a
    classifier's logits or an encoder's mean-pooled embedding; a decoder (causal language
    model) returns its next-token logits (N, L, V), without a KV cache."""

    input_dtype = torch.long  # read by the ONNX export: integer inputs
    sequence_axis = 2  # exported as a dynamic axis, like the batch
    model: Any  # a transformers PreTrainedModel (config, dtype, set_attn_implementation)

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.token_mask: torch.Tensor | None = None
        self.vmapped = False
        # a decoder's output projection (tied to its token embeddings in most families) is
        # never pruned, as in SparseGPT and Wanda
        self.kept_whole = ("model.lm_head.weight",) if kind == "decoder" else ()

    @contextmanager
    def per_sample_mode(self) -> Iterator[None]:
        """For vmapped per-sample gradients: eager attention (SDPA's backward has no batching
        rule) and a ready 4-D additive mask (transformers' mask builder tests the mask's
        values, which vmap cannot)."""
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        self.vmapped = True
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)
            self.vmapped = False

    def channel_groups(self) -> tuple[list[Group], list[str]]:
        """The MLP neurons of every transformer layer (``--structure channels``): neuron c of
        ``intermediate.dense`` (row c, bias c) is read by column c of ``output.dense``
        only, through an element-wise activation (BERT, RoBERTa, MiniLM...)."""
        groups = []
        for name, layer in self.named_modules():
            up = getattr(getattr(layer, "intermediate", None), "dense", None)
            down = getattr(getattr(layer, "output", None), "dense", None)
            if (
                isinstance(up, nn.Linear)
                and isinstance(down, nn.Linear)
                and up.out_features == down.in_features
            ):
                members = [Member(f"{name}.intermediate.dense", "out"),
                           Member(f"{name}.output.dense", "in")]  # fmt: skip
                groups.append(Group(up.out_features, members))
        return groups, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        attention: torch.Tensor = mask
        if self.vmapped:
            allowed = mask[:, None, None, :].bool()
            if self.kind == "decoder":  # a ready 4-D mask is taken as is: causal here too
                length = ids.shape[-1]
                causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
                allowed = allowed & causal
            blocked = (~allowed).to(self.model.dtype)
            attention = blocked * torch.finfo(self.model.dtype).min
        elif not torch.compiler.is_compiling():  # (an export traces it; nothing to record)
            self.token_mask = mask  # read by layer-input statistics: padding rows left out
        if self.kind == "decoder":
            return self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        out = self.model(input_ids=ids, attention_mask=attention)
        if self.kind == "classifier":
            return out.logits
        hidden = out.last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass
class HFModel:
    module: PackedInputs
    tokenizer: object
    kind: str  # "encoder", "classifier" or "decoder"
    max_length: int


def check_dir(root: Path) -> None:
    if not root.is_dir():
        raise InputFileError(f"hf:{root}: no such model directory; check the path")
    if not (root / "config.json").is_file():
        raise InputFileError(f"hf:{root} has no config.json; point at a saved model directory")
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        raise InputFileError(
            f"hf:{root} has no weights ({' or '.join(WEIGHT_FILES[:2])}); save the model with "
            "save_pretrained"
        )
    if not any((root / name).is_file() for name in (WEIGHT_FILES[0], WEIGHT_FILES[2])):
        raise InputFileError(
            f"hf:{root} holds its weights as a pickle (pytorch_model.bin), which can run code "
            "when read, and prunekit reads safetensors only: re-save the model with "
            "save_pretrained(DIR, safe_serialization=True)"
        )


class ShardIndex(Lenient):
    """model.safetensors.index.json: which file holds each tensor."""

    weight_map: dict[str, str]


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a model folder (one, or the shards its index names, each a
    plain file name in the folder)."""
    if (root / WEIGHT_FILES[0]).is_file():
        return [root / WEIGHT_FILES[0]]
    index = parsed(
        ShardIndex, (root / WEIGHT_FILES[2]).read_bytes(), f"hf:{root}/{WEIGHT_FILES[2]}",
        "save the model with save_pretrained",
    )  # fmt: skip
    names = sorted(set(index.weight_map.values()))
    outside = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
    if outside or not names:
        raise InputFileError(
            f"hf:{root}/{WEIGHT_FILES[2]} names {outside[0] if outside else 'no file'}; an index "
            "names safetensors files in its own folder: save the model with save_pretrained"
        )
    return [root / n for n in names]


Dimension = Annotated[int, Field(ge=1, le=1 << 20)]


class HFConfig(Lenient):
    """The keys of a config.json that prunekit relies on, typed and bounded before
    transformers allocates anything from them (other keys are transformers' business)."""

    model_type: str
    architectures: list[str] | None = None
    auto_map: dict[str, Any] | None = None  # code in the folder: refused
    vocab_size: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    hidden_size: Dimension | None = None
    intermediate_size: Dimension | None = None
    num_hidden_layers: Annotated[int, Field(ge=1, le=10_000)] | None = None
    max_position_embeddings: Dimension | None = None


WEIGHTS_SLACK = 4  # the config may describe at most this many times the file's parameters


def checked_config(root: Path) -> HFConfig:
    """config.json against its schema, and against the weights file: a config describing a
    model far larger than its weights (raised layer counts, sizes) is refused before anything
    is allocated."""
    from safetensors import safe_open

    config = parsed(
        HFConfig, (root / "config.json").read_bytes(), f"hf:{root}/config.json",
        "save the model with save_pretrained",
    )  # fmt: skip
    if config.auto_map:
        raise InputFileError(
            f"hf:{root}/config.json names code in the folder (auto_map: "
            f"{', '.join(config.auto_map)}), and prunekit never runs a model folder's code "
            "(it never sets trust_remote_code); use a model that transformers provides"
        )
    stored = 0
    for path in weight_files(root):
        try:
            with safe_open(str(path), "pt") as f:
                stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        except Exception as exc:  # truncated or not safetensors (SafetensorError, OSError...)
            raise InputFileError(
                f"hf:{path} is not a readable safetensors file "
                f"({(str(exc).splitlines() or [''])[0][:80]}); save the model again"
            ) from None
    sizes = (config.num_hidden_layers, config.hidden_size, config.vocab_size)
    if all(v is not None for v in sizes):
        layers, hidden, vocab = cast(tuple[int, int, int], sizes)
        inner = config.intermediate_size or 4 * hidden
        described = layers * (4 * hidden * hidden + 2 * hidden * inner) + vocab * hidden
        if described > WEIGHTS_SLACK * max(stored, 1):
            raise InputFileError(
                f"hf:{root}/config.json describes about {described:,} parameters "
                f"({layers} layers of width {hidden}) but its weights hold {stored:,}: "
                "the weights do not belong to this config; save the weights and config.json of "
                "one model together (save_pretrained)"
            )
    return config


def _config_and_tokenizer(root: Path):
    """The directory's config and its tokenizer, which must fit the model's vocabulary."""
    transformers = _transformers()
    check_dir(root)
    checked_config(root)
    try:
        config = transformers.AutoConfig.from_pretrained(root, trust_remote_code=False)
    except Exception as exc:  # an unknown model_type, a value of the wrong type (no code ran)
        raise InputFileError(
            f"hf:{root}/config.json: transformers cannot read it "
            f"({str(exc).splitlines()[0][:120]}); save the model with save_pretrained"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputFileError(
            f"hf:{root}: no usable tokenizer ({str(exc).splitlines()[0]})"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders (GPT-2) pad with it: masked out
    tokenizer.padding_side = "right"  # (some decoders' tokenizers pad on the left)
    if tokenizer.vocab_size > config.vocab_size:
        raise InputFileError(
            f"hf:{root}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{config.vocab_size}; they do not belong together"
        )
    return config, tokenizer


def load_hf(root: Path) -> HFModel:
    """The model in ``root`` (config + weights + tokenizer), wrapped; in eval mode, on CPU."""
    transformers = _transformers()
    config, tokenizer = _config_and_tokenizer(root)
    architectures = config.architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    decoder = not classifier and any(a.endswith(DECODER_HEADS) for a in architectures)
    auto = (
        transformers.AutoModelForSequenceClassification
        if classifier
        else transformers.AutoModelForCausalLM
        if decoder
        else transformers.AutoModel
    )
    try:
        model, info = auto.from_pretrained(root, trust_remote_code=False, output_loading_info=True)
    except Exception as exc:  # sizes that do not fit together, say (no code of the folder ran)
        raise InputFileError(
            f"hf:{root}: cannot load it ({(str(exc).splitlines() or [''])[0][:160]}); save the "
            "model with save_pretrained"
        ) from exc
    missing = sorted(info.get("missing_keys") or []) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
    )
    if not classifier and not decoder:  # an encoder's pooler is dropped: its weights unused
        missing = [k for k in missing if not k.split(".", 1)[-1].startswith("pooler.")
                   and not k.startswith("pooler.")]  # fmt: skip
    if missing:  # transformers would fill them with random values
        raise InputFileError(
            f"hf:{root}: the weights do not cover the model its config.json describes: "
            f"{len(missing)} tensor(s) missing or of another shape (e.g. {', '.join(missing[:3])})"
            ", which would be random; save the weights and config.json of one model together "
            "(save_pretrained)"
        )
    if not classifier and getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused by mean pooling: neither pruned nor exported
    limit = token_limit(config)
    if decoder:
        as_linear(model)
    kind = "classifier" if classifier else "decoder" if decoder else "encoder"
    wrapped = PackedInputs(model.eval(), kind)
    return HFModel(wrapped.eval(), tokenizer, wrapped.kind, limit)


DECODER_HEADS = ("ForCausalLM", "LMHeadModel")  # GPT2LMHeadModel, LlamaForCausalLM...


def as_linear(model: nn.Module) -> None:
    """Replace transformers' Conv1D layers (GPT-2's projections: y = x W + b, W stored
    (in, out)) by the equal nn.Linear (W stored (out, in)), which every pruner, statistic and
    export knows."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                fan_in, fan_out = child.weight.shape
                linear = nn.Linear(fan_in, fan_out, bias=child.bias is not None)
                linear = linear.to(child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)


def load_tokenizer(root: Path) -> tuple[Callable[..., Any], int]:
    """The tokenizer of the model in ``root`` and the model's token limit (no weights read)."""
    config, tokenizer = _config_and_tokenizer(root)
    return tokenizer, token_limit(config)


def token_limit(config: Any) -> int:
    """The longest sequence the model's position embeddings cover (GPT-2: n_positions)."""
    return int(
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or DEFAULT_MAX_LENGTH
    )


MAX_TEXT_BYTES = 1 << 30
# a token spans at most this many characters (BERT's tokenizers make one [UNK] of a longer
# word): a text longer than this many characters per token of --max-length is cut anyway,
# so it is cut before tokenising (a 10 MB line would otherwise be tokenised in full)
CHARS_PER_TOKEN = 100


def read_texts(path: Path) -> list[str]:
    if not path.exists():
        raise InputFileError(f"text file {path} does not exist; check --data text:FILE")
    if not path.is_file():
        raise InputFileError(
            f"{path} is not a regular file (a folder, pipe or device); give a text file, one "
            "text per line, to --data text:FILE"
        )
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise InputFileError(
            f"text file {path} holds {path.stat().st_size:,} bytes; prunekit calibrates on at "
            f"most {MAX_TEXT_BYTES:,}: give a sample of the texts"
        )
    texts = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise InputFileError(f"text file {path} holds no text; give one text per line")
    return texts


def labelled(texts: list[str], path: Path) -> tuple[list[str], list[int]] | None:
    """The texts and labels of a file whose every line is ``LABEL<TAB>TEXT`` (LABEL a
    non-negative integer), None for plain texts; a file where only some lines are labelled
    is refused, naming the first line without a label."""
    parts = [t.partition("\t") for t in texts]
    marked = [
        label.isascii() and label.isdigit() and len(label) <= 6 and bool(rest.strip())
        for label, _, rest in parts
    ]
    if not marked[0]:
        return None
    if not all(marked):
        raise InputFileError(
            f"text file {path}: its first line is LABEL<TAB>TEXT but text "
            f"{marked.index(False) + 1} has no label; label every line, or none"
        )
    return [rest.strip() for _, _, rest in parts], [int(label) for label, _, _ in parts]


UNKNOWN_LIMIT = 0.5  # the most of a text's tokens that may be the unknown token


def _check_known_words(ids: list[list[int]], tokenizer: Any) -> None:
    """Refuse a tokenizer that knows (almost) none of the text: without its vocabulary files
    a folder's tokenizer maps every word to the unknown token, and calibration runs on
    nothing."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unknown}
    tokens = [t for row in ids for t in row if t not in special]
    if unknown is None or not tokens:
        return
    share = sum(t == unknown for t in tokens) / len(tokens)
    if share > UNKNOWN_LIMIT:
        raise InputFileError(
            f"the model's tokenizer maps {share:.0%} of the text's tokens to its unknown token "
            f"({getattr(tokenizer, 'unk_token', '?')}): the model folder lacks its tokenizer "
            "files (tokenizer.json or vocab.txt), or they belong to another language or model; "
            "save the tokenizer with the model (tokenizer.save_pretrained)"
        )


def tokenize(
    texts: list[str], tokenizer: Callable[..., Any], max_length: int, model_limit: int
) -> tuple[torch.Tensor, int]:
    """(N, 2, L) int64 ids + attention masks, padded to the longest; and how many texts were
    cut to ``max_length`` (at most the model's limit)."""
    length = min(max_length, model_limit)
    chars = (length + 1) * CHARS_PER_TOKEN
    texts = [t[:chars] for t in texts]  # longer ones are cut by the tokenizer in any case
    # one token past the limit says whether a text is cut, without tokenising all of it
    full = tokenizer(texts, truncation=True, max_length=length + 1)["input_ids"]
    _check_known_words(full, tokenizer)
    cut = sum(len(ids) > length for ids in full)
    encoded = tokenizer(
        texts, truncation=True, max_length=length, padding="longest", return_tensors="pt"
    )
    packed = torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1)
    return packed.long(), cut
