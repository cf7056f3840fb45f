"""Ahead-of-time compilation of the attention kernels for real GPU targets, on a machine without a
GPU or driver: Triton's compiler (``triton.compile(ASTSource(...), target=GPUTarget(...))``) makes
the PTX and cubin, the ptxas Triton ships (``ptxas-blackwell``, CUDA 13; the older ``ptxas`` beside
it refuses Triton's PTX version) reports registers, stack and spills, and Triton's metadata the
shared memory a launch asks for.

The jobs are the configurations the launcher (plugins/kernels/blocks.choose) picks for the presets'
shapes, so the table is what a GPU would run. Compilation happens in a fresh interpreter
(``compile_jobs``): under TRITON_INTERPRET=1, which the kernel tests set for their whole process,
the kernels are interpreted functions that Triton's compiler cannot take.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from astro_trt.config import preset
from astro_trt.errors import BackendError
from astro_trt.lazy import lazy_import
from astro_trt.plugins.kernels.blocks import TARGETS, BlockConfig, choose
from astro_trt.plugins.operators import ACTIVATION, CANDIDATE, INDEX, MSA, Operator

triton = lazy_import("triton")
triton_backends = lazy_import("triton.backends.compiler")  # GPUTarget
triton_compiler = lazy_import("triton.compiler")  # ASTSource

OPERATORS = {"msa": MSA, "candidate": CANDIDATE}
KERNELS = {"msa": ("multi_scale_self_attention", "msa_fwd_kernel"),
           "candidate": ("candidate_attention", "candidate_fwd_kernel")}
# Triton's pointer element types by the precision names of astro_trt/contract.py.
TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
NUM_THR = 31  # time thresholds of every preset (32 time buckets)
# Candidate counts whose block_m covers every choice (block_m is min(64, next power of 2 >= M, >= 16)).
CANDIDATE_PROBES = (1, 32, 64, 1024)


@dataclass(frozen=True)
class Job:
    """One kernel binary: operator, precision, target and block configuration."""

    op: str
    dtype: str
    target: str
    config: BlockConfig

    def key(self) -> tuple:
        return (self.op, self.dtype, self.target, self.config)


@dataclass
class Resources:
    job: Job
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None  # bytes of dynamic shared memory Triton launches the kernel with
    cubin_bytes: int | None = None
    seconds: float = 0.0
    shapes: list[str] = field(default_factory=list)  # preset shapes that choose this binary
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.shared is not None and self.shared <= TARGETS[self.job.target].max_shared

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


Jobs = dict[tuple, tuple[Job, list[str]]]  # job key -> (job, the preset shapes that choose it)


def launcher_jobs(presets: Iterable[str], dtypes: Iterable[str], targets: Iterable[str]) -> Jobs:
    """Every binary the launcher can choose for the presets' shapes -> (job, the shapes choosing it)."""
    jobs: Jobs = {}
    for name in presets:
        cfg = preset(name)
        shapes = [("msa", cfg.max_len, f"{name} L={cfg.max_len}")]
        shapes += [("candidate", m, f"{name} M={m}") for m in CANDIDATE_PROBES]
        for dtype in dtypes:
            for target in targets:
                for op, rows, label in shapes:
                    job = Job(op, dtype, target, choose(rows, cfg.max_len, cfg.head_dim, ELEMENT_BYTES[dtype], target))
                    jobs.setdefault(job.key(), (job, []))[1].append(label)
    return jobs


def _signature(kernel, op: Operator, dtype: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the launcher's contiguous tensors specialise the kernel:
    pointers 16-byte aligned, every tensor's innermost stride 1 (Triton specialises an int 1)."""
    kinds = [TRITON_TYPES[dtype]] * (len(op.with_role(ACTIVATION)) + 1)  # the activations, then the output
    kinds += ["i64" if i.role == INDEX else "fp32" for i in op.inputs if i.role != ACTIVATION]
    names = list(kernel.arg_names)
    pointers = [n for n in names if n.endswith("_ptr")]
    if len(pointers) != len(kinds):
        raise BackendError(f"{kernel.__name__} takes {len(pointers)} pointers, the operator record {len(kinds)}")
    strides = [n for n in names if n.startswith("stride_")]
    innermost = {s for i, s in enumerate(strides) if i + 1 == len(strides) or strides[i + 1][7:-1] != s[7:-1]}
    signature = {n: "i32" for n in names}
    signature.update({p: f"*{k}" for p, k in zip(pointers, kinds, strict=True)})
    constexprs: dict = {s: 1 for s in innermost}
    signature.update({s: "constexpr" for s in innermost})
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in pointers}
    return signature, constexprs, attrs


def _ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


PTXAS_FIELDS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


def parse_ptxas(text: str) -> dict[str, int]:
    """ptxas -v's report of one entry function -> registers, stack and spill bytes."""
    out = {}
    for key, pattern in PTXAS_FIELDS.items():
        found = re.search(pattern, text)
        if found is None:
            raise BackendError(f"ptxas -v printed no '{key}' figure: {text.strip()[:200]}")
        out[key] = int(found.group(1))
    return out


def compile_job(job: Job) -> Resources:
    """Compile one binary here (Triton must not be in interpreter mode) and measure it with ptxas."""
    module_name, kernel_name = KERNELS[job.op]
    kernel = getattr(importlib.import_module(f"astro_trt.plugins.kernels.{module_name}"), kernel_name)
    signature, constexprs, attrs = _signature(kernel, OPERATORS[job.op], job.dtype)
    cfg = job.config
    constexprs.update(NUM_THR=NUM_THR, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                      UPCAST=job.dtype == "fp32")
    signature.update({n: "constexpr" for n in ("NUM_THR", "BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST")})
    start = time.perf_counter()
    res = Resources(job)
    try:
        compiled = triton.compile(triton_compiler.ASTSource(kernel, signature, constexprs, attrs),
                                  target=triton_backends.GPUTarget("cuda", TARGETS[job.target].cc, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm["ptx"]
        arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(ptx)
            proc = subprocess.run([str(_ptxas()), "-v", "--gpu-name", arch, "k.ptx", "-o", "k.cubin"],
                                  cwd=tmp, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise BackendError(f"ptxas failed: {(proc.stderr or proc.stdout).strip()[:300]}")
        for key, value in parse_ptxas(proc.stdout + proc.stderr).items():
            setattr(res, key, value)
        res.shared = int(compiled.metadata.shared)
        res.cubin_bytes = len(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - one binary's failure is a row of the table, not the end
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    res.seconds = time.perf_counter() - start
    return res


def _job_json(job: Job) -> dict:
    return {"op": job.op, "dtype": job.dtype, "target": job.target, "config": asdict(job.config)}


def _job_from_json(d: dict) -> Job:
    return Job(d["op"], d["dtype"], d["target"], BlockConfig(**d["config"]))


def resources_json(res: Resources) -> dict:
    out = asdict(res)
    out["job"] = _job_json(res.job)
    out.update(fits=res.fits, spills=res.spills)
    return out


def compile_jobs(jobs: Jobs, timeout: float = 1800.0) -> list[Resources]:
    """Compile every job in one fresh interpreter (TRITON_INTERPRET removed from its environment)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set so it does not warn
    payload = json.dumps([_job_json(job) for job, _ in jobs.values()])
    try:
        proc = subprocess.run([sys.executable, "-m", "astro_trt.plugins.kernels.aot"], input=payload, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BackendError(f"compiling {len(jobs)} kernels took over {timeout:.0f} s; compile fewer targets") from None
    if proc.returncode != 0:
        raise BackendError(f"the kernel compiler process failed: {proc.stderr.strip().splitlines()[-1:]}")
    results = []
    for (job, shapes), row in zip(jobs.values(), json.loads(proc.stdout), strict=True):
        res = Resources(job, **{k: v for k, v in row.items() if k not in ("job", "fits", "spills", "shapes")})
        res.shapes = shapes
        results.append(res)
    return results


def format_resources(results: list[Resources]) -> str:
    header = ("kernel", "dtype", "target", "config", "regs", "spill st/ld", "stack", "smem B", "limit B", "fits",
              "chosen for")
    rows = [header]
    for r in results:
        j = r.job
        if r.error:
            rows.append((j.op, j.dtype, j.target, j.config.label(), "-", "-", "-", "-",
                         str(TARGETS[j.target].max_shared), "no", f"ERROR {r.error}"))
            continue
        rows.append((j.op, j.dtype, j.target, j.config.label(), str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
                     str(r.stack), str(r.shared), str(TARGETS[j.target].max_shared), "yes" if r.fits else "NO",
                     ", ".join(r.shapes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _main() -> None:
    """Child process: job list (JSON) on stdin -> one resources record per job (JSON) on stdout."""
    rows = [resources_json(compile_job(_job_from_json(d))) for d in json.load(sys.stdin)]
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main()

__all__ = ["CANDIDATE_PROBES", "Job", "Resources", "compile_job", "compile_jobs", "format_resources",
           "launcher_jobs", "parse_ptxas", "resources_json"]
