"""TensorRT IPluginV3 plugins over the Triton kernels.

``register(trt_module)`` registers AstroMultiScaleSelfAttention and AstroCandidateAttention (and the
same creators under the ONNX op types MultiScaleSelfAttention / CandidateAttention) in namespace
'astro'. Ahead-of-time plugins (``tensorrt.plugin`` with ``aot_impl``) are not provided: the
installed TensorRT (tensorrt_rtx) has no ``plugin`` module, so such code could not be tested here.
"""

from astro_trt.plugins.tensorrt.plugin import creators, plugin_classes, register, unregister

__all__ = ["creators", "plugin_classes", "register", "unregister"]
