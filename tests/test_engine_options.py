"""Options that only shape TensorRT engines (--backend, --targets, --opt-level, --timing-cache)
are judged before any work, engines or not: an ONNX-only export refuses them instead of
ignoring them, and the opt-level range is one check (engines/build.py check_opt_level) shared
by the export, every build and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_status

from astro_trt.contract import OPT_LEVELS
from astro_trt.engines.build import check_opt_level
from astro_trt.engines.export_bundle import export_bundle
from astro_trt.errors import BackendError, ConfigError

# The example checkpoint: never read, since every case is refused first (a missing one would be
# refused too, but then for the wrong reason).
CKPT = Path(__file__).resolve().parents[1] / "examples" / "ml100k"
TAIL = "but --no-engines (engines=False) builds no engine; drop {}, or drop --no-engines to build engines"


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"targets": "bogus"}, "--targets 'bogus': an engine option, "),
    ({"targets": ["sm89"]}, "--targets ['sm89']: an engine option, "),
    ({"opt_level": 3}, "--opt-level 3: an engine option, "),
    ({"backend": "tensorrt-rtx"}, "--backend 'tensorrt-rtx': an engine option, "),
    ({"timing_cache": "cache.bin"}, "--timing-cache 'cache.bin': an engine option, "),
])
def test_onnx_only_export_refuses_each_engine_option(tmp_path, kwargs, named):
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError) as exc:
        export_bundle(CKPT, out, engines=False, **kwargs)
    assert str(exc.value) == named + TAIL.format("it")
    assert list(tmp_path.iterdir()) == []


def test_onnx_only_export_names_every_engine_option_at_once(tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_bundle(CKPT, tmp_path / "b", engines=False, targets="sm86,sm89", opt_level=0)
    assert str(exc.value) == "--targets 'sm86,sm89', --opt-level 0: engine options, " + TAIL.format("them")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("targets", [5, None, [1, 2], {"sm86"}])
def test_targets_that_are_not_text_are_refused_with_or_without_engines(tmp_path, targets):
    for engines in (False, True):
        with pytest.raises(BackendError, match=r"^--targets .*: expected a comma list such as 'portable' or "
                                               r"'sm86,sm89'; pass the compute targets as text$"):
            export_bundle(CKPT, tmp_path / "b", engines=engines, backend="tensorrt-rtx" if engines else "auto",
                          targets=targets)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [-1, 6, 10**9, 2.0, "3", True, float("nan")])
def test_opt_level_is_one_check(tmp_path, value):
    message = (f"--opt-level {value!r}: must be an integer in 0..5; choose a builder optimization level in that "
               "range, or leave it out for the default")
    with pytest.raises(ConfigError) as exc:
        check_opt_level(value)
    assert str(exc.value) == message
    for engines in (False, True):  # the export gives the same line, engines or not
        with pytest.raises(ConfigError) as exc:
            export_bundle(CKPT, tmp_path / "b", engines=engines, opt_level=value)
        assert str(exc.value) == message
    assert list(tmp_path.iterdir()) == []
    assert [check_opt_level(level) for level in (None, *OPT_LEVELS)] == [None, *OPT_LEVELS]


def test_cli_refuses_engine_options_with_no_engines(tmp_path, capsys):
    out = tmp_path / "bundle"
    for extra in (["--targets", "bogus"], ["--opt-level", "2"], ["--backend", "tensorrt-rtx"]):
        assert cli_status(["export", str(CKPT), "--out", str(out), "--no-engines", *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {extra[0]} ") and "--no-engines" in err[0], err
    assert cli_status(["export", str(CKPT), "--out", str(out), "--opt-level", "6", "--no-engines"]) == 2
    assert "'--opt-level': 6 is not in the range 0<=x<=5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_timing_cache_that_the_back_end_cannot_use_is_named_not_silently_dropped(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    said: list[str] = []
    cache = tmp_path / "cache.bin"
    export_bundle(CKPT, tmp_path / "b", backend="tensorrt-rtx", precisions=("fp32",), timing_cache=cache,
                  progress=said.append)
    notes = [line for line in said if "--timing-cache" in line]
    assert notes == [f"note: --timing-cache {cache} is not used: tensorrt-rtx has no timing cache (a no-op in its API)"]
    assert not cache.exists()
