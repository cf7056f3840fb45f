"""The one runner interface, in the shape of Polygraphy's runners: the public calls ``encode``,
``score`` and ``full`` check a request once with the input gate (runtime/gate.py) and hand the
checked arrays to the back end, which only executes (``_put``: host arrays into its own form,
once; ``_run``: one graph of contract.GRAPH_SPECS on those). Everything below the public call is
free of checks, so a request is gated exactly once whichever back end runs it.

- ``encode(history) -> Encoded``: the KV cache in the back end's own form (a device tensor for
  TensorRT) together with the history it was made from, already in that form, so a ``score`` of
  the same history moves nothing to the device again;
- ``score(state, history, cand_items) -> logits`` [B, M, T] float32 numpy; ``state`` may be any
  runner's ``Encoded`` or a bare cache (numpy or torch), which then passes the cache gate;
- ``full(history, cand_items) -> logits``, the baseline graph.

A caller that gated a request itself (a served model, which also caches users) passes the checked
arrays through ``put`` once and runs ``encode_checked``/``score_checked`` on them.

Item ids never reach a graph (contract.ITEM_ROWS): ``put`` looks the gated ids up in the runner's
item table (model/item_table.py, a mapped file of which only the requested rows are read) and
hands the graphs the rows; the TensorRT back end gathers them on the device instead, from its
device-resident copy, so the lookup joins the request's one host-to-device crossing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import (
    CAND_ITEMS,
    FULL_MODEL,
    GRAPH_SPECS,
    ITEM_ROWS,
    ITEM_SCORER,
    KV_CACHE,
    USER_ENCODER,
    graph_io,
)
from astro_trt.errors import DataError
from astro_trt.model.item_table import ItemTable, table_shape
from astro_trt.runtime import gate
from astro_trt.runtime.gate import Ranges


@dataclass
class Encoded:
    """One encoded batch of users, in the form of the runner that encoded it."""

    kv_cache: Any  # [B, N_L, Nb, 2, H, L, dh]: numpy (ORT), torch (PyTorch), a CUDA tensor (TensorRT)
    feeds: dict[str, Any]  # the gated history in the runner's form (TensorRT: on the device)
    host: dict[str, np.ndarray]  # the same history as the gate returned it
    runner: Any = field(repr=False)  # the runner that made it: only that one binds it without the cache gate

    @property
    def batch(self) -> int:
        return int(self.kv_cache.shape[0])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(state)``: the cache on the host (bfloat16 as float32, which numpy lacks)."""
        kv = self.kv_cache
        if hasattr(kv, "detach"):
            kv = kv.detach().cpu()
            kv = (kv.float() if str(kv.dtype) == "torch.bfloat16" else kv).numpy()
        return np.asarray(kv, dtype=dtype)


def to_float32(array: Any) -> np.ndarray:
    """A runtime's output (float16/float32/bfloat16, numpy or torch, host or device, or an Encoded
    state's cache) as C-contiguous float32 numpy: what every comparison reads."""
    array = getattr(array, "kv_cache", array)
    if hasattr(array, "detach"):  # torch.Tensor: numpy() cannot take bfloat16
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


def with_item_rows(table: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gated host arrays plus the float32 rows of their item ids (contract.ITEM_ROWS) from ``table``
    (an ItemTable: only the requested rows of a mapped file are read). The ids stay in the result."""
    out = dict(arrays)
    for ids, rows in ITEM_ROWS.items():
        if ids in out:
            out[rows] = table.lookup(out[ids])
    return out


def scored(logits: Any) -> np.ndarray:
    """Scorer logits as float32, refused when not finite: a finite but absurd kv_cache (one no
    encoder produced, e.g. 3e38 everywhere) passes the input gate and turns into NaN here."""
    out = to_float32(logits)
    if not np.isfinite(out).all():
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        raise DataError(f"logits: non-finite value at {list(at)} from this kv_cache; pass the cache the user "
                        "encoder returned for this history (re-encode the user)")
    return out


class Runner:
    """A back end over the graphs of one precision. Subclasses set ``runtime`` and implement
    ``_put`` and ``_run`` (and, for a per-user cache, ``split``/``stack``/``nbytes`` where the
    numpy defaults do not fit); they never call the gate."""

    runtime: str = ""  # torch | ort | trt

    def __init__(self, cfg: ASTROConfig, precision: str, profiles: Mapping[str, Ranges] | None = None, *,
                 item_table: Any = None) -> None:
        is_table = isinstance(item_table, ItemTable)
        if not is_table or (item_table.rows, item_table.dim) != table_shape(cfg):
            got = f"a table of [{item_table.rows}, {item_table.dim}]" if is_table else type(item_table).__name__
            raise DataError(f"{type(self).__name__} item_table: expected the model's item table ([num_items + 1, "
                            f"d_model] = {list(table_shape(cfg))}), got {got}; pass bundle.item_table() or the "
                            "checkpoint model's table")
        self.item_table = item_table
        self.cfg = cfg
        self.precision = precision
        self.name = f"{self.runtime}-{precision}"
        self.io = graph_io(cfg, precision)
        self.profiles = dict(profiles or {})  # graph -> {axis: (min, opt, max)}; none: any B and M

    # -- the public calls: each gates its request once --------------------------------------------
    def encode(self, history: Any) -> Encoded:
        host = gate.gate(self.cfg, history, profile=self.profiles.get(USER_ENCODER))
        feeds = self.put(host)
        return Encoded(self._run(USER_ENCODER, feeds), feeds, host, self)

    def score(self, state: Any, history: Any, cand_items: Any) -> np.ndarray:
        host = gate.gate(self.cfg, history, cand_items, self.profiles.get(ITEM_SCORER))
        if self._own(state, host):
            feeds, kv = {**state.feeds, **self.put({CAND_ITEMS: host[CAND_ITEMS]})}, state.kv_cache
        else:
            kv = self._put_kv(gate.validate_kv_cache(self.cfg, getattr(state, "kv_cache", state), self.precision,
                                                     host["hist_items"].shape[0], host=self.host_kv))
            feeds = self.put(host)
        return scored(self._run(ITEM_SCORER, {**feeds, KV_CACHE: kv}))

    def full(self, history: Any, cand_items: Any) -> np.ndarray:
        host = gate.gate(self.cfg, history, cand_items, self.profiles.get(FULL_MODEL))
        return to_float32(self._run(FULL_MODEL, self.put(host)))

    def call(self, graph: str, *args: Any) -> Any:
        """Graph ``graph`` through its public call (contract.GRAPH_SPECS says which)."""
        return getattr(self, GRAPH_SPECS[graph].call)(*args)

    # -- for a caller that gated the request itself (serving) -------------------------------------
    def put(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Gated host arrays -> this back end's form (TensorRT: device tensors), the one crossing."""
        return self._put(dict(arrays))

    def encode_checked(self, feeds: Mapping[str, Any]) -> Any:
        """The KV cache of put() history feeds, in this back end's form."""
        return self._run(USER_ENCODER, dict(feeds))

    def score_checked(self, kv_cache: Any, feeds: Mapping[str, Any]) -> np.ndarray:
        """Logits [B, M, T] float32 of a cache in this back end's form and put() feeds with cand_items."""
        return to_float32(self._run(ITEM_SCORER, {**feeds, KV_CACHE: kv_cache}))

    def split(self, kv_cache: Any) -> list[Any]:
        """One cache per user; copies when several were encoded together (a cached view would keep
        the whole batch alive)."""
        return [kv_cache] if kv_cache.shape[0] == 1 else [kv_cache[b : b + 1].copy() for b in range(kv_cache.shape[0])]

    def stack(self, caches: list[Any]) -> Any:
        return caches[0] if len(caches) == 1 else np.concatenate(caches)

    def nbytes(self, kv_cache: Any) -> int:
        return int(kv_cache.nbytes)

    # -- the back end ------------------------------------------------------------------------------
    host_kv = True  # the cache gate hands this back end a numpy cache (False: a torch tensor as it came)

    def _own(self, state: Any, host: Mapping[str, np.ndarray]) -> bool:
        """``state`` came from this runner's encode of this very history: bind it as it is."""
        return (isinstance(state, Encoded) and state.runner is self
                and all(np.array_equal(state.host[n], host[n]) for n in state.host))

    def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return with_item_rows(self.item_table, arrays)

    def _put_kv(self, kv_cache: Any) -> Any:
        return kv_cache

    def _run(self, graph: str, feeds: dict[str, Any]) -> Any:  # pragma: no cover - every back end has one
        raise NotImplementedError


__all__ = ["Encoded", "Runner", "scored", "to_float32", "with_item_rows"]
