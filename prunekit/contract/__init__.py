"""The plugin contract: what a pruner plugin may see (Pruner, Param, Target, StepContext, the
statistic names, StatsSpec, BlockInverse, the objectives, CONTRACT_VERSION). Re-exported by
prunekit.api. Imports only errors and runtime."""
