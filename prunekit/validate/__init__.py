"""Validate: accuracy and fidelity in PyTorch, ONNX Runtime parity, latency and speed-up of an
export. Imports the layers from engine down."""
