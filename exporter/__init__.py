"""Export a checkpoint to ONNX: user encoder, item scorer, full model."""
