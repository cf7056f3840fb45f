"""The names under which the two attention operators appear in ONNX and in TensorRT.

The exporter emits ONNX nodes ``ONNX_DOMAIN::<op type>`` whose inputs are those of
plugins/operators.py, in its order, and which have one output. Full TensorRT's ONNX parser
maps a node to a plugin creator by op type, version PLUGIN_VERSION and namespace (the node's
domain), so ``plugins.tensorrt.register`` registers each creator twice: under its Astro* plugin
name and under the ONNX op type, both in namespace PLUGIN_NAMESPACE.
"""

from __future__ import annotations

ONNX_DOMAIN = "astro"
ONNX_OPSET_VERSION = 1

MSA_ONNX_OP = "MultiScaleSelfAttention"
CANDIDATE_ONNX_OP = "CandidateAttention"

MSA_PLUGIN = "AstroMultiScaleSelfAttention"
CANDIDATE_PLUGIN = "AstroCandidateAttention"

PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ONNX_DOMAIN
