"""A trained model for a device: ONNX export, onnxruntime checks, int8 quantization."""
