"""Train the sample models and write their weights and cards.

    python sample_models/train.py [--only NAME] [--out DIR]

Deterministic on the CPU for a given torch version: fixed seed, fixed data split, one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from prunekit.engine.train import TrainConfig, train
from prunekit.load.data import load_data
from prunekit.load.sample_models import FILES, SAMPLES
from prunekit.run.exports import save_safetensors
from prunekit.validate.metrics import accuracy

RECIPE = {
    "epochs": 60,
    "lr": 0.05,
    "batch_size": 64,
    "weight_decay": 5e-4,
    "seed": 0,
    "optimizer": "sgd (nesterov momentum 0.9), cosine schedule",
}


def train_one(name: str, out: Path) -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sample = SAMPLES[name]
    data = load_data(sample.data)
    torch.manual_seed(RECIPE["seed"])
    model = sample.factory()
    cpu = torch.device("cpu")
    recipe = TrainConfig(
        lr=RECIPE["lr"], batch_size=RECIPE["batch_size"], weight_decay=RECIPE["weight_decay"]
    )
    history = train(
        model, data.train, epochs=RECIPE["epochs"], device=cpu, config=recipe, seed=RECIPE["seed"]
    )
    weights = out / f"{name}.safetensors"
    save_safetensors(model, weights, {"format": "pt", "model": f"sample:{name}"})
    card = {
        "name": name,
        "architecture": f"{type(model).__module__}.{type(model).__name__}",
        "description": (type(model).__doc__ or "").strip(),
        "layers": str(model),
        "data": sample.data,
        "split": {
            "train": len(data.train),
            "calibration": len(data.calibration),
            "test": len(data.test),
            "rule": "fixed permutation (seed 0), last 20 % test",
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": accuracy(model, data.test, cpu),
        "final_train_loss": round(history[-1]["loss"], 5),
        "recipe": RECIPE,
        "torch": torch.__version__,
        "command": f"python sample_models/train.py --only {name}",
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SAMPLES), action="append")
    parser.add_argument("--out", type=Path, default=FILES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or SAMPLES:
        card = train_one(name, args.out)
        print(f"{name}: {card['parameters']} parameters, test accuracy {card['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
