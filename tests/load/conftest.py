"""Fixtures of the loader tests: a tiny Hugging Face encoder folder built here (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "a",
    "mat",
    "red",
    "blue",
    "green",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "river",
    "tree",
    "house",
    "car",
    "runs",
    "fast",
    "slow",
    "big",
    "small",
    "old",
    "new",
    "sun",
    "moon",
    "star",
]


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer BERT (hidden 32) with its WordPiece tokenizer, and 60 sentences."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    assert tokenizer("the cat")["input_ids"] == [2, 5, 6, 3]  # words, not [UNK]
    config = transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = root / "bert"
    transformers.BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(60)]
    lines[5] = " ".join(WORDS * 3)  # longer than --max-length: cut, with a note
    texts = root / "texts.txt"
    texts.write_text("\n".join(lines) + "\n")
    return model_dir, texts
