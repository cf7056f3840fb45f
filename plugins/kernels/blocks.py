"""Which block configuration the attention kernels launch with: a function of the shape and of the
GPU target, so that a configuration a target cannot hold is never chosen.

The limits are the CUDA C++ Programming Guide's "Technical Specifications per Compute Capability"
(maximum shared memory per thread block, opt-in; 255 registers per thread). The shared-memory
figure of a configuration is an upper bound written from what Triton stages in shared memory
(pipelined K/V tiles, the operand of the second dot, layout conversions); the tests compile every
configuration the launcher chooses for the presets' shapes for every target
(plugins/kernels/aot.py) and check that the compiler's own figure stays under this bound and the
bound under the target's limit, and that ptxas reports no spills. Nothing here imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from astro_trt.errors import DataError


@dataclass(frozen=True)
class Target:
    """One GPU architecture the kernels are compiled for."""

    cc: int  # compute capability as Triton's GPUTarget takes it: 90 for sm_90
    max_shared: int  # bytes of shared memory one block may use (opt-in maximum)
    example: str  # a GPU of this architecture, for the tables

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target(80, 163 * 1024, "A100"),
    Target(86, 99 * 1024, "RTX 3090 / A10"),
    Target(89, 99 * 1024, "RTX 4090 / L4 / L40S"),
    Target(90, 227 * 1024, "H100 / H200"),
    Target(100, 227 * 1024, "B200"),
)}
# The targets CI compiles for (sm_100 takes ~8x longer per kernel; bench-kernels --compile-only has it).
CI_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")
# Under TRITON_INTERPRET=1 (no GPU) the launcher chooses as for the smallest shared memory of all.
INTERPRETER_TARGET = "sm_86"
MAX_REGISTERS = 255


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per loop step
    block_d: int  # head lanes (dh padded to a power of two >= 16)
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return f"m{self.block_m} n{self.block_n} d{self.block_d} w{self.num_warps} s{self.num_stages}"


# Preference order, largest query tile first (each K/V tile shared by the most queries). Keys go 32
# at a time: with 64 (and 4 warps) both kernels ran out of registers and spilled on every target
# (ptxas: 255 registers, up to 900 bytes of spills), the [BLOCK_M, BLOCK_N] int64 time-bucket
# compares being the bulk; 64 x 32 with 8 warps compiled without spills (docs/kernels.md).
PREFERRED = ((64, 32), (32, 32), (16, 16))
WIDE_TILE = 64 * 32  # tiles this large get 8 warps, smaller ones 4 ...
# ... except in float32, whose 32 x 32 and 16 x 32 candidate tiles spilled 8-12 bytes with 4 warps.
WIDE_ELEMENT = 4


def warps(block_m: int, block_n: int, element_bytes: int) -> int:
    return 8 if block_m * block_n >= WIDE_TILE or element_bytes >= WIDE_ELEMENT else 4


def next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def head_block(head_dim: int) -> int:
    # tl.dot needs every tile dimension >= 16; narrower heads are zero-padded in registers.
    return max(16, next_power_of_2(head_dim))


def shared_bound(cfg: BlockConfig, element_bytes: int) -> int:
    """Bytes of shared memory a configuration may need at most: K and V tiles for every pipeline
    stage (the loads Triton software-pipelines), Q and P as dot operands in fp32 (a float32 kernel
    converts them), one [BLOCK_M, BLOCK_N] fp32 layout conversion of the scores, and 2 KiB of
    barriers and reduction scratch."""
    kv = 2 * cfg.num_stages * cfg.block_n * cfg.block_d * element_bytes
    operands = 4 * (cfg.block_m * cfg.block_d + cfg.block_m * cfg.block_n)
    return kv + operands + 4 * cfg.block_m * cfg.block_n + 2048


def choose(rows: int, cols: int, head_dim: int, element_bytes: int, target: str) -> BlockConfig:
    """The configuration for ``rows`` queries over ``cols`` keys on ``target``: the first preferred
    tile pair that fits the target, each side clamped to the shape (no tile wider than needed)."""
    if target not in TARGETS:
        raise DataError(f"GPU target {target!r} is unknown; choose one of {list(TARGETS)}")
    limit = TARGETS[target].max_shared
    for block_m, block_n in PREFERRED:
        block_m = min(block_m, max(16, next_power_of_2(rows)))
        block_n = min(block_n, max(16, next_power_of_2(max(cols, 1))))
        cfg = BlockConfig(block_m, block_n, head_block(head_dim), num_warps=warps(block_m, block_n, element_bytes))
        if shared_bound(cfg, element_bytes) <= limit:
            return cfg
    raise DataError(f"no block configuration of the attention kernels fits {target} for head dim {head_dim} "
                    f"({shared_bound(cfg, element_bytes)} bytes of shared memory > {limit}); use a smaller head dim")


def target_of(capability: tuple[int, int]) -> str:
    """The target whose limits a device of ``capability`` is held to: its own, that of its family
    (sm_87 -> sm_86), else the smallest shared memory of all (a GPU newer than this table, such as
    sm_120 with 99 KiB, must not be given sm_100's 227 KiB)."""
    cc = capability[0] * 10 + capability[1]
    family = [t for t in TARGETS.values() if t.cc <= cc and t.cc // 10 == cc // 10]
    if family:
        return max(family, key=lambda t: t.cc).name
    return min(TARGETS.values(), key=lambda t: (t.max_shared, t.cc)).name
