"""Runtime services every stage uses: device, torchrun process groups, batches and model modes,
timing, progress lines, atomic outputs. Imports nothing of prunekit but errors."""
