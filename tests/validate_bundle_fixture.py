"""A tiny ONNX-only bundle for the validation tests: a random tiny model saved as a checkpoint,
exported with export_onnx and assembled in the layout engines/bundle.py reads (the same
manifest sections `astro-trt export --no-engines` writes)."""

from __future__ import annotations

from pathlib import Path

import torch

from astro_trt import contract
from astro_trt.config import ASTROConfig
from astro_trt.model.astro import ASTRO

TINY = ASTROConfig(name="tiny", num_items=50, num_behaviors=4, num_scenarios=2, d_model=16, num_heads=2,
                   num_layers=2, num_blocks=2, max_len=8, num_tasks=2, ffn_dim=32, task_names=("like", "love"))


def random_checkpoint(path: Path, seed: int, cfg: ASTROConfig = TINY) -> Path:
    from astro_trt.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = ASTRO(cfg).eval()
    with torch.no_grad():  # non-zero biases and tables, so that every parameter shows in the outputs
        for name, p in model.named_parameters():
            if name.endswith(("b_1", "b_2", "pos_table", "time_table")):
                p.normal_(0.0, 0.3)
    return save_checkpoint(path, model, cfg)


def make_bundle(out: Path, checkpoint: Path, precisions: tuple[str, ...] = ("fp32", "fp16")) -> Path:
    from astro_trt.engines.bundle import CHECKPOINT_DIR, onnx_relpath
    from astro_trt.exporter.export import export_onnx
    from astro_trt.manifest import build_manifest, write_manifest
    from astro_trt.model.checkpoint import load_checkpoint, write_dense_checkpoint
    from astro_trt.model.item_table import TABLE_DIR, write_tables

    ckpt = load_checkpoint(checkpoint)
    out.mkdir(parents=True)
    (out / CHECKPOINT_DIR).mkdir()
    write_dense_checkpoint(ckpt.directory, out / CHECKPOINT_DIR)
    rows = ckpt.config.num_items + 1
    tables = write_tables(ckpt.item_table.float_chunks(), rows, ckpt.config.d_model, out / TABLE_DIR, ["fp32"])
    onnx = {}
    for p in precisions:
        result = export_onnx(ckpt.model, out / "onnx" / p, precision=p, attention="plugin")
        onnx[p] = {g: {"path": onnx_relpath(g, p), "io": io.to_dict(), "opset": result.opset}
                   for g, io in result.io.items()}
    manifest = build_manifest(
        config=ckpt.config.to_dict(),
        checkpoint={"path": CHECKPOINT_DIR, "sha256": ckpt.sha256, "source": str(ckpt.directory)},
        backend=None, precisions=list(precisions),
        attention={"requested": "plugin", "effective": dict.fromkeys(precisions, "plugin")},
        profile={g: {"batch": [1, 4, 8], "candidates": [1, 16, 64]} for g in contract.GRAPHS},
        kv_cache={p: contract.kv_cache_layout(ckpt.config, p).to_dict() for p in precisions},
        onnx=onnx, engines={},
        item_table={"default": "fp32", "tables": {"fp32": tables["fp32"][0].to_dict()}},
    )
    write_manifest(out, manifest)
    return out
