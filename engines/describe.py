"""What is inside a bundle, as plain text (what `astro-trt inspect` prints; tests and logs read it)."""

from __future__ import annotations

from pathlib import Path

from astro_trt.engines.bundle import load_bundle
from astro_trt.manifest import manifest_digest
from astro_trt.precision import get as get_precision


def size_text(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def pin_line(directory: str | Path) -> str:
    """The digest to pin the bundle with; reports written into a bundle change it."""
    return f"manifest sha256 {manifest_digest(Path(directory))} (pin this bundle with --expect-sha256)"


def describe_bundle(directory: str | Path, *, verify: bool = True, expect_sha256: str | None = None) -> str:
    """Engines, I/O with min/opt/max shapes, sizes, back end, targets and reports of a bundle;
    with ``expect_sha256`` only the bundle whose manifest has that digest is described."""
    directory = getattr(directory, "directory", directory)  # a loaded Bundle describes its folder
    bundle = load_bundle(directory, verify=verify, expect_sha256=expect_sha256)
    m = bundle.manifest
    backend = m.get("backend")
    lines = [
        f"bundle {bundle.directory} ({'verified' if verify else 'NOT verified'}: {len(m['files'])} files)",
        f"manifest sha256 {bundle.manifest_sha256}" + (" (as expected)" if expect_sha256 else ""),
        f"tool: astro-trt {m['tool']['version']} ({m['tool']['created']})",
        "back end: " + (f"{backend['name']} {backend['version']}, targets {','.join(backend['targets'])}, "
                        f"opt level {backend['opt_level'] if backend['opt_level'] is not None else 'default'}"
                        if backend else "none (ONNX only)"),
        f"model: {bundle.config.name} (d={bundle.config.d_model}, H={bundle.config.num_heads}, "
        f"layers={bundle.config.num_layers}, blocks={bundle.config.num_blocks}, L={bundle.config.max_len}, "
        f"tasks={bundle.config.num_tasks}), checkpoint sha256 {bundle.checkpoint_sha256[:16]}...",
        "profile: " + "; ".join(f"{g} {dict(bundle.profile(g))}" for g in m["profile"]),
    ]
    for storage in bundle.table_storages:
        files = bundle.table_files(storage)
        stored = [files.path] + ([files.scales] if files.scales else [])
        size = sum((bundle.directory / rel).stat().st_size for rel in stored)
        lines.append(f"item table {storage}{' (served by default)' if storage == bundle.table_storages[0] else ''}: "
                     f"{files.rows} rows x {files.dim}, {size_text(size)} in {', '.join(stored)} (in no graph or "
                     "engine; looked up per request)")
    for precision in bundle.precisions:
        kv = m["kv_cache"][precision]
        lines.append(f"[{precision}] {get_precision(precision).compute}; attention {bundle.attention(precision)}; "
                     f"kv_cache {kv['dtype']} "
                     f"{kv['shape']} ({kv['bytes_per_user']} bytes per user)")
        for graph in bundle.io(precision):
            onnx_path = bundle.onnx_path(graph, precision)
            engine_path = bundle.engine_path(graph, precision)
            size = size_text(engine_path.stat().st_size) if engine_path else "no engine"
            chunk = m["onnx"][precision][graph].get("pairs_per_chunk")
            lines.append(f"  {graph}: onnx {size_text(onnx_path.stat().st_size)}"
                         + (f" (runs {chunk} pairs at a time)" if chunk else "") + f", engine {size}"
                         + (f" ({_engine_text(m['engines'][precision][graph])})" if engine_path else ""))
            records = bundle.engine_io(graph, precision)
            specs = records or [dict(t.to_dict(), mode=mode) for mode, ts in
                                (("input", bundle.io(precision)[graph].inputs),
                                 ("output", bundle.io(precision)[graph].outputs)) for t in ts]
            for r in specs:
                shape = f"min {r['min']} opt {r['opt']} max {r['max']}" if r.get("min") else f"shape {r['shape']}"
                lines.append(f"    {r['mode']:<6} {r['name']:<15} {r['dtype']:<8} {shape}")
    for name, files in m.get("reports", {}).items():
        lines.append(f"report {name}: {', '.join(files)}")
    return "\n".join(lines)


def _engine_text(entry: dict) -> str:
    source = entry.get("source")  # an int8 engine's: the QDQ form it was built from
    return f"I/O from {entry['io_source']}" + (f"; built from {source.split(':')[0]} int8" if source else "")


__all__ = ["describe_bundle", "size_text"]
