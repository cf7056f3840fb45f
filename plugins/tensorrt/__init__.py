"""TensorRT IPluginV3 plugins over the Triton kernels."""
