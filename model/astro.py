"""ASTRO (docs/model.md §2-§6) as a PyTorch module with three entry points sharing all weights:

    full(history, cand_items)             one sequence [history ; candidate] per pair (baseline)
    encode_user(history)      -> kv_cache the user encoder of the split
    score(kv_cache, history, cand_items)  the item scorer of the split

Each block has its own parameters; they are stored stacked along a leading block axis
(``w_q[Nb, d, d]``) so that all blocks run as one batched matmul, which is also what the
ONNX graphs and the attention operators ([B, Nb, H, S, dh]) expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from astro_trt.config import ASTROConfig
from astro_trt.errors import ConfigError
from astro_trt.model.item_table import table_shape
from astro_trt.plugins.buckets import bucket_thresholds, distance_table
from astro_trt.plugins.operators import Ops


class AttentionOps(Protocol):
    """The two operators the model delegates to: the reference, a kernel, or export custom ops."""

    def multi_scale_self_attention(self, *args: torch.Tensor) -> torch.Tensor: ...

    def candidate_attention(self, *args: torch.Tensor) -> torch.Tensor: ...


class ReferenceOps(Ops):
    """The PyTorch reference (plugins/operators.py dispatches on Impl.REFERENCE)."""


class ItemRows(Protocol):
    """An item embedding table outside the model (model/item_table.py ItemTable): [rows, dim]."""

    rows: int
    dim: int

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor: ...


class _Shared:
    """Holds an external table so that copying the model (a cast copy for half precision, the
    oracle's float copy) shares it: a mapped table of 10^7 rows is never duplicated."""

    def __init__(self, table: ItemRows) -> None:
        self.table = table

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


@dataclass
class History:
    """One request's user side (docs/model.md §1). Shapes: items/behaviors/times [B, Nb, L],
    lengths [B, Nb], scenario [B], request_time [B]; all int64."""

    items: torch.Tensor
    behaviors: torch.Tensor
    times: torch.Tensor
    lengths: torch.Tensor
    scenario: torch.Tensor
    request_time: torch.Tensor

    def repeat_per_candidate(self, m: int) -> History:
        return History(*(t.repeat_interleave(m, dim=0) for t in self.astuple()))

    def rows(self, start: int, stop: int) -> History:
        """Users start..stop-1 of the batch."""
        return History(*(t[start:stop] for t in self.astuple()))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.items, self.behaviors, self.times, self.lengths, self.scenario, self.request_time)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _temperature_init(shape: tuple[int, ...], head_dim: int) -> torch.Tensor:
    # docs/model.md §3: theta is initialised so that tau = softplus(theta) + 0.01 = sqrt(dh).
    return torch.full(shape, _inverse_softplus(math.sqrt(head_dim) - 0.01))


class BlockLayer(nn.Module):
    """One Adaptive Transformer Layer for all Nb blocks at once (parameters stacked by block)."""

    def __init__(self, cfg: ASTROConfig, blocks: int) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_dim
        self.heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.layer_norm_eps
        self.width = d  # a Python int: layer_norm's normalized_shape must stay static when traced

        def weight(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))

        self.w_q = weight(blocks, d, d, fan_in=d)
        self.w_k = weight(blocks, d, d, fan_in=d)
        self.w_v = weight(blocks, d, d, fan_in=d)
        self.w_1 = weight(blocks, d, f, fan_in=d)
        self.b_1 = nn.Parameter(torch.zeros(blocks, f))
        self.w_2 = weight(blocks, f, d, fan_in=f)
        self.b_2 = nn.Parameter(torch.zeros(blocks, d))
        self.ln_w = nn.Parameter(torch.ones(blocks, d))
        self.ln_b = nn.Parameter(torch.zeros(blocks, d))
        self.theta = nn.Parameter(_temperature_init((blocks, cfg.num_scenarios, cfg.num_heads), cfg.head_dim))
        self.dropout = nn.Dropout(cfg.dropout)

    def inv_tau(self, scenario: torch.Tensor) -> torch.Tensor:
        """[B] scenario ids -> [B, Nb, H] inverse temperatures."""
        tau = F.softplus(self.theta) + 0.01  # [Nb, R, H]
        return (1.0 / tau)[:, scenario].transpose(0, 1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, s, _ = x.shape
        return x.reshape(b, n, s, self.heads, self.head_dim).transpose(2, 3)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, Nb, S, d] -> q, k, v [B, Nb, H, S, dh]."""
        # Broadcast matmul ([B, Nb, S, d] @ [Nb, d, e]), not einsum: ONNX Einsum has no bfloat16.
        return tuple(self._split_heads(x @ w) for w in (self.w_q, self.w_k, self.w_v))

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Eq. 3: LayerNorm(X + W2 GELU(W1 U + b1) + b2), with U = heads merged."""
        b, n, h, s, dh = attended.shape
        u = attended.transpose(2, 3).reshape(b, n, s, h * dh)
        hidden = F.gelu(u @ self.w_1 + self.b_1[:, None, :])
        y = hidden @ self.w_2 + self.b_2[:, None, :]
        y = F.layer_norm(x + self.dropout(y), (self.width,), eps=self.eps)
        return y * self.ln_w[:, None, :] + self.ln_b[:, None, :]


class GatedFusion(nn.Module):
    """Bit-wise gating fusion and the multi-task head (docs/model.md §5)."""

    def __init__(self, cfg: ASTROConfig) -> None:
        super().__init__()
        self.layer = BlockLayer(cfg, blocks=1)
        width = cfg.num_blocks * cfg.d_model
        self.se_a = nn.Linear(width, cfg.fuse_hidden)
        self.se_b = nn.Linear(cfg.fuse_hidden, width)
        self.head_1 = nn.Linear(width, cfg.d_model)
        self.head_2 = nn.Linear(cfg.d_model, cfg.num_tasks)

    def forward(self, e: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """e [B, M, Nb, d] (candidate outputs of each block), scenario [B] -> logits [B, M, T]."""
        b, m, nb, d = e.shape
        x = e.reshape(1, b * m, nb, d).transpose(0, 1)  # [B*M, 1, Nb, d]: one "block" of Nb tokens
        q, k, v = self.layer.project(x)
        inv_tau = self.layer.inv_tau(scenario).repeat_interleave(m, dim=0)  # [B*M, 1, H]
        scores = q @ k.transpose(-1, -2) * inv_tau[..., None, None]
        g = self.layer.finish(x, torch.softmax(scores, dim=-1) @ v)  # all Nb tokens see each other
        g = g.reshape(b, m, nb * d)
        y = g * torch.sigmoid(self.se_b(F.relu(self.se_a(g))))
        return self.head_2(F.gelu(self.head_1(y)))


class ASTRO(nn.Module):
    """``item_table``: the item embedding table kept outside the module (a mapped file of a
    checkpoint or bundle, only looked-up rows touched); without it the module owns a trainable
    ``item_embedding``. Either way ``item_rows`` is the lookup, and every entry point takes item
    ids or, where a graph is traced, their rows (floating tensors): the graphs hold no table."""

    def __init__(self, cfg: ASTROConfig, ops: AttentionOps | None = None, *,
                 item_table: ItemRows | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops: AttentionOps = ops or ReferenceOps()
        d = cfg.d_model
        self.item_embedding: nn.Embedding | None = None
        self._item_table: _Shared | None = None
        if item_table is None:
            self.item_embedding = nn.Embedding(*table_shape(cfg), padding_idx=0)
            nn.init.normal_(self.item_embedding.weight, std=0.02)
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        else:
            if (int(item_table.rows), int(item_table.dim)) != table_shape(cfg):
                raise ConfigError(f"item table of shape [{item_table.rows}, {item_table.dim}] does not fit config "
                                  f"'{cfg.name}' (num_items={cfg.num_items} + the padding row, d_model={d}); pass the "
                                  "table exported with this model")
            self._item_table = _Shared(item_table)
        self.behavior_embedding = nn.Embedding(cfg.num_behaviors + 1, d, padding_idx=0)
        nn.init.normal_(self.behavior_embedding.weight, std=0.02)
        with torch.no_grad():
            self.behavior_embedding.weight[0].zero_()
        self.pos_table = nn.Parameter(torch.zeros(cfg.num_blocks, cfg.num_heads, cfg.num_pos_buckets))
        self.time_table = nn.Parameter(torch.zeros(cfg.num_blocks, cfg.num_heads, cfg.num_time_buckets))
        self.layers = nn.ModuleList(BlockLayer(cfg, cfg.num_blocks) for _ in range(cfg.num_layers))
        self.fusion = GatedFusion(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.register_buffer(
            "time_thresholds",
            torch.tensor(bucket_thresholds(cfg.num_time_buckets, cfg.time_bucket_max), dtype=torch.int64),
            persistent=False,
        )

    # ------------------------------------------------------------------ shared pieces
    def pos_bias(self) -> torch.Tensor:
        """[Nb, H, L + 1] position bias by distance 0..L."""
        return distance_table(self.pos_table, self.cfg.max_len, self.cfg.num_pos_buckets)

    @property
    def item_table(self) -> ItemRows | None:
        """The external item table, or None when the module owns ``item_embedding``."""
        return None if self._item_table is None else self._item_table.table

    def item_rows(self, items: torch.Tensor) -> torch.Tensor:
        """Item ids [...] -> their embedding rows [..., d] in the model's dtype. Rows already looked
        up (a floating tensor, what the traced graphs take) pass through, cast."""
        dtype = self.behavior_embedding.weight.dtype
        if items.is_floating_point():
            return items.to(dtype)
        if self.item_embedding is not None:
            return self.item_embedding(items)
        return self.item_table.lookup_torch(items).to(device=items.device, dtype=dtype)

    def embed_history(self, h: History) -> torch.Tensor:
        x = self.item_rows(h.items) + self.behavior_embedding(h.behaviors)
        return self.embed_dropout(x)  # [B, Nb, L, d]

    def embed_candidates(self, cand_items: torch.Tensor) -> torch.Tensor:
        """cand_items [B, M] (or their rows [B, M, d]) -> [B, Nb, M, d] (the same token enters every block)."""
        x = self.item_rows(cand_items) + self.behavior_embedding.weight[self.cfg.target_behavior]
        x = self.embed_dropout(x)
        return x.unsqueeze(1).expand(-1, self.cfg.num_blocks, -1, -1)

    def _attend_history(self, layer: BlockLayer, x: torch.Tensor, q, k, v, lengths, times, inv_tau) -> torch.Tensor:
        out = self.ops.multi_scale_self_attention(
            q, k, v, lengths, times, self.pos_bias(), self.time_table, self.time_thresholds, inv_tau
        )
        return layer.finish(x, out)

    # ------------------------------------------------------------------ entry points
    def encode_user(self, h: History) -> torch.Tensor:
        """History -> kv_cache [B, N_L, Nb, 2, H, L, dh] (K and V of every layer's history input).

        The last layer's history attention and FFN are skipped: nothing downstream reads the
        history's final hidden states, only its per-layer K/V.
        """
        x = self.embed_history(h)
        cache = []
        for index, layer in enumerate(self.layers):
            q, k, v = layer.project(x)
            cache.append(torch.stack([k, v], dim=2))  # [B, Nb, 2, H, L, dh]
            if index + 1 < len(self.layers):
                x = self._attend_history(layer, x, q, k, v, h.lengths, h.times, layer.inv_tau(h.scenario))
        return torch.stack(cache, dim=1)

    def score(self, kv_cache: torch.Tensor, h: History, cand_items: torch.Tensor) -> torch.Tensor:
        """kv_cache from encode_user, the same history's lengths/times/scenario/request_time,
        cand_items [B, M] -> logits [B, M, T]. Only lengths, times, scenario and request_time of
        ``h`` are read."""
        x = self.embed_candidates(cand_items)  # [B, Nb, M, d]
        for index, layer in enumerate(self.layers):
            q, k, v = layer.project(x)
            out = self.ops.candidate_attention(
                q, k, v, kv_cache[:, index, :, 0], kv_cache[:, index, :, 1], h.lengths, h.times,
                h.request_time, self.pos_bias(), self.time_table, self.time_thresholds,
                layer.inv_tau(h.scenario),
            )
            x = layer.finish(x, out)
        return self.fusion(x.transpose(1, 2), h.scenario)

    def full(self, h: History, cand_items: torch.Tensor) -> torch.Tensor:
        """The baseline: per (user, candidate) pair one sequence [history_k ; candidate] of
        length L + 1 per block, everything recomputed per pair. -> logits [B, M, T]."""
        b, m = cand_items.shape[:2]
        pairs = h.repeat_per_candidate(m)
        hist = self.embed_history(pairs)  # [B*M, Nb, L, d]
        cand = self.embed_candidates(cand_items.reshape(b * m, 1, *cand_items.shape[2:]))  # [B*M, Nb, 1, d]
        x = torch.cat([hist, cand], dim=2)
        times = torch.cat([pairs.times, pairs.request_time[:, None, None].expand(-1, self.cfg.num_blocks, 1)], dim=2)
        lengths = pairs.lengths + 1  # the candidate is the last, always valid, slot
        for layer in self.layers:
            q, k, v = layer.project(x)
            x = self._attend_history(layer, x, q, k, v, lengths, times, layer.inv_tau(pairs.scenario))
        e = x[:, :, -1, :].reshape(b, m, self.cfg.num_blocks, self.cfg.d_model)
        return self.fusion(e, h.scenario)

    def forward(self, h: History, cand_items: torch.Tensor) -> torch.Tensor:
        """Training and evaluation use the split: it is exact and M times cheaper."""
        return self.score(self.encode_user(h), h, cand_items)
