"""``astro-trt gpu-check``: everything GPU-side in one call, for the short minutes a GPU machine is
lent. Each step runs in its own process group with its own time box; its exit status, time and
output tail go into one report (gpu-check.json + gpu-check.md), and a failing or hanging step never
hides the others. ``--dry-run`` runs every step on a CPU machine as far as the first CUDA call
(pytest collects, the kernels compile for sm_90, the bundle is verified and its plans and back end
loaded, the served repository written and the ONNX Runtime reference computed), so a typo costs
CPU seconds, not GPU minutes.

The probes that are not a CLI command of their own (environment, plans, served) are this module's
``python -m astro_trt.serving.gpu_check probe NAME ...``. GPU_ENTRY_POINTS lists every GPU-side
entry point of the package and the step that covers it; the report repeats the list.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from astro_trt.contract import GRAPHS
from astro_trt.engines.backend import BACKENDS, capturing_logger
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import AstroError, BackendError, DataError
from astro_trt.lazy import lazy_import
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.plugins.kernels.blocks import target_of
from astro_trt.runtime.tensorrt import TrtRunner
from astro_trt.serving import client as tc
from astro_trt.serving.compute import make_compute
from astro_trt.serving.config_pbtxt import RECOMMEND
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import TritonServer, find_triton, unavailable_reason
from astro_trt.serving.service import Recommender
from astro_trt.serving.source import load_served_bundle
from astro_trt.serving.workload import make_workload
from astro_trt.tolerances import FP32_MAX_ABS

torch = lazy_import("torch")

ROOT = Path(__file__).resolve().parents[1]  # the checkout (tests/ lives there)
BUDGET_SECONDS = 480  # the whole check: 8 minutes
NO_GPU = "no CUDA GPU visible"  # what a step that stopped at the first CUDA call says (dry run)
TAIL = 4000  # characters of each step's output kept in the report


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    needs: tuple[str, ...]  # Python modules that must import on the GPU machine ("tritonserver": the binary)
    seconds: int  # time box
    commands: Callable[[Context], list[list[str]]]  # argv lists, run in order
    dry_commands: Callable[[Context], list[list[str]]]
    # Output that fails the step on a GPU although the command exited 0 (validate passes with a runtime skipped).
    fails_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    bundle: Path
    out: Path
    python: str = sys.executable

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "astro_trt.cli", *args]

    def pytest(self, *args: str) -> list[str]:
        return [self.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *args, str(ROOT / "tests")]

    def probe(self, name: str, *args: str) -> list[str]:
        return [self.python, "-m", "astro_trt.serving.gpu_check", "probe", name, str(self.bundle), str(self.out), *args]


KERNEL_SHAPES = ("--config", "ml100k,climber,climber-large", "--candidates", "64,1024,4096", "--dtype", "fp16")
STEPS: tuple[Step, ...] = (
    Step("environment", "GPU, driver and package versions", ("torch",), 30,
         lambda c: [c.probe("environment")], lambda c: [c.probe("environment", "--dry-run")]),
    Step("pytest-gpu", "pytest -m gpu: Triton kernels on CUDA vs the reference, engines' parity gates, one "
         "encoded user scored in many batches", ("pytest", "torch", "triton", "tensorrt_rtx"), 200,
         lambda c: [c.pytest("-rA")], lambda c: [c.pytest("--collect-only")]),
    Step("kernels", "bench-kernels: Triton kernels timed, beside the predicted H100/H200 times", ("torch", "triton"),
         100,
         lambda c: [c.cli("bench-kernels", *KERNEL_SHAPES, "--impl", "triton,reference,sdpa-dense-mask",
                          "--repeat", "10", "--json", str(c.out / "kernels.json"))],
         lambda c: [c.cli("bench-kernels", *KERNEL_SHAPES, "--compile-only", "--targets", "sm_90",
                          "--json", str(c.out / "kernels.json"))]),
    Step("trt-plans", "the bundle's TensorRT-RTX plans deserialize and run on this GPU", ("torch", "tensorrt_rtx"),
         60, lambda c: [c.probe("plans")], lambda c: [c.probe("plans", "--dry-run")]),
    Step("bench-trt", "bench --runtime trt, and validate --runtime ort,trt (both against the same oracle and gates)",
         ("torch", "onnxruntime", "tensorrt_rtx"), 110,
         lambda c: [c.cli("bench", str(c.bundle), "--runtime", "trt", "--candidates", "64,1024", "--users", "1",
                          "--no-peer", "--repetitions", "5", "--out", str(c.out / "bench-trt")),
                    c.cli("validate", str(c.bundle), "--data", "synthetic", "--runtime", "ort,trt")],
         lambda c: [c.cli("bench", str(c.bundle), "--runtime", "trt", "--candidates", "64", "--users", "1",
                          "--no-peer", "--repetitions", "1", "--warmup", "0", "--out", str(c.out / "bench-trt")),
                    c.cli("validate", str(c.bundle), "--data", "synthetic", "--runtime", "ort,trt")],
         fails_on=("skipped trt",)),
    Step("served-trt", "astro_recommend served by tritonserver with compute=trt against ONNX Runtime in-process",
         ("torch", "onnxruntime", "tensorrt_rtx", "tritonclient", "tritonserver"), 100,
         lambda c: [c.probe("served")], lambda c: [c.probe("served", "--dry-run")]),
)
STEP_NAMES = tuple(s.name for s in STEPS)

# Every place the package touches a GPU -> the steps that exercise it on one.
GPU_ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "plugins/kernels/ops.py: the Triton kernels launched on CUDA (TritonOps, multi_scale_self_attention, "
    "candidate_attention)": ("pytest-gpu", "kernels"),
    "plugins/kernels/blocks.py: the block configuration chosen for the device's target": ("pytest-gpu", "kernels"),
    "validate/kernel_bench.py + kernel_impls.py: bench-kernels timed (Triton, reference, SDPA)": ("kernels",),
    "engines/runtime.py: Session (plans deserialized, engines run on the device)": ("trt-plans", "pytest-gpu"),
    "engines/device_table.py: the item table resident on the device, a request's rows gathered there": (
        "trt-plans", "pytest-gpu", "served-trt"),
    "runtime/tensorrt.py: TrtRunner (validate / bench --runtime trt)": ("trt-plans", "bench-trt", "pytest-gpu"),
    "serving/compute.py: make_compute -> TrtRunner (astro_recommend with compute=trt)": ("served-trt",),
    "plugins/tensorrt/plugin.py: the TensorRT plugins (full TensorRT only)": (),
    "engines/build.py with --backend tensorrt (full TensorRT builds on the GPU)": (),
}
NOT_COVERED = ("full TensorRT (`tensorrt`) cannot be installed on these machines (FINDINGS.md): its plugins "
               "and on-GPU builds stay unchecked until a machine has it")


def missing_packages(steps: tuple[Step, ...]) -> dict[str, list[str]]:
    """package -> the steps that need it, for every package that cannot be found here."""
    missing: dict[str, list[str]] = {}
    for step in steps:
        for package in step.needs:
            if package == "tritonserver":
                absent = unavailable_reason() is not None
            else:
                absent = importlib.util.find_spec(package) is None
            if absent:
                missing.setdefault(package, []).append(step.name)
    return missing


def select_steps(skip: list[str]) -> tuple[Step, ...]:
    unknown = [s for s in skip if s not in STEP_NAMES]
    if unknown:
        raise DataError(f"--skip {','.join(unknown)}: no such step; the steps are {', '.join(STEP_NAMES)}")
    return tuple(s for s in STEPS if s.name not in skip)


def check_packages(steps: tuple[Step, ...]) -> None:
    missing = missing_packages(steps)
    if missing:
        package, users = next(iter(missing.items()))
        others = f" (also missing: {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
        raise BackendError(f"gpu-check needs '{package}' here for step {', '.join(users)}{others}; carry it as "
                           f"docs/device.md says, or leave the step out with --skip {','.join(users)}")


@dataclass
class StepResult:
    name: str
    status: str  # passed, failed, timeout, skipped, reached-gpu (dry run: stopped at the first CUDA call)
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    returncode: int | None = None
    tail: str = ""


def _run_one(argv: list[str], seconds: float, log) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group for at most ``seconds``; on timeout the whole group
    (a tritonserver the step started included) is ended. -> (returncode or None on timeout, output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=max(1.0, seconds))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out = ""
        code = None
    log.write(f"$ {' '.join(argv)}\n{out or ''}\n")
    return code, out or ""


def run_step(step: Step, ctx: Context, dry_run: bool, seconds: float) -> StepResult:
    result = StepResult(step.name, "passed")
    start = time.monotonic()
    with open(ctx.out / "logs" / f"{step.name}.log", "w") as log:
        for argv in (step.dry_commands if dry_run else step.commands)(ctx):
            result.commands.append(" ".join(argv))
            left = seconds - (time.monotonic() - start)
            code, out = _run_one(argv, left, log)
            result.returncode, result.tail = code, out[-TAIL:]
            if code is None:
                result.status = "timeout"
                break
            if not dry_run and code == 0 and any(p in out for p in step.fails_on):
                result.status = "failed"
                break
            if code != 0:
                # In a dry run, a command that refused because no GPU is visible got as far as it can here.
                result.status = "reached-gpu" if dry_run and NO_GPU in out else "failed"
                if result.status == "failed":
                    break
    result.seconds = time.monotonic() - start
    return result


def run_gpu_check(bundle: Path, out: Path, *, dry_run: bool = False, skip: list[str] | None = None,
                  budget: float = BUDGET_SECONDS, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Run the steps (or their dry runs) against ``bundle``, write OUT/gpu-check.{json,md}; the report."""
    steps = select_steps(skip or [])
    check_packages(steps)
    load_bundle(bundle)  # a bad bundle is refused before any step
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    # The steps run on a copy: bench and validate write their reports into the bundle they are given.
    work = out / "bundle"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(bundle, work)
    ctx = Context(work.resolve(), out.resolve())
    deadline = time.monotonic() + budget
    results = []
    for step in STEPS:
        if step not in steps:
            results.append(StepResult(step.name, "skipped", tail="--skip"))
            continue
        left = deadline - time.monotonic()
        if left < 5:
            results.append(StepResult(step.name, "skipped", tail=f"the {budget:.0f} s budget was spent"))
            continue
        progress(f"{step.name} ({min(step.seconds, left):.0f} s at most) ...")
        results.append(run_step(step, ctx, dry_run, min(step.seconds, left)))
        progress(f"  {results[-1].status} in {results[-1].seconds:.1f} s")
    report = {"dry_run": dry_run, "bundle": str(Path(bundle).resolve()), "budget_s": budget,
              "steps": [asdict(r) for r in results],
              "entry_points": [{"entry_point": k, "steps": list(v)} for k, v in GPU_ENTRY_POINTS.items()],
              "not_covered": NOT_COVERED, "needs": {s.name: list(s.needs) for s in STEPS}}
    env_file = out / "environment.json"
    if env_file.is_file():
        report["environment"] = json.loads(env_file.read_text())
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu-check.md").write_text(report_markdown(report))
    return report


def ok(report: dict) -> bool:
    good = ("passed", "skipped", "reached-gpu") if report["dry_run"] else ("passed", "skipped")
    return all(s["status"] in good for s in report["steps"])


def report_markdown(report: dict) -> str:
    lines = [f"# gpu-check{' (dry run)' if report['dry_run'] else ''}", "", f"Bundle: `{report['bundle']}`", ""]
    env = report.get("environment", {})
    if env:
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), ""]
    lines += ["| step | status | seconds | commands |", "|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | "
                     f"{'<br>'.join(f'`{c}`' for c in s['commands'])} |")
    lines += ["", "## GPU-side entry points and the steps that cover them", "", "| entry point | steps |", "|---|---|"]
    lines += [f"| {e['entry_point']} | {', '.join(e['steps']) or 'not covered'} |" for e in report["entry_points"]]
    lines += ["", f"Not covered: {report['not_covered']}.", ""]
    for s in report["steps"]:
        if s["status"] not in ("passed", "skipped") and s["tail"]:
            lines += [f"## {s['name']}: {s['status']}", "", "```", s["tail"][-2000:], "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- probes
def probe_environment(bundle: Path, out: Path, dry_run: bool) -> dict:
    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda}
    for module in ("triton", "tensorrt_rtx", "onnxruntime", "tritonclient"):
        try:
            env[module] = getattr(importlib.import_module(module), "__version__", "present")
        except ImportError:
            env[module] = "absent"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   kernel_target=target_of((props.major, props.minor)), memory_gib=round(props.total_memory / 2**30, 1))
    elif not dry_run:
        raise BackendError(f"{NO_GPU} to PyTorch ({torch.__version__}); gpu-check runs on a GPU machine "
                           "(--dry-run on this one)")
    else:
        env["gpu"] = "none (dry run)"
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    return env


def probe_plans(bundle_dir: Path, out: Path, dry_run: bool) -> dict:
    """Each plan deserialized alone (so a failure names its plan and TensorRT's message), then the
    engines of each precision run once through runtime/tensorrt.py's TrtRunner: encode, score, full."""
    bundle = load_bundle(bundle_dir)
    if bundle.backend is None:
        raise DataError(f"{bundle_dir} has no engines (exported with --no-engines); export it with engines")
    trt = BACKENDS[bundle.backend].load()
    plans = {f"{p}/{g}": bundle.engine_path(g, p) for p in bundle.precisions for g in GRAPHS}
    report: dict = {"backend": bundle.backend, "version": trt.__version__,
                    "targets": bundle.manifest.get("targets"),
                    "plans": {k: {"bytes": v.stat().st_size if v else None} for k, v in plans.items()}}
    if dry_run or not torch.cuda.is_available():
        if not dry_run:
            raise BackendError(f"{NO_GPU}; the plans cannot be deserialized here")
        report["stopped"] = "before trt.Runtime.deserialize_cuda_engine (the first CUDA call)"
        (out / "trt-plans.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return report
    logger = capturing_logger(trt)
    runtime = trt.Runtime(logger)
    for key, path in plans.items():
        if path is None:
            report["plans"][key]["error"] = "no plan in the bundle"
            continue
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        report["plans"][key]["deserialized"] = engine is not None
        if engine is None:
            report["plans"][key]["error"] = " | ".join(logger.errors[-3:]) or "deserialize returned None"
    report["runs"] = {}
    for precision in bundle.precisions:
        try:
            runner = TrtRunner(bundle, precision)
            batch = synthetic_batch(bundle.config, batch=1, candidates=64, seed=0)
            state = runner.encode(batch.history)
            logits = runner.score(state, batch.history, batch.cand_items)
            full = runner.full(batch.history, batch.cand_items)
            report["runs"][precision] = {"ran": True, "finite": bool(np.isfinite(logits).all()),
                                         "max_abs_split_vs_full": float(np.abs(logits - full).max())}
        except Exception as exc:  # noqa: BLE001 - the report says what TensorRT said, per precision
            report["runs"][precision] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    (out / "trt-plans.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    failed = [k for k, v in report["plans"].items() if v.get("error")] + \
        [p for p, r in report["runs"].items() if not r.get("ran") or not r.get("finite")]
    if failed:
        raise BackendError(f"plans that did not deserialize or run on this GPU: {', '.join(failed)}")
    return report


def probe_served(bundle_dir: Path, out: Path, dry_run: bool, users: int = 4, candidates: int = 64) -> dict:
    """astro_recommend served by a real tritonserver (compute=auto, which is trt where a GPU and the
    bundle's engines are: checked here first) against the in-process Recommender on ONNX Runtime."""
    find_triton()
    bundle = load_served_bundle(bundle_dir)
    precision = "fp32" if "fp32" in bundle.precisions else bundle.precisions[0]
    repo = write_repository(bundle, out / "served-repo", precision=precision, force=True)
    workload = make_workload(bundle.config, users=users, pages=1, candidates=candidates, seed=7, tag="gpu-check")
    reference = Recommender(bundle, precision, compute="ort", threads=1)
    expected = [reference.page(np.array([key], dtype=object), tensors).logits
                for key, tensors in (workload.request(i) for i in range(len(workload)))]
    report: dict = {"precision": precision, "repository": str(repo), "requests": len(workload)}
    if dry_run:
        report["stopped"] = "before tritonserver starts astro_recommend with compute=trt (the first CUDA call)"
        print(json.dumps(report, indent=2))
        return report
    served_kind = type(make_compute(bundle, precision, "auto")).__name__
    report["served_compute"] = served_kind
    if served_kind != TrtRunner.__name__:
        raise BackendError(f"astro_recommend would serve with {served_kind}, not TensorRT: no GPU device node or "
                           "no engines in the bundle")
    with TritonServer(repo, models=PYTHON_MODELS) as server:
        client = tc.connect("http", server.endpoints.http)
        errors = []
        for i, want in enumerate(expected):
            key, tensors = workload.request(i)
            got, _ = tc.recommend("http", client, key, tensors)
            errors.append(float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()))
        report["served_config"] = tc.served_config(server.endpoints.http, RECOMMEND, headers=server.admin_headers)
    report["max_abs"] = max(errors)
    report["limit"] = FP32_MAX_ABS
    (out / "served-trt.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    if report["max_abs"] > FP32_MAX_ABS:
        raise BackendError(f"served TensorRT logits differ from ONNX Runtime by {report['max_abs']:.3g} "
                           f"> {FP32_MAX_ABS:g}")
    return report


PROBES = {"environment": probe_environment, "plans": probe_plans, "served": probe_served}


def _probe_main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "probe" or argv[1] not in PROBES:
        print(f"usage: python -m astro_trt.serving.gpu_check probe {{{','.join(PROBES)}}} BUNDLE OUT [--dry-run]",
              file=sys.stderr)
        return 2
    try:
        PROBES[argv[1]](Path(argv[2]), Path(argv[3]), "--dry-run" in argv[4:])
    except AstroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))

__all__ = ["GPU_ENTRY_POINTS", "STEPS", "STEP_NAMES", "check_packages", "missing_packages", "ok", "run_gpu_check"]
