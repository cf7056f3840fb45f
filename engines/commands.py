"""`astro-trt export` (checkpoint -> bundle) and `astro-trt inspect` (what is inside a bundle)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from astro_trt import contract
from astro_trt.engines.backend import BACKEND_CHOICES
from astro_trt.engines.build import ATTENTION_CHOICES
from astro_trt.errors import AstroError, ConfigError


def _precisions(value: str) -> list[str]:
    items = [p.strip().lower() for p in value.split(",") if p.strip()]
    bad = [p for p in items if p not in contract.PRECISIONS]
    if not items or bad:
        raise ConfigError(f"--precision {value!r}: choose a comma list of {list(contract.PRECISIONS)}")
    return list(dict.fromkeys(items))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _build_precision(
    model: Any, stage: Path, precision: str, lowerings: list, backend: Any, profile: Any, targets: list[str],
    opt_level: int | None, timing_cache: Path | None, progress: Any,
) -> dict[str, Any]:
    """Export (and build) one precision, trying the lowerings in order; returns its manifest parts."""
    from astro_trt.engines.build import build_engine
    from astro_trt.engines.bundle import engine_relpath, onnx_relpath
    from astro_trt.exporter.check import check_graphs
    from astro_trt.exporter.export import export_onnx

    failures: dict[str, str] = {}
    for index, lowering in enumerate(lowerings):
        onnx_dir = stage / "onnx" / precision
        engine_dir = stage / "engines" / precision
        try:
            task = progress.add_task(f"{precision}: export ONNX ({lowering.effective})", total=None)
            result = export_onnx(model, onnx_dir, precision=precision, attention=lowering.export_as)
            progress.update(task, description=f"{precision}: ONNX Runtime parity")
            parity = check_graphs(model, result)  # ExportError on a failed check, NaN included
            progress.remove_task(task)
            engines: dict[str, Any] = {}
            for graph, io in result.io.items():
                if backend is None:
                    continue
                task = progress.add_task(f"{precision}/{graph}: build", total=None)
                built = build_engine(
                    backend, result.paths[graph], io, profile, targets=targets, opt_level=opt_level,
                    plugins=lowering.effective == "plugin", timing_cache=timing_cache,
                    progress=lambda phase, t=task, g=graph: progress.update(t, description=f"{precision}/{g}: {phase}"),
                )
                progress.remove_task(task)
                path = stage / engine_relpath(graph, precision)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(built.plan)
                engines[graph] = {"path": engine_relpath(graph, precision), "io": built.io,
                                  "io_source": built.io_source, "build_seconds": round(built.seconds, 3),
                                  "bytes": len(built.plan)}
        except (AstroError, ImportError) as exc:
            if index + 1 == len(lowerings):
                raise
            failures[lowering.effective] = str(exc)
            shutil.rmtree(onnx_dir, ignore_errors=True)
            shutil.rmtree(engine_dir, ignore_errors=True)
            continue
        exported = result.to_manifest()  # the exporter's own account of its graphs
        onnx = {graph: {"path": onnx_relpath(graph, precision), "io": entry["io"], "opset": exported["opset"],
                        "op_domains": entry["op_domains"]}
                for graph, entry in exported["graphs"].items()}
        return {"effective": lowering.effective, "failures": failures, "onnx": onnx, "engines": engines,
                "parity": {g: float(e) for g, e in parity.items()}, "kv_cache": exported["kv_cache"]}
    raise AssertionError("unreachable: the last lowering either returns or raises")


def _summary(out: Path, manifest: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundle {out}", show_lines=False)
    for column in ("precision", "graph", "attention", "onnx", "engine", "build s", "ORT max |err|"):
        table.add_column(column, justify="right" if column in ("onnx", "engine", "build s") else "left")
    for precision in manifest["precisions"]:
        for graph, entry in manifest["onnx"][precision].items():
            engine = manifest["engines"].get(precision, {}).get(graph)
            onnx_bytes = sum(p.stat().st_size for p in (out / entry["path"]).parent.glob(f"{graph}.onnx*"))
            table.add_row(
                precision, graph, manifest["attention"]["effective"][precision], _size(onnx_bytes),
                _size(engine["bytes"]) if engine else "-", f"{engine['build_seconds']:.1f}" if engine else "-",
                f"{manifest['parity'][precision][graph]:.2e}",
            )
    # A pipe or CI log has no terminal width; a fixed width keeps graph names whole there.
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    backend = manifest["backend"]
    where = (f"{backend['name']} {backend['version']}, targets {','.join(backend['targets'])}"
             if backend else "none (--no-engines: ONNX only)")
    total = sum((out / rel).stat().st_size for rel in manifest["files"])
    console.print(f"back end: {where}; {len(manifest['files'])} files, {_size(total)}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--precision", default="fp32,fp16", show_default=True, help="Comma list of fp32, fp16, bf16.")
@click.option("--backend", "backend_name", default="auto", show_default=True,
              type=click.Choice(BACKEND_CHOICES))
@click.option("--attention", default="auto", show_default=True, type=click.Choice(ATTENTION_CHOICES))
@click.option("--targets", default="portable", show_default=True,
              help="Compute targets for TensorRT-RTX: portable, current, or e.g. sm86,sm89.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch of users per call.")
@click.option("--max-candidates", default=1024, show_default=True, type=int, help="Largest candidates per user.")
@click.option("--opt-level", default=None, type=click.IntRange(0, 5), help="Builder optimization level (0-5).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file, read and updated across builds (full TensorRT; TensorRT-RTX has none).")
@click.option("--no-engines", is_flag=True, help="Write ONNX only (machines without a TensorRT back end).")
@click.option("--validate", "run_validate", is_flag=True, help="Run the parity report on the bundle afterwards.")
def export(
    checkpoint: Path, out: Path, force: bool, precision: str, backend_name: str, attention: str, targets: str,
    max_batch: int, max_candidates: int, opt_level: int | None, timing_cache: Path | None, no_engines: bool,
    run_validate: bool,
) -> None:
    """Export CHECKPOINT to a verified bundle: ONNX graphs, TensorRT engines, manifest."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from astro_trt.artifacts import check_destination
    from astro_trt.engines.backend import resolve_backend
    from astro_trt.engines.build import Profile, attention_candidates
    from astro_trt.engines.bundle import CHECKPOINT_DIR, staged_bundle
    from astro_trt.manifest import build_manifest, write_manifest
    from astro_trt.model.checkpoint import copy_checkpoint, load_checkpoint

    # Everything that can be refused is refused before the checkpoint is read or a file written.
    precisions = _precisions(precision)
    profile = Profile(max_batch=max_batch, max_candidates=max_candidates)
    backend = None if no_engines else resolve_backend(backend_name)
    target_list = backend.parse_targets(targets) if backend else []
    lowerings = {p: attention_candidates(backend, attention, p) for p in precisions}
    if out.exists() and not force:
        raise click.UsageError(f"{out} already exists; choose another --out or pass --force to replace it")
    check_destination(out)
    ckpt = load_checkpoint(checkpoint)

    start = time.perf_counter()
    with staged_bundle(out, force=force) as stage:
        (stage / CHECKPOINT_DIR).mkdir()
        # The weights and the JSON documents save_checkpoint wrote (config, metrics, data
        # fingerprint): validate reproduces the trained AUCs from them.
        copy_checkpoint(ckpt.directory, stage / CHECKPOINT_DIR)
        parts: dict[str, dict[str, Any]] = {}
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
            for p in precisions:
                parts[p] = _build_precision(ckpt.model, stage, p, lowerings[p], backend, profile, target_list,
                                            opt_level, timing_cache, bar)
        manifest = build_manifest(
            config=ckpt.config.to_dict(),
            checkpoint={"path": CHECKPOINT_DIR, "sha256": ckpt.sha256, "source": str(ckpt.directory)},
            backend=None if backend is None else {
                "name": backend.name, "version": backend.version, "targets": target_list, "opt_level": opt_level,
                "capabilities": backend.capabilities(),
            },
            precisions=precisions,
            attention={"requested": attention, "effective": {p: parts[p]["effective"] for p in precisions},
                       "fallbacks": {p: parts[p]["failures"] for p in precisions if parts[p]["failures"]}},
            profile={g: {d: list(r) for d, r in profile.for_graph(io).items()}
                     for g, io in contract.graph_io(ckpt.config, precisions[0]).items()},
            kv_cache={p: parts[p]["kv_cache"] for p in precisions},
            onnx={p: parts[p]["onnx"] for p in precisions},
            engines={p: parts[p]["engines"] for p in precisions if parts[p]["engines"]},
            parity={p: parts[p]["parity"] for p in precisions},
            export_seconds=round(time.perf_counter() - start, 2),
        )
        write_manifest(stage, manifest)
    _summary(out.resolve(), manifest)
    if run_validate:
        from astro_trt.validate.parity import validate_bundle

        report = validate_bundle(out, runtimes=("torch", "ort"), progress=lambda msg: click.echo(f"  {msg}", err=True))
        click.echo(report.summary())
        if not report.passed:
            raise SystemExit(1)


def describe_bundle(directory: Path, *, verify: bool = True) -> str:
    """The human-readable text `inspect` prints (plain text, so tests and logs can read it)."""
    from astro_trt.engines.bundle import load_bundle

    bundle = load_bundle(directory, verify=verify)
    m = bundle.manifest
    backend = m.get("backend")
    lines = [
        f"bundle {bundle.directory} ({'verified' if verify else 'NOT verified'}: {len(m['files'])} files)",
        f"tool: astro-trt {m['tool']['version']} ({m['tool']['created']})",
        "back end: " + (f"{backend['name']} {backend['version']}, targets {','.join(backend['targets'])}, "
                        f"opt level {backend['opt_level'] if backend['opt_level'] is not None else 'default'}"
                        if backend else "none (ONNX only)"),
        f"model: {bundle.config.name} (d={bundle.config.d_model}, H={bundle.config.num_heads}, "
        f"layers={bundle.config.num_layers}, blocks={bundle.config.num_blocks}, L={bundle.config.max_len}, "
        f"tasks={bundle.config.num_tasks}), checkpoint sha256 {bundle.checkpoint_sha256[:16]}...",
        "profile: " + "; ".join(f"{g} {dict(bundle.profile(g))}" for g in m["profile"]),
    ]
    for precision in bundle.precisions:
        kv = m["kv_cache"][precision]
        lines.append(f"[{precision}] attention {bundle.attention(precision)}; kv_cache {kv['dtype']} "
                     f"{kv['shape']} ({kv['bytes_per_user']} bytes per user)")
        for graph in bundle.io(precision):
            onnx_path = bundle.onnx_path(graph, precision)
            engine_path = bundle.engine_path(graph, precision)
            size = _size(engine_path.stat().st_size) if engine_path else "no engine"
            lines.append(f"  {graph}: onnx {_size(onnx_path.stat().st_size)}, engine {size}"
                         + (f" (I/O from {m['engines'][precision][graph]['io_source']})" if engine_path else ""))
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


@click.command("inspect")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
def inspect(bundle_dir: Path, no_verify: bool) -> None:
    """Show what is inside BUNDLE_DIR: engines, I/O, sizes, back end, targets."""
    click.echo(describe_bundle(bundle_dir, verify=not no_verify))
