"""File formats: safetensors with metadata, the compact sparse form, ONNX export. Imports
errors, runtime and contract."""
