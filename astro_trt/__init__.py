"""astro-trt: compile a trained ASTRO recommendation model into verified TensorRT engines.

Stages live in sub-packages named after them: ``astro_trt.model`` (PyTorch ASTRO, data,
training), ``astro_trt.exporter`` (ONNX), ``astro_trt.engines`` (TensorRT builds, bundle,
runtime), ``astro_trt.validate`` (parity and throughput), ``astro_trt.plugins`` (attention
operators: reference, kernels, TensorRT plugins). Heavy dependencies are imported lazily.
"""

__version__ = "0.1.0"
