"""IPluginV3 plugins of the two attention operators, written in Python over the Triton kernels.

TensorRT is never imported here: ``plugin_classes(trt)`` builds the plugin and creator classes for
the module it is given (``tensorrt``, or ``tensorrt_rtx`` whose classes exist although RTX cannot
run custom plugins), so this file imports anywhere. Build-time answers come from spec.py.

Attributes (serialized, and accepted by the creator): ``op_version`` (must be 1) and
``num_time_thresholds`` (NT - 1; 0 means "take it from the time_thresholds input"). Everything
learned (bias tables, inverse temperatures) is an input tensor, so one engine serves any weights.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from astro_trt.errors import BackendError
from astro_trt.lazy import lazy_import
from astro_trt.plugins import names, operators
from astro_trt.plugins.tensorrt.spec import SPECS, OperatorSpec
from astro_trt.precision import DTYPES, by_trt

torch = lazy_import("torch")  # only enqueue (a GPU running the engine) touches it

OP_VERSION = 1
FIELD_OP_VERSION = "op_version"
FIELD_NUM_THRESHOLDS = "num_time_thresholds"


def _field_values(fc: Any) -> dict[str, int]:
    """PluginFieldCollection -> {name: int}; unknown names are rejected rather than ignored."""
    values: dict[str, int] = {}
    for index in range(len(fc) if fc is not None else 0):
        field = fc[index]
        if field.name not in (FIELD_OP_VERSION, FIELD_NUM_THRESHOLDS):
            raise BackendError(f"astro attention plugin: unknown attribute '{field.name}'; "
                               f"expected {FIELD_OP_VERSION} and {FIELD_NUM_THRESHOLDS}")
        values[field.name] = int(field.data[0]) if len(field.data) else 0
    return values


class _DeviceBuffer:
    """A raw device pointer seen by torch through __cuda_array_interface__ (no copy, no ownership)."""

    def __init__(self, pointer: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (pointer, False), "version": 2, "strides": None,
        }


def _torch_view(trt: Any, pointer: int, desc: Any):
    dtype = by_trt(desc.type.name).torch()
    shape = tuple(desc.dims)
    count = 1
    for extent in shape:
        count *= extent
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device="cuda")
    raw = torch.as_tensor(_DeviceBuffer(pointer, nbytes), device="cuda")
    return raw.view(dtype).reshape(shape)


@functools.cache
def plugin_classes(trt: Any, spec: OperatorSpec, creator_name: str) -> tuple[type, type]:
    """(plugin class, creator class) of ``spec`` for the TensorRT module ``trt``.

    ``creator_name`` is the name the creator registers under (the plugin name or the ONNX op type);
    the plugin reports the same name so that TensorRT finds its creator again when it deserializes.
    """
    type_names = {getattr(trt.DataType, d.trt): d.trt for d in DTYPES.values() if hasattr(trt.DataType, d.trt)}

    class AttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fc: Any = None, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = names.PLUGIN_NAMESPACE
            self.plugin_name = creator_name
            self.plugin_version = names.PLUGIN_VERSION
            self.phase = phase
            values = _field_values(fc)
            version = values.get(FIELD_OP_VERSION, OP_VERSION)
            if version != OP_VERSION:
                raise BackendError(f"{creator_name}: engine built with op_version {version}, this astro-trt "
                                   f"implements {OP_VERSION}; rebuild the engine with this version")
            self.num_time_thresholds = values.get(FIELD_NUM_THRESHOLDS, 0)

        # ------------------------------------------------------------ core / build
        def get_capability_interface(self, interface_type: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [getattr(trt.DataType, spec.output_type([type_names.get(t, str(t)) for t in input_types]))]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            # Output = q's symbolic shape; spec.output_shape checks the input count and rank.
            spec.output_shape([tuple(range(len(dims))) for dims in inputs])
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            first = type_names.get(in_out[0].desc.type, "")
            return type_names.get(desc.type, "") in spec.allowed_types(pos, first)

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            self._check_thresholds(inputs[spec.index("time_thresholds")].desc.dims)

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            self._check_thresholds(inputs[spec.index("time_thresholds")].dims)

        def _check_thresholds(self, dims: Any) -> None:
            count = dims[0] if len(dims) == 1 else -2
            if count >= 0 and self.num_time_thresholds and count != self.num_time_thresholds:
                raise BackendError(f"{creator_name}: time_thresholds has {count} entries but the node says "
                                   f"num_time_thresholds={self.num_time_thresholds}; export them consistently")

        def get_workspace_size(self, input_desc: list[Any], output_desc: list[Any]) -> int:
            return 0  # online softmax in registers: no scratch memory

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def get_fields_to_serialize(self) -> Any:
            # PluginField keeps a raw pointer into the array: the arrays must outlive the collection.
            self._serialized = [np.array([OP_VERSION], dtype=np.int32),
                                np.array([self.num_time_thresholds], dtype=np.int32)]
            return trt.PluginFieldCollection([
                trt.PluginField(name, data, trt.PluginFieldType.INT32)
                for name, data in zip((FIELD_OP_VERSION, FIELD_NUM_THRESHOLDS), self._serialized, strict=True)
            ])

        # ------------------------------------------------------------ runtime (GPU only)
        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int], outputs: list[int],
                    workspace: int, stream: int) -> None:
            args = [_torch_view(trt, ptr, desc) for ptr, desc in zip(inputs, input_desc, strict=True)]
            out = _torch_view(trt, outputs[0], output_desc[0])
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                out.copy_(operators.dispatch(spec.op, tuple(args), operators.Impl.TRITON))

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def clone(self) -> Any:
            twin = AttentionPlugin()
            twin.__dict__.update(self.__dict__)
            return twin

    class AttentionPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = creator_name
            self.plugin_namespace = names.PLUGIN_NAMESPACE
            self.plugin_version = names.PLUGIN_VERSION
            self._field_data = [np.array([], dtype=np.int32) for _ in range(2)]  # outlive the collection
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(name, data, trt.PluginFieldType.INT32)
                for name, data in zip((FIELD_OP_VERSION, FIELD_NUM_THRESHOLDS), self._field_data, strict=True)
            ])

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            return AttentionPlugin(fc, phase)

    AttentionPlugin.__name__ = AttentionPlugin.__qualname__ = f"{creator_name}Plugin"
    AttentionPluginCreator.__name__ = AttentionPluginCreator.__qualname__ = f"{creator_name}Creator"
    return AttentionPlugin, AttentionPluginCreator


def creators(trt: Any) -> list[Any]:
    """One creator per (operator, name): the Astro* plugin name and the ONNX op type."""
    made = []
    for spec in SPECS:
        for name in (spec.plugin_name, spec.onnx_op):
            _, creator_class = plugin_classes(trt, spec, name)
            made.append(creator_class())
    return made


# The registry holds raw pointers to the Python creators: they live here for the whole process,
# and a second register() call (a second export in one process) reuses them.
_REGISTERED: dict[str, list[Any]] = {}


def register(trt_module: Any) -> list[Any]:
    """Register both attention plugins, under both names, in namespace 'astro' of ``trt_module``'s
    plugin registry, once per process. Returns the creators."""
    if not hasattr(trt_module, "IPluginV3"):
        raise BackendError(f"{getattr(trt_module, '__name__', trt_module)} has no IPluginV3; "
                           "the astro plugins need TensorRT >= 10 (pass the imported tensorrt module)")
    key = getattr(trt_module, "__name__", str(id(trt_module)))
    if key in _REGISTERED:
        return _REGISTERED[key]
    registry = trt_module.get_plugin_registry()
    made = creators(trt_module)
    for creator in made:
        if not registry.register_creator(creator, names.PLUGIN_NAMESPACE):
            raise BackendError(f"TensorRT refused to register plugin creator '{creator.name}' in namespace "
                               f"'{names.PLUGIN_NAMESPACE}'; is another version already registered?")
    _REGISTERED[key] = made
    return made


def unregister(trt_module: Any) -> None:
    """Take the creators ``register`` added out of ``trt_module``'s registry again."""
    registry = trt_module.get_plugin_registry()
    for creator in _REGISTERED.pop(getattr(trt_module, "__name__", str(id(trt_module))), []):
        registry.deregister_creator(creator)
