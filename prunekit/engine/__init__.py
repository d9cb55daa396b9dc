"""The pruning engine: targets and mask selection, one pruning step (score, select, update, or a
layer-wise pass), schedules, masked training, BatchNorm re-estimation. Imports the layers from
pruners down."""
