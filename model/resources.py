"""What a model config and a request shape may ask of this machine, checked before the work.

A config can pass every per-field bound and still ask for more memory than any machine has: the
attention of one sequence of S tokens materialises S x S scores, biases and time buckets per
block and head, so ``max_len`` 2000 asks ~37 GB for the exporter's 2-user check, and the naive
path of ``bench --candidates 5000`` runs 5000 such sequences at once. The estimate below is an
figure fitted to the reference model (growth of peak RSS over ``full`` on 2 users x 5 candidates
and ``encode_user`` on 2 users, ml100k preset: 412 and 1487 MB measured against 378 and 1505 MB
estimated at L = 200 and 400; 82 and 298 MB against 75 and 300 MB for the encoder); commands
compare it with the machine's memory and refuse, naming the figure and what to lower, instead of
dying in the allocator. The item table counts only where a process holds it: training (with
Adam's copies); everything else maps it and reads the rows it looks up (EXPORT_STREAM_BYTES).
"""

from __future__ import annotations

import os
from pathlib import Path

from astro_trt.config import ASTROConfig
from astro_trt.errors import ConfigError, DataError
from astro_trt.lazy import lazy_import
from astro_trt.model.item_table import CHUNK_BYTES

# The memory estimates are read by light modules (the serving bounds): the model itself loads
# only when its weights are counted.
torch = lazy_import("torch")
astro = lazy_import("astro_trt.model.astro")

# Share of the machine's memory one command may plan to use: the rest is the interpreter,
# torch, ONNX Runtime and whatever else runs there.
MEMORY_SHARE = 0.75
# Adam keeps the weights, their gradients and two moments.
_TRAINING_COPIES = 4


def machine_memory() -> int:
    """Bytes of memory this process can use: physical memory, or a smaller cgroup (container) limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def parameter_count(cfg: ASTROConfig) -> int:
    """Exact number of weights of ASTRO(cfg), from a model on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = astro.ASTRO(cfg)
    return sum(p.numel() for p in model.state_dict().values())


def parameter_lower_bound(cfg: ASTROConfig) -> int:
    """The bulk of ASTRO(cfg)'s weights, by arithmetic: embeddings and every layer's projections
    and FFN. No model is built, so a config of 256 huge layers is judged in microseconds."""
    d, f = cfg.d_model, cfg.ffn_dim
    return (cfg.num_items + cfg.num_behaviors + 2) * d + cfg.num_layers * cfg.num_blocks * (3 * d * d + 2 * d * f)


def attention_bytes(cfg: ASTROConfig, sequences: int, length: int) -> int:
    """Peak bytes of one attention over ``sequences`` sequences of ``length`` tokens: per block
    and token pair the time-bucket comparison (one byte per bucket), the int64 distances and
    buckets, and about 16 float32 tensors per head (scores, biases, mask, softmax and copies)."""
    return sequences * cfg.num_blocks * length * length * _pair_bytes(cfg)


# The item table is not held by any process but training: a loaded checkpoint or bundle maps it
# (model/item_table.py) and reads only the rows a request looks up, which are part of the request's
# activations (B x (Nb x L + M) rows of d floats, small beside its attention). The export streams it
# through bounded buffers: one float32 chunk (item_table.CHUNK_BYTES) and the encodings of it the
# writer and numpy make (a few chunk-sized temporaries), and the checkpoint reader's blocks: streaming
# a 10M-item climber table into fp32, fp16 and int8 files raised peak RSS 227 MiB (3.5 chunks) over
# the imports (2026-12-03, /usr/bin/time -v, 2-core CPU machine); 6 chunks is the upper side. Until
# 2026-12-03 the export held ~10 bytes per byte of the table (it was baked into every graph:
# 1.01 GiB peak RSS at 100k climber items, 2.44 GiB at 400k, std::bad_alloc at 10M).
EXPORT_STREAM_BYTES = 6 * CHUNK_BYTES


def item_table_bytes(cfg: ASTROConfig) -> int:
    """fp32 bytes of the item embedding table (row 0 is padding)."""
    return 4 * item_table_elements(cfg)


def item_table_elements(cfg: ASTROConfig) -> int:
    return (cfg.num_items + 1) * cfg.d_model


def _pair_bytes(cfg: ASTROConfig) -> int:
    """Bytes per (query, key) pair of one block (see attention_bytes)."""
    return cfg.num_time_buckets + 24 + 64 * cfg.num_heads


def estimate_bytes(cfg: ASTROConfig, *, users: int, candidates: int, full: bool = True,
                   training: bool = False, streaming: bool = False) -> int:
    """Upper-side peak memory of running ``users`` x ``candidates`` through the model: the dense
    weights (the item table is mapped: only looked-up rows are read), or every weight with Adam's
    copies when training (the table trains with the rest), plus the largest attention. ``full``
    includes the naive path (one sequence of L + 1 per user and candidate); training keeps every
    layer's activations; ``streaming`` adds the export's bounded table-streaming buffers."""
    return _estimate(cfg, parameter_count(cfg), users=users, candidates=candidates, full=full, training=training,
                     streaming=streaming)


def _estimate(cfg: ASTROConfig, parameters: int, *, users: int, candidates: int, full: bool, training: bool,
              streaming: bool = False) -> int:
    if training:
        weights = 4 * parameters * _TRAINING_COPIES
    else:
        weights = 4 * (parameters - item_table_elements(cfg)) + (EXPORT_STREAM_BYTES if streaming else 0)
    layers = cfg.num_layers if training else 1
    encoder = attention_bytes(cfg, users, cfg.max_len) * layers
    scorer = users * candidates * cfg.num_blocks * (cfg.max_len + 1) * _pair_bytes(cfg)
    naive = attention_bytes(cfg, users * candidates, cfg.max_len + 1) * layers if full else 0
    return weights + max(encoder, scorer * layers, naive)


def check_fits(cfg: ASTROConfig, *, users: int, candidates: int, purpose: str, full: bool = True,
               training: bool = False, error: type[ConfigError] | type[DataError] = ConfigError,
               streaming: bool = False) -> None:
    """Refuse (one line, before any work) a config and request shape whose estimated memory exceeds
    MEMORY_SHARE of this machine's memory."""
    have = int(machine_memory() * MEMORY_SHARE)
    # The arithmetic lower bound first: a config far too big is refused without building its model.
    need = _estimate(cfg, parameter_lower_bound(cfg), users=users, candidates=candidates, full=full, training=training,
                     streaming=streaming)
    if need <= have:
        need = estimate_bytes(cfg, users=users, candidates=candidates, full=full, training=training,
                              streaming=streaming)
    if need > have:
        raise error(
            f"config '{cfg.name}': {purpose} ({users} user(s) x {candidates} candidate(s), max_len={cfg.max_len}, "
            f"num_layers={cfg.num_layers}, d_model={cfg.d_model}, num_items={cfg.num_items}) needs about "
            f"{_gb(need)} of memory but this "
            f"machine allows {_gb(have)} ({MEMORY_SHARE:.0%} of {_gb(machine_memory())}); lower max_len, the "
            "model's sizes or the request shape"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


__all__ = [
    "EXPORT_STREAM_BYTES", "MEMORY_SHARE", "attention_bytes", "check_fits", "estimate_bytes", "item_table_bytes",
    "item_table_elements", "machine_memory", "parameter_count", "parameter_lower_bound",
]
