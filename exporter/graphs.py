"""nn.Module wrappers that give each graph a forward taking the contract's inputs positionally
(astro_trt.contract.graph_io order) and returning its outputs, so that tracing one wrapper
yields exactly one contract graph. The same wrapper is the PyTorch oracle of its graph
(``run``), so the exporter traces and the checks compare one definition per graph."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from astro_trt import contract
from astro_trt.model.astro import ASTRO, History


class UserEncoderGraph(nn.Module):
    def __init__(self, model: ASTRO) -> None:
        super().__init__()
        self.model = model

    def forward(self, hist_item_emb, hist_behaviors, hist_times, hist_lengths, scenario) -> torch.Tensor:
        # encode_user never reads request_time; the History slot only needs a tensor of the right batch.
        h = History(hist_item_emb, hist_behaviors, hist_times, hist_lengths, scenario, scenario)
        return self.model.encode_user(h)


class ItemScorerGraph(nn.Module):
    def __init__(self, model: ASTRO) -> None:
        super().__init__()
        self.model = model

    def forward(self, kv_cache, hist_lengths, hist_times, scenario, request_time, cand_item_emb) -> torch.Tensor:
        # score reads only lengths, times, scenario and request_time of the history (the contract's
        # SCORER_HISTORY_INPUTS); item and behaviour ids live in the cache already.
        h = History(None, None, hist_times, hist_lengths, scenario, request_time)
        return self.model.score(kv_cache, h, cand_item_emb).float()


class FullModelGraph(nn.Module):
    def __init__(self, model: ASTRO) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, hist_item_emb, hist_behaviors, hist_times, hist_lengths, scenario, request_time, cand_item_emb
    ) -> torch.Tensor:
        h = History(hist_item_emb, hist_behaviors, hist_times, hist_lengths, scenario, request_time)
        return self.model.full(h, cand_item_emb).float()


WRAPPERS: dict[str, type[nn.Module]] = {
    contract.USER_ENCODER: UserEncoderGraph,
    contract.ITEM_SCORER: ItemScorerGraph,
    contract.FULL_MODEL: FullModelGraph,
}


def wrapper_inputs(name: str) -> tuple[str, ...]:
    """The contract tensor names the wrapper of graph ``name`` takes, in order. A superset of the
    graph's inputs where the traced graph drops unused ones (a one-layer encoder reads ids only)."""
    return tuple(inspect.signature(WRAPPERS[name].forward).parameters)[1:]


def named_tensors(history: History, cand_items: torch.Tensor | None = None,
                  kv_cache: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A request's tensors (and a kv_cache) under their contract names."""
    tensors = dict(zip(contract.HISTORY_INPUTS, history.astuple(), strict=True))
    tensors.update(cand_items=cand_items, **{contract.KV_CACHE: kv_cache})
    return tensors


def with_item_rows(model: ASTRO, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """``tensors`` plus the rows of their item ids (contract.ITEM_ROWS) from the model's item table,
    as float32 like every runner's lookup; rows already present are kept."""
    out = dict(tensors)
    for ids, rows in contract.ITEM_ROWS.items():
        if out.get(rows) is None and out.get(ids) is not None:
            with torch.no_grad():
                out[rows] = model.item_rows(out[ids]).float()
    return out


def run(model: ASTRO, name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Graph ``name`` computed by the PyTorch ``model`` from contract-named tensors (item ids are
    looked up in the model's table where their rows are not given)."""
    tensors = with_item_rows(model, tensors)
    return WRAPPERS[name](model)(*(tensors[n] for n in wrapper_inputs(name)))
