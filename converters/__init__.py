"""Converters: trained checkpoints to GGUF (and ONNX)."""
