"""The back-end interface: capabilities, selection and --targets parsing (no GPU needed)."""

from __future__ import annotations

import pytest

from astro_trt.engines.backend import BACKENDS, PORTABLE, TENSORRT, TENSORRT_RTX, resolve_backend
from astro_trt.errors import BackendError

rtx_installed = pytest.mark.skipif(not TENSORRT_RTX.is_available(), reason="tensorrt_rtx is not installed")


def test_capabilities_differ_where_the_back_ends_do():
    # TensorRT-RTX (docs/attention.md): builds ahead of time, has no plugin path, is strongly typed, no timing cache.
    assert TENSORRT_RTX.builds_without_gpu and not TENSORRT.builds_without_gpu
    assert TENSORRT.supports_plugins and not TENSORRT_RTX.supports_plugins
    assert TENSORRT_RTX.strongly_typed_only and not TENSORRT_RTX.timing_cache
    assert TENSORRT_RTX.compute_targets and not TENSORRT.compute_targets
    assert set(BACKENDS) == {"tensorrt", "tensorrt-rtx"}


@rtx_installed
def test_auto_picks_an_importable_back_end_and_reports_its_version():
    backend = resolve_backend("auto")
    assert backend.is_available()
    if not TENSORRT.is_available():
        assert backend is TENSORRT_RTX
    assert backend.version[0].isdigit()


def test_unknown_or_missing_back_end_is_a_clear_error():
    with pytest.raises(BackendError, match="choose one of"):
        resolve_backend("tensorrt-llm")
    if not TENSORRT.is_available():
        with pytest.raises(BackendError, match="--no-engines"):
            resolve_backend("tensorrt")


@rtx_installed
def test_rtx_compute_targets_exist_in_the_installed_enum():
    # Every target the interface accepts must be a ComputeCapability member of the real module.
    trt = TENSORRT_RTX.load()
    for target in TENSORRT_RTX.compute_targets:
        assert hasattr(trt.ComputeCapability, target.upper()), target


def test_targets_parsing():
    assert TENSORRT_RTX.parse_targets("portable") == [PORTABLE]
    assert TENSORRT_RTX.parse_targets("") == [PORTABLE]
    assert TENSORRT_RTX.parse_targets("SM86, sm89") == ["sm86", "sm89"]
    with pytest.raises(BackendError, match="unknown compute target"):
        TENSORRT_RTX.parse_targets("sm90")
    with pytest.raises(BackendError, match="cannot be combined"):
        TENSORRT_RTX.parse_targets("portable,sm86")
    with pytest.raises(BackendError, match="takes no compute-capability targets"):
        TENSORRT.parse_targets("sm86")
    assert TENSORRT.parse_targets("portable") == [PORTABLE]


@rtx_installed
def test_apply_targets_sets_the_builder_config():
    trt = TENSORRT_RTX.load()
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    TENSORRT_RTX.apply_targets(config, ["sm86", "sm120"])
    assert config.num_compute_capabilities == 2
    assert config.get_compute_capability(0) == trt.ComputeCapability.SM86
    assert config.get_compute_capability(1) == trt.ComputeCapability.SM120
