"""Calibrate: the statistics pruners need (per-sample gradients, Fisher diagonals, blockwise
inverse Fisher, layer inputs) and the memory plan that sizes their passes. Imports the layers
from load down."""
