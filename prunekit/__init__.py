"""prunekit: prune PyTorch models with first- and second-order criteria, export and validate."""

__version__ = "0.1.0"
