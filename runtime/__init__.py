"""The runtime layer: one family of runners (PyTorch, ONNX Runtime, TensorRT) in front of which the
input gate stands once per call. validate, bench, bisect and the served models run graphs here."""
