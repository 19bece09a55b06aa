"""The bare forward of each CPU runtime and its options, measured side by side in one process.

Same random-init torchvision weights (seed 0), same normalised float input, the same threads for
every runtime. Candidates run round-robin over several rounds (each round in a rotated order), so
the shared machine's noise hits them alike; each reports the median over rounds and the spread.

Phases:
  1. forward: batch 8 (img/s, CPU ms an image) and batch 1 (p50 ms) per candidate, and each one's
     max |logit difference| against torch eager on the same batch;
  2. contention: batch-8 forwards while a thread decodes the photo mix flat out (the server's decode
     pool at 16 clients): forward img/s AND decodes/s; then one client's serial loop (decode one
     photo, normalise, forward it alone): p50 ms;
  3. first call at each batch size 1..8 after warming only 1 and 8, on fresh sessions;
  4. memory: the RSS each configuration adds (its own subprocess: load, run every size, RSS delta).

Examples:
  python -m benchmarks.runtimes
  python -m benchmarks.runtimes --model resnet50 --seconds 2 --rounds 3 --json runtimes.json
  python -m benchmarks.runtimes --only torch-cl,ort-all --phases forward --seconds 0.3 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

PHASES = ("forward", "contention", "shapes", "memory")
NUM_CLASSES = 1000


# --- runners: prepare(x) once per input, run(prepared) is what gets timed -------------------------


class TorchRunner:
    def __init__(self, model: Any, *, channels_last: bool, compiled: bool = False, freezing: bool = False) -> None:
        import torch

        self.torch = torch
        self.channels_last = channels_last
        self.compile_s: dict[int, float] = {}
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            # One graph per batch size, as the server's buckets. Options make a backend of their own, so
            # the frozen variant gets its own graphs: with the same backend, dynamo would reuse the first
            # variant's (its guards are on the tensors, not on which module instance is called).
            model = torch.compile(model, dynamic=False, options={"freezing": True} if freezing else None)
        self.model = model
        self.compiled = compiled

    def prepare(self, x: np.ndarray) -> Any:
        t = self.torch.from_numpy(x)
        t = t.contiguous(memory_format=self.torch.channels_last) if self.channels_last else t.contiguous()
        if self.compiled and t.shape[0] not in self.compile_s:  # the first call at a shape compiles it
            started = time.perf_counter()
            self.run(t)
            self.compile_s[t.shape[0]] = time.perf_counter() - started
        return t

    def run(self, prepared: Any) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(prepared).numpy()  # type: ignore[no-any-return]


ORT_LEVELS = ("disabled", "basic", "extended", "all")


class OrtRunner:
    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        level: str = "all",
        spinning: bool = True,
        arena: bool = True,
        mem_pattern: bool = True,
        io_binding: bool = False,
        prepacking: bool = True,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = mem_pattern
        options.add_session_config_entry("session.disable_prepacking", "0" if prepacking else "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.io_binding = io_binding

    def prepare(self, x: np.ndarray) -> Any:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.io_binding:
            return x
        binding = self.session.io_binding()
        binding.bind_cpu_input("data", x)
        out = np.empty((x.shape[0], NUM_CLASSES), np.float32)  # preallocated, written in place by each run
        binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        return (binding, out, x)  # x kept alive: the binding holds only its pointer

    def run(self, prepared: Any) -> np.ndarray:
        if self.io_binding:
            binding, out, _ = prepared
            self.session.run_with_iobinding(binding)
            return out  # type: ignore[no-any-return]
        return self.session.run(["logits"], {"data": prepared})[0]  # type: ignore[no-any-return]


class OpenVinoRunner:
    """OpenVINO on the CPU device, reading the same ONNX file. `in_flight` > 1 runs that many batches
    at once through an async queue (what the THROUGHPUT hint's streams need to pay off)."""

    def __init__(self, path: Path, *, threads: int, hint: str, in_flight: int = 1) -> None:
        import openvino as ov

        self.ov = ov
        config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        self.compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.in_flight = in_flight
        self.queue = ov.AsyncInferQueue(self.compiled, in_flight) if in_flight > 1 else None
        self.images_per_call = in_flight

    def prepare(self, x: np.ndarray) -> Any:
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, prepared: Any) -> np.ndarray:
        if self.queue is not None:
            for _ in range(self.in_flight):
                self.queue.start_async({0: prepared}, share_inputs=True)
            self.queue.wait_all()
            return np.asarray(self.queue[0].get_output_tensor(0).data).copy()
        self.request.infer({0: prepared}, share_inputs=True)
        return np.asarray(self.request.get_output_tensor(0).data).copy()


# --- the model, its ONNX files, the candidates ---------------------------------------------------


def build_model(arch: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


def export_onnx(model: Any, path: Path, *, opset: int, dynamo: bool) -> float:
    """The lead's export call (legacy TorchScript exporter unless `dynamo`); returns the seconds it took."""
    import torch

    started = time.perf_counter()
    x = torch.randn(1, 3, 224, 224)
    names: dict[str, Any] = {"input_names": ["data"], "output_names": ["logits"]}
    if dynamo:  # its own way to say the batch is dynamic (it warns about dynamic_axes)
        names["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:
        names["dynamic_axes"] = {"data": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice: choosing it is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=opset, verbose=False, **names)
    return time.perf_counter() - started


EXPORTS = {"legacy17": (17, False), "legacy13": (13, False), "legacy18": (18, False), "dynamo18": (18, True)}


@dataclass
class Candidate:
    name: str
    what: str
    build: Callable[[], Any]
    needs_export: str | None = None  # the ONNX file it reads
    batch1: bool = True


def candidates(arch: str, threads: int, files: dict[str, Path]) -> list[Candidate]:
    model = build_model(arch)
    legacy = files["legacy17"]

    def ort(**kw: Any) -> Callable[[], Any]:
        path = files[kw.pop("export", "legacy17")]
        return lambda: OrtRunner(path, threads=kw.pop("threads", threads), **kw)

    def ov(hint: str, in_flight: int = 1) -> Callable[[], Any]:
        return lambda: OpenVinoRunner(legacy, threads=threads, hint=hint, in_flight=in_flight)

    found = [
        Candidate("torch", "torch eager, contiguous", lambda: TorchRunner(build_model(arch), channels_last=False)),
        Candidate(
            "torch-cl", "torch eager, channels_last (the server today)", lambda: TorchRunner(model, channels_last=True)
        ),
        Candidate(
            "torch-compile",
            "torch.compile (inductor), channels_last",
            lambda: TorchRunner(build_model(arch), channels_last=True, compiled=True),
        ),
        Candidate(
            "torch-compile-freeze",
            "torch.compile (inductor, freezing), channels_last",
            lambda: TorchRunner(build_model(arch), channels_last=True, compiled=True, freezing=True),
        ),
    ]
    found += [
        Candidate(
            f"ort-{lv}" if lv != "all" else "ort-all",
            f"onnxruntime, graph optimisation {lv}" + (" (the lead's default)" if lv == "all" else ""),
            ort(level=lv),
            "legacy17",
        )
        for lv in ORT_LEVELS
    ]
    found += [
        Candidate("ort-nospin", "onnxruntime all, intra-op spinning off", ort(spinning=False), "legacy17"),
        Candidate("ort-1thread", "onnxruntime all, 1 intra-op thread", ort(threads=1), "legacy17"),
        Candidate("ort-iobind", "onnxruntime all, IO binding (output preallocated)", ort(io_binding=True), "legacy17"),
        Candidate("ort-noarena", "onnxruntime all, cpu mem arena off", ort(arena=False), "legacy17"),
        Candidate("ort-nopattern", "onnxruntime all, mem pattern off", ort(mem_pattern=False), "legacy17"),
        Candidate("ort-noprepack", "onnxruntime all, weight prepacking off", ort(prepacking=False), "legacy17"),
        Candidate("ort-opset13", "onnxruntime all, legacy exporter opset 13", ort(export="legacy13"), "legacy13"),
        Candidate("ort-opset18", "onnxruntime all, legacy exporter opset 18", ort(export="legacy18"), "legacy18"),
        Candidate("ort-dynamo", "onnxruntime all, dynamo exporter opset 18", ort(export="dynamo18"), "dynamo18"),
        Candidate("ov-latency", "OpenVINO, LATENCY hint", ov("LATENCY"), "legacy17"),
        Candidate("ov-throughput", "OpenVINO, THROUGHPUT hint, 1 request", ov("THROUGHPUT"), "legacy17"),
        Candidate("ov-throughput-2", "OpenVINO, THROUGHPUT hint, 2 batches in flight", ov("THROUGHPUT", 2), "legacy17",
                  batch1=False),
    ]  # fmt: skip
    return found


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class Slot:
    """One candidate's share of one round at one batch size."""

    img_s: float
    p50_ms: float
    cpu_ms_per_img: float
    calls: int


def time_slot(runner: Any, prepared: Any, batch: int, seconds: float, min_calls: int = 3) -> Slot:
    times: list[float] = []
    cpu0 = time.process_time()
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at or len(times) < min_calls:
        started = time.perf_counter()
        runner.run(prepared)
        times.append(time.perf_counter() - started)
    images = batch * getattr(runner, "images_per_call", 1) * len(times)
    return Slot(
        images / sum(times), 1000 * statistics.median(times), 1000 * (time.process_time() - cpu0) / images, len(times)
    )


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Result:
    name: str
    what: str
    setup_s: float = 0.0
    error: str | None = None
    max_abs_dlogit: float | None = None
    compile_s: dict[int, float] = field(default_factory=dict)
    b8: list[Slot] = field(default_factory=list)
    b1: list[Slot] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "what": self.what, "setup_s": self.setup_s, "error": self.error}
        out["max_abs_dlogit"] = self.max_abs_dlogit
        out["compile_s"] = self.compile_s
        if self.b8:
            out["b8_img_s"] = spread([s.img_s for s in self.b8])
            out["b8_cpu_ms_per_img"] = statistics.median(s.cpu_ms_per_img for s in self.b8)
        if self.b1:
            out["b1_p50_ms"] = spread([s.p50_ms for s in self.b1])
        return out


def setup(
    chosen: Sequence[Candidate], inputs: dict[int, np.ndarray], reference: np.ndarray
) -> list[tuple[Result, Any, dict[int, Any]]]:
    live = []
    for cand in chosen:
        result = Result(cand.name, cand.what)
        started = time.perf_counter()
        try:
            runner = cand.build()
            prepared = {b: runner.prepare(x) for b, x in inputs.items() if b == 8 or cand.batch1}
            for p in prepared.values():  # warm-up
                runner.run(p)
            logits = runner.run(prepared[8])
            result.max_abs_dlogit = float(np.abs(logits[: len(reference)] - reference).max())
            result.compile_s = dict(getattr(runner, "compile_s", {}))
            live.append((result, runner, prepared))
        except Exception as exc:  # a candidate that fails is reported, not fatal
            result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            live.append((result, None, {}))
        result.setup_s = time.perf_counter() - started
        print(
            f"  set up {cand.name:<22} {result.setup_s:6.1f} s" + (f"  FAILED {result.error}" if result.error else ""),
            flush=True,
        )
    return live


class Rounds:
    """Round-robin rounds: each in a rotated order, after a bounded wait for a quiet machine, with the
    cores other processes took during it recorded (the machine is shared)."""

    def __init__(self, count: int, quiet_wait_s: float) -> None:
        self.count, self.quiet_wait_s = count, quiet_wait_s
        self.other_cores: list[float] = []

    def __call__(self, items: list[Any], label: str) -> Iterator[list[Any]]:
        from benchmarks.harness.machine import CpuSnapshot, other_cores, wait_for_quiet

        for r in range(self.count):
            if self.quiet_wait_s > 0:
                wait_for_quiet(0.3, self.quiet_wait_s)
            machine0, cpu0 = CpuSnapshot.take(), time.process_time()
            yield items[r % len(items) :] + items[: r % len(items)]
            self.other_cores.append(round(other_cores(machine0, cpu0), 2))
            print(f"  {label} round {r + 1}/{self.count}: other processes {self.other_cores[-1]:.2f} cores", flush=True)


def forward_phase(live: list[tuple[Result, Any, dict[int, Any]]], rounds: Rounds, seconds: float) -> None:
    for order in rounds([item for item in live if item[1] is not None], "forward"):
        for result, runner, prepared in order:
            result.b8.append(time_slot(runner, prepared[8], 8, seconds))
            if 1 in prepared:
                result.b1.append(time_slot(runner, prepared[1], 1, seconds / 2, min_calls=5))


# --- contention: forwards while a decode thread runs, and one client's serial loop ----------------

CONTENDERS = ("torch-cl", "ort-all", "ort-nospin", "ort-1thread", "ov-latency")


class DecodeLoop:
    """`threads` threads running `service.imaging.preprocess` over the photo mix until the block ends."""

    def __init__(self, photos: Sequence[Any], threads: int = 1) -> None:
        self.photos, self.threads = photos, threads
        self.count = 0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _loop(self) -> None:
        from service.imaging import Preprocessing, preprocess

        spec, done, i = Preprocessing(), 0, 0
        while not self._stop.is_set():
            preprocess(self.photos[i % len(self.photos)].data, spec, max_pixels=50_000_000)
            done, i = done + 1, i + 1
        with self._lock:
            self.count += done

    def __enter__(self) -> DecodeLoop:
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.threads)]
        self._started = time.perf_counter()
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()
        self.elapsed = time.perf_counter() - self._started


def normalised(images: Any) -> np.ndarray:
    """uint8 NCHW to the model's float input, in torch, as the server does around the forward."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std).numpy()  # type: ignore[no-any-return]


def serial_p50_ms(runner: Any, photos: Sequence[Any], seconds: float) -> float:
    """One client: decode a photo, normalise it, forward it alone; the median of that loop."""
    from service.imaging import Preprocessing, preprocess

    spec, times = Preprocessing(), list[float]()
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at or len(times) < 5:
        started = time.perf_counter()
        x = normalised(preprocess(photos[len(times) % len(photos)].data, spec, max_pixels=50_000_000)[None])
        runner.run(runner.prepare(x))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def pipeline_img_s(runner: Any, photos: Sequence[Any], seconds: float, decoders: int) -> float:
    """The server at many clients, in one process: `decoders` threads decode the mix into a queue, the
    main thread forwards them 8 at a time (normalised in torch); images forwarded a second."""
    import torch

    from service.imaging import Preprocessing, preprocess

    ready: queue.Queue[Any] = queue.Queue(maxsize=32)
    stop = threading.Event()

    def decode(offset: int) -> None:
        spec, i = Preprocessing(), offset
        while not stop.is_set():
            image = preprocess(photos[i % len(photos)].data, spec, max_pixels=50_000_000)
            i += decoders
            while not stop.is_set():
                try:
                    ready.put(image, timeout=0.05)
                    break
                except queue.Full:
                    pass

    workers = [threading.Thread(target=decode, args=(k,), daemon=True) for k in range(decoders)]
    for worker in workers:
        worker.start()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 16:
        batch = normalised(torch.stack([ready.get() for _ in range(8)]))
        runner.run(runner.prepare(batch))
        done += 8
    elapsed = time.perf_counter() - started
    stop.set()
    for worker in workers:
        worker.join()
    return done / elapsed


def contention_phase(
    live: list[tuple[Result, Any, dict[int, Any]]], rounds: Rounds, seconds: float, decode_threads: int, threads: int
) -> dict[str, Any]:
    from benchmarks.photos import load_photos

    photos = load_photos()
    runners = {
        r.name: (runner, prepared) for r, runner, prepared in live if runner is not None and r.name in CONTENDERS
    }
    keys = ("fwd_img_s", "decodes_s", "serial_p50_ms", "pipeline_img_s")
    out: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in ["decode-only", *runners]}
    for order in rounds(list(out), "contention"):
        for name in order:
            with DecodeLoop(photos, decode_threads) as loop:
                if name == "decode-only":
                    time.sleep(seconds)
                else:
                    runner, prepared = runners[name]
                    out[name]["fwd_img_s"].append(time_slot(runner, prepared[8], 8, seconds).img_s)
            out[name]["decodes_s"].append(loop.count / loop.elapsed)
            if name != "decode-only":
                out[name]["serial_p50_ms"].append(serial_p50_ms(runner, photos, seconds))
                out[name]["pipeline_img_s"].append(pipeline_img_s(runner, photos, seconds, threads))
    return {name: {k: spread(v) for k, v in values.items() if v} for name, values in out.items()}


# --- shapes: the first call at each batch size after warming 1 and 8 -----------------------------


def shapes_phase(arch: str, threads: int, legacy: Path) -> dict[str, Any]:
    """Fresh runners (ONNX Runtime twice, the decision is about it); per size the first call, then two more."""
    rng = np.random.default_rng(1)
    makers: dict[str, tuple[Callable[[], Any], int]] = {
        "torch-cl": (lambda: TorchRunner(build_model(arch), channels_last=True), 1),
        "ort-all": (lambda: OrtRunner(legacy, threads=threads), 2),
        "ov-latency": (lambda: OpenVinoRunner(legacy, threads=threads, hint="LATENCY"), 1),
    }
    out: dict[str, Any] = {}
    for name, (make, repeats) in makers.items():
        try:
            per_repeat = []
            for _ in range(repeats):
                runner = make()
                inputs = {
                    b: runner.prepare(rng.standard_normal((b, 3, 224, 224), dtype=np.float32)) for b in range(1, 9)
                }
                for b in (1, 8):
                    for _ in range(3):
                        runner.run(inputs[b])
                sizes = {}
                for b in range(1, 9):
                    calls = []
                    for _ in range(3):
                        started = time.perf_counter()
                        runner.run(inputs[b])
                        calls.append(1000 * (time.perf_counter() - started))
                    sizes[b] = {"first_ms": calls[0], "then_ms": statistics.median(calls[1:])}
                per_repeat.append(sizes)
            out[name] = {
                b: {k: statistics.median(rep[b][k] for rep in per_repeat) for k in ("first_ms", "then_ms")}
                for b in range(1, 9)
            }
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  shapes {name} done", flush=True)
    return out


# --- memory: each configuration in its own process -----------------------------------------------

MEMORY_PROBES = (
    "torch-cl",
    "torch-cl+trim",
    "ort-all",
    "ort-all+trim",
    "ort-noarena",
    "ort-noarena+trim",
    "ort-nopattern",
    "ort-noprepack",
    "ov-latency",
)


def memory_probe(name: str, arch: str, threads: int, onnx_path: Path) -> dict[str, float]:
    """RSS after the runtime's imports, then after loading the model and running every batch size 1..8.
    A "+trim" name hands the C heap's free pages back (glibc malloc_trim) before each reading: what is
    left is what the runtime really holds, not what loading it left behind in the allocator."""
    import ctypes

    import psutil

    process = psutil.Process()
    trim = name.endswith("+trim")

    def rss() -> int:
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return int(process.memory_info().rss)

    if name.startswith("torch"):
        import torch
        import torchvision  # noqa: F401

        torch.set_num_threads(threads)
    elif name.startswith("ort"):
        import onnxruntime  # noqa: F401
    else:
        import openvino  # noqa: F401
    before = rss()
    if name.startswith("torch"):
        runner: Any = TorchRunner(build_model(arch), channels_last=True)
    elif name.startswith("ort"):
        runner = OrtRunner(
            onnx_path,
            threads=threads,
            arena="noarena" not in name,
            mem_pattern="nopattern" not in name,
            prepacking="noprepack" not in name,
        )
    else:
        runner = OpenVinoRunner(onnx_path, threads=threads, hint="LATENCY")
    loaded = rss()
    rng = np.random.default_rng(2)
    for _ in range(2):
        for b in range(1, 9):
            runner.run(runner.prepare(rng.standard_normal((b, 3, 224, 224), dtype=np.float32)))
    after = rss()
    mib = 1024 * 1024
    return {
        "loaded_mib": (loaded - before) / mib,
        "after_runs_mib": (after - before) / mib,
        "total_rss_mib": after / mib,
    }


def memory_phase(arch: str, threads: int, legacy: Path) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out: dict[str, Any] = {}
    for name in MEMORY_PROBES:
        command = [sys.executable, "-m", "benchmarks.runtimes", "--memory-probe", name, "--onnx", str(legacy)]
        command += ["--model", arch, "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=repo, env=env, timeout=300, check=False)
        try:
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[name] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        print(f"  memory {name} done", flush=True)
    return out


# --- the run and its report ----------------------------------------------------------------------


def make_exports(model: Any, needed: set[str], directory: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    files: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for key in [k for k in EXPORTS if k in needed]:
        opset, dynamo = EXPORTS[key]
        path = directory / f"{key}.onnx"
        try:
            seconds = export_onnx(model, path, opset=opset, dynamo=dynamo)
            files[key] = path
            size = sum(f.stat().st_size for f in directory.glob(f"{path.name}*"))  # with any external data file
            info[key] = {"seconds": seconds, "mib": size / 2**20}
        except Exception as exc:
            info[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  export {key}: {info[key]}", flush=True)
    return files, info


def _fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "—"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "| candidate | what | batch 8 img/s, median (min-max) | x torch-cl | CPU ms/img | batch 1 p50 ms "
        "| max abs dlogit | setup s |"
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = next(
        (r["b8_img_s"]["median"] for r in report["forward"] if r["name"] == "torch-cl" and "b8_img_s" in r), None
    )
    for r in report["forward"]:
        if r["error"]:
            lines.append(f"| {r['name']} | {r['what']} | failed: {r['error']} | | | | | {r['setup_s']:.1f} |")
            continue
        ratio = f"{r['b8_img_s']['median'] / base:.2f}" if base else "—"
        setup = f"{r['setup_s']:.1f}" + (
            f" (compile {', '.join(f'b{b} {s:.0f} s' for b, s in r['compile_s'].items())})" if r["compile_s"] else ""
        )
        lines.append(
            f"| {r['name']} | {r['what']} | {_fmt(r.get('b8_img_s'))} | {ratio} | {r.get('b8_cpu_ms_per_img', 0):.0f} "
            f"| {_fmt(r.get('b1_p50_ms'))} | {r['max_abs_dlogit']:.1e} | {setup} |"
        )
    if report.get("contention"):
        lines += [
            "",
            f"Forward batch 8 and decodes/s: while {report['settings']['decode_threads']} thread(s) decode the photo "
            f"mix flat out. Pipeline: {report['settings']['threads']} decode threads feed the forward, 8 at a time "
            "(the server at many clients). Serial: one client (decode, normalise, forward batch 1).",
            "",
        ]
        lines += ["| candidate | forward batch 8 img/s | decodes/s | pipeline img/s | serial p50 ms |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for name, c in report["contention"].items():
            lines.append(
                f"| {name} | {_fmt(c.get('fwd_img_s'))} | {_fmt(c.get('decodes_s'))} | {_fmt(c.get('pipeline_img_s'))} "
                f"| {_fmt(c.get('serial_p50_ms'))} |"
            )
    if report.get("shapes"):
        lines += [
            "",
            "First call at each batch size after warming only 1 and 8 (ms: first / the next calls' median):",
            "",
        ]
        lines += ["| runtime | " + " | ".join(f"b{b}" for b in range(1, 9)) + " |", "| --- |" + " --- |" * 8]
        for name, sizes in report["shapes"].items():
            cells = (
                [sizes["error"]]
                if "error" in sizes
                else [f"{sizes[b]['first_ms']:.0f} / {sizes[b]['then_ms']:.0f}" for b in range(1, 9)]
            )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("memory"):
        lines += ["", "RSS each configuration adds (own process; MiB over its runtime's imports):", ""]
        lines += ["| configuration | after load | after running b1..b8 | process RSS |", "| --- | --- | --- | --- |"]
        for name, m in report["memory"].items():
            if "error" in m:
                lines.append(f"| {name} | failed: {m['error']} | | |")
            else:
                lines.append(
                    f"| {name} | {m['loaded_mib']:.0f} | {m['after_runs_mib']:.0f} | {m['total_rss_mib']:.0f} |"
                )
    lines += [
        "",
        f"exports: {json.dumps(report['exports'])}",
        f"other processes' busy cores during the run: {report['other_cores']:.2f}; per forward round "
        f"{report.get('forward_other_cores')}, per contention round {report.get('contention_other_cores')}",
        "phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report.get("phase_s", {}).items()),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.harness.machine import CpuSnapshot, describe, other_cores

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    only = {n.strip() for n in args.only.split(",") if n.strip()} if args.only else None
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    started, machine0, cpu0 = time.perf_counter(), CpuSnapshot.take(), time.process_time()
    rng = np.random.default_rng(0)
    inputs = {8: rng.standard_normal((8, 3, 224, 224), dtype=np.float32)}
    inputs[1] = inputs[8][:1].copy()
    with torch.inference_mode():
        reference = build_model(args.model)(torch.from_numpy(inputs[8])).numpy()
    with tempfile.TemporaryDirectory(prefix="runtimes-") as tmp, ExitStack() as restore:
        # compile times are cold ones: inductor's on-disk cache would hide them on a second run
        restore.enter_context(mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}))
        restore.callback(torch.set_num_threads, threads_before)
        model = build_model(args.model)
        placeholder = {k: Path(tmp) / f"{k}.onnx" for k in EXPORTS}
        chosen = [c for c in candidates(args.model, args.threads, placeholder) if only is None or c.name in only]
        needed = {c.needs_export for c in chosen if c.needs_export}
        if set(phases) & {"contention", "shapes", "memory"} and (only is None or only & {"ort-all", "ov-latency"}):
            needed.add("legacy17")
        files, export_info = make_exports(model, needed, Path(tmp))
        chosen = [c for c in chosen if c.needs_export is None or c.needs_export in files] + [
            Candidate(c.name, c.what, _failed(export_info[c.needs_export]), c.needs_export)
            for c in chosen
            if c.needs_export and c.needs_export not in files
        ]
        report: dict[str, Any] = {"settings": vars(args), "machine": describe(), "exports": export_info}
        report["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        timed = report["phase_s"] = {}
        mark = time.perf_counter()
        live = setup(chosen, inputs, reference)
        timed["exports+setup"], mark = time.perf_counter() - started, time.perf_counter()
        if "forward" in phases:
            forward_rounds = Rounds(args.rounds, args.quiet_wait)
            forward_phase(live, forward_rounds, args.seconds)
            report["forward_other_cores"] = forward_rounds.other_cores
            timed["forward"], mark = time.perf_counter() - mark, time.perf_counter()
        report["forward"] = [result.summary() for result, _, _ in live]
        if "contention" in phases:
            contention_rounds = Rounds(args.rounds, args.quiet_wait)
            report["contention"] = contention_phase(
                live, contention_rounds, args.seconds, args.decode_threads, args.threads
            )
            report["contention_other_cores"] = contention_rounds.other_cores
            timed["contention"], mark = time.perf_counter() - mark, time.perf_counter()
        del live  # the sessions go before the fresh ones of the next phases
        if "shapes" in phases and "legacy17" in files:
            report["shapes"] = shapes_phase(args.model, args.threads, files["legacy17"])
            timed["shapes"], mark = time.perf_counter() - mark, time.perf_counter()
        if "memory" in phases and "legacy17" in files:
            report["memory"] = memory_phase(args.model, args.threads, files["legacy17"])
            timed["memory"] = time.perf_counter() - mark
    report["other_cores"] = other_cores(machine0, cpu0)
    report["wall_s"] = time.perf_counter() - started
    return report


def _failed(info: dict[str, Any]) -> Callable[[], Any]:
    def build() -> Any:
        raise RuntimeError(f"export failed: {info.get('error')}")

    return build


def main(argv: Sequence[str] | None = None) -> int:
    from service.cores import usable_cpus

    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="intra-op threads of every runtime")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="batch-8 seconds per candidate per round (batch 1: half)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="round-robin rounds")
    parser.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    parser.add_argument("--decode-threads", type=int, default=1, help="flat-out decode threads (contention phase)")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to S s for a quiet machine each round")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.model, args.threads, Path(args.onnx))))
        return 0
    report = run(args)
    print(format_report(report))
    print(
        f"\nwall {report['wall_s']:.0f} s, {report['machine'].get('cpu')}, "
        f"commit {report['machine'].get('commit')}, {report['date_utc']} UTC"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
