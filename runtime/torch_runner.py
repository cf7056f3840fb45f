"""The PyTorch back end: the model itself (the fp32 oracle) or a copy cast to a half precision,
run graph by graph through the exporter's wrappers (exporter/graphs.py ``run``), the very
definition each exported graph was traced from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError
from astro_trt.exporter.graphs import run
from astro_trt.exporter.precision import model_in_precision
from astro_trt.model.item_table import ItemTable
from astro_trt.precision import get, is_reference
from astro_trt.runtime.runner import Runner, with_item_rows


def model_item_table(model: torch.nn.Module) -> Any:
    """The model's item table: its external (mapped) one, or a view of the weights it owns."""
    if model.item_table is not None:
        return model.item_table
    return ItemTable.from_array(model.item_embedding.weight.detach().float().numpy())


class TorchRunner(Runner):
    """The PyTorch model in ``precision`` (a cast copy: the caller's model is left alone)."""

    runtime = "torch"
    host_kv = False  # a torch cache is bound as it came

    def __init__(self, model: torch.nn.Module, precision: str = "fp32") -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "cfg"):
            raise DataError(f"TorchRunner needs the ASTRO model (load_checkpoint(DIR).model), got "
                            f"{type(model).__name__}")
        self.dtype = get(precision).torch()  # ConfigError naming the precisions for an unknown one
        # The half copy is prepared exactly as the exporter prepares the graphs it traces.
        self.model = model if is_reference(precision) else model_in_precision(model, precision, export_ops=False)
        self.model.eval()
        cfg: ASTROConfig = self.model.cfg
        super().__init__(cfg, precision, item_table=model_item_table(model))

    def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {n: torch.from_numpy(a) for n, a in with_item_rows(self.item_table, arrays).items()}  # no copy

    def _put_kv(self, kv_cache: Any) -> torch.Tensor:
        return kv_cache if isinstance(kv_cache, torch.Tensor) else torch.from_numpy(kv_cache)

    def split(self, kv_cache: torch.Tensor) -> list[torch.Tensor]:
        return [kv_cache] if kv_cache.shape[0] == 1 else [kv_cache[b : b + 1].clone() for b in range(len(kv_cache))]

    def stack(self, caches: list[torch.Tensor]) -> torch.Tensor:
        return caches[0] if len(caches) == 1 else torch.cat(caches)

    def nbytes(self, kv_cache: torch.Tensor) -> int:
        return int(kv_cache.nbytes)

    @torch.no_grad()
    def _run(self, graph: str, feeds: dict[str, Any]) -> torch.Tensor:
        return run(self.model, graph, feeds)


__all__ = ["TorchRunner"]
