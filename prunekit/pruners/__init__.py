"""Built-in pruning criteria and the contract every pruner plugin follows."""

from prunekit.pruners.base import Param, Pruner, Target

__all__ = ["Param", "Pruner", "Target"]
