"""The attention kernels compiled ahead of time for real GPU targets (no GPU here): every block
configuration the launcher chooses for the presets' shapes yields a cubin for sm_80, sm_86, sm_89
and sm_90, with no register spills and the shared memory the launcher's bound promised.

fp16 is compiled in CI (bf16 gives the same binaries' resources, fp32 is in docs/kernels.md's full
table from ``astro-trt bench-kernels --compile-only``); one compiler process per session.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from astro_trt.cli import main  # noqa: E402
from astro_trt.config import PRESETS, preset  # noqa: E402
from astro_trt.errors import DataError  # noqa: E402
from astro_trt.plugins.kernels import aot  # noqa: E402
from astro_trt.plugins.kernels.blocks import (  # noqa: E402
    CI_TARGETS,
    TARGETS,
    BlockConfig,
    choose,
    shared_bound,
    target_of,
)

# A head dim no preset has, whose fp32 K/V pipeline does not fit sm_86's 99 KiB at the preferred
# tiles but fits sm_90's 227 KiB: the choice must differ by target, and the bound must hold.
WIDE = {"rows": 64, "cols": 200, "head_dim": 128, "dtype": "fp32"}


@pytest.fixture(scope="session")
def compiled() -> list[aot.Resources]:
    jobs = aot.launcher_jobs(PRESETS, ["fp16"], CI_TARGETS)
    for target in ("sm_86", "sm_90"):
        cfg = choose(WIDE["rows"], WIDE["cols"], WIDE["head_dim"], aot.ELEMENT_BYTES[WIDE["dtype"]], target)
        job = aot.Job("candidate", WIDE["dtype"], target, cfg)
        jobs[job.key()] = (job, ["head_dim 128"])
    return aot.compile_jobs(jobs)


def test_every_chosen_configuration_compiles_to_a_cubin_for_every_target(compiled):
    assert not [(r.job, r.error) for r in compiled if r.error]
    assert all(r.cubin_bytes and r.cubin_bytes > 1000 for r in compiled)
    seen = {(r.job.op, r.job.target) for r in compiled}
    assert seen == {(op, t) for op in aot.OPERATORS for t in CI_TARGETS}


def test_preset_binaries_do_not_spill_and_stay_within_the_shared_memory_bound(compiled):
    for r in compiled:
        bound = shared_bound(r.job.config, aot.ELEMENT_BYTES[r.job.dtype])
        assert r.shared <= bound <= TARGETS[r.job.target].max_shared, (r.job, r.shared, bound)
        assert r.registers <= 255
        if r.shapes != ["head_dim 128"]:
            assert (r.spill_stores, r.spill_loads, r.stack) == (0, 0, 0), (r.job, r.shapes)


def test_the_wide_head_gets_smaller_tiles_on_the_smaller_target(compiled):
    by_target = {r.job.target: r for r in compiled if r.shapes == ["head_dim 128"]}
    small, large = by_target["sm_86"].job.config, by_target["sm_90"].job.config
    assert (small.block_m, small.block_n) == (16, 16) and (large.block_m, large.block_n) == (64, 32)
    # The preferred tiles' bound is over sm_86's limit: the launcher must not have chosen them there.
    assert shared_bound(large, 4) > TARGETS["sm_86"].max_shared
    with pytest.raises(DataError, match="no block configuration"):
        choose(64, 200, 1024, 4, "sm_86")


def test_the_compiled_jobs_cover_every_choice_the_launcher_makes_for_the_presets():
    jobs = aot.launcher_jobs(PRESETS, ["fp16"], CI_TARGETS)
    configs = {(j.op, j.target, j.config) for j, _ in jobs.values()}
    for name in PRESETS:
        cfg = preset(name)
        for target in CI_TARGETS:
            assert ("msa", target, choose(cfg.max_len, cfg.max_len, cfg.head_dim, 2, target)) in configs
            for m in range(1, 300):
                assert ("candidate", target, choose(m, cfg.max_len, cfg.head_dim, 2, target)) in configs, (name, m)


def test_gpus_map_to_the_limits_of_their_target():
    assert target_of((9, 0)) == "sm_90" and target_of((8, 7)) == "sm_86" and target_of((8, 9)) == "sm_89"
    assert target_of((12, 0)) == "sm_86"  # newer than the table: held to the smallest shared memory
    with pytest.raises(DataError, match="unknown"):
        choose(1, 1, 16, 2, "sm_70")
    assert BlockConfig(64, 32, 32, 8).label() == "m64 n32 d32 w8 s3"


def test_ptxas_report_is_parsed():
    text = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 168 registers, used 1 barriers\n")
    assert aot.parse_ptxas(text) == {"registers": 168, "stack": 8, "spill_stores": 12, "spill_loads": 4}


def test_bench_kernels_compile_only_prints_resources_and_predictions(compiled, tmp_path, capsys):
    out = tmp_path / "k.json"
    # The same binaries as the fixture's: Triton's cache answers, so this costs no compilation.
    main(["bench-kernels", "--compile-only", "--config", "ml100k", "--dtype", "fp16", "--targets", "sm_90",
          "--candidates", "64", "--json", str(out)])
    text = capsys.readouterr().out
    assert "smem B" in text and "H100 us" in text and "split end to end" in text
    report = json.loads(out.read_text())
    rows = report["resources"]
    assert {r["job"]["op"] for r in rows} == {"msa", "candidate"} and all(r["fits"] for r in rows)
    assert [r["what"] for r in report["split"]["fp16"]] == ["encoder", "scorer"]
    assert all(r["measured_ms"] is None for r in report["predicted"]["fp16"])  # no GPU, nothing measured


def test_bench_kernels_refuses_an_unknown_target(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench-kernels", "--compile-only", "--targets", "sm_70"])
    assert exc.value.code == 2
    assert "sm_70" in capsys.readouterr().err
