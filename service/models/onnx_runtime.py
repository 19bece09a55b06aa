"""The ONNX Runtime runtime: an `InferenceSession` over an ONNX file, the default on a CPU.

Measured on the 2-core box (docs/benchmarks.md), ONNX Runtime's CPU provider runs a ResNet forward
1.4x (batch 8) to 1.9x (batch 1) as fast as eager torch, with the same outputs within 1e-5.
Normalisation and softmax stay in torch around the session, shared with the torch runtime, so a
file from the ONNX model zoo (logits out, normalised float in) runs unchanged.

On CUDA (`--runtime onnxruntime` with the `onnxruntime-gpu` build) the input and output stay on the
GPU through IO binding, on torch's current stream, so no copy goes through the host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from service import cores
from service.errors import StartupError
from service.imaging import Preprocessing
from service.models.runtimes import ONNXRUNTIME, RuntimeInfo, RuntimeOutputs, channel_constants, normalise

logger = logging.getLogger(__name__)

T = TypeVar("T")

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def import_onnxruntime(model: str) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise StartupError(
            f"{model}: --runtime onnxruntime, but onnxruntime is not installed; "
            "`pip install onnxruntime` (or onnxruntime-gpu on CUDA), or use --runtime torch"
        ) from None
    return onnxruntime


def session_options(ort: Any, *, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One session runs one batch at a time (the runner's forward thread): no inter-op pool needed.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The decode pool shares these cores: intra-op threads that spin between batches take CPU
    # from decoding for nothing (measured in docs/benchmarks.md, "Runtime explorations").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No arena: it keeps the largest batch's activations for good (about 55 MB at batch 8 for a
    # ResNet-18), while glibc reuses the same pages as fast (docs/benchmarks.md, "Runtime explorations").
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the operator's
    return options


class OnnxRuntime:
    def __init__(
        self,
        file: Path,
        preprocessing: Preprocessing,
        *,
        name: str,
        device: torch.device,
        threads: int,
        file_sha256: str,
        num_parameters: int,
        quantization: str = "none",
        multi_label: bool = False,
    ) -> None:
        ort = import_onnxruntime(name)
        self.device = device
        self._on_cuda = device.type == "cuda"
        providers: list[Any] = [CPU_PROVIDER]
        if self._on_cuda:
            if CUDA_PROVIDER not in ort.get_available_providers():
                raise StartupError(
                    f"{name}: --runtime onnxruntime on {device}, but this onnxruntime has no CUDA provider; "
                    "install onnxruntime-gpu in place of onnxruntime, or use --runtime torch"
                )
            stream = torch.cuda.current_stream(device).cuda_stream
            # Torch's stream: the session's kernels then queue behind the batch's copy and normalisation.
            cuda_options = {"device_id": device.index or 0, "user_compute_stream": str(stream)}
            providers = [(CUDA_PROVIDER, cuda_options), CPU_PROVIDER]
        try:
            # From the path, not from bytes: a session made from bytes keeps them referenced, which
            # is the model's size again in resident memory for nothing.
            self._session = _in_a_compute_thread(
                lambda: ort.InferenceSession(
                    str(file), sess_options=session_options(ort, threads=threads), providers=providers
                )
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise StartupError(f"{name}: onnxruntime cannot load {file}: {str(exc).splitlines()[0]}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 2:
            raise StartupError(
                f"{name}: {file} must take one image batch and give logits and pooled features; "
                f"it has {len(inputs)} inputs and {len(outputs)} outputs"
            )
        self._input = inputs[0].name
        self._outputs = [output.name for output in outputs]
        classes, features = outputs[0].shape[-1], outputs[1].shape[-1]
        if not isinstance(classes, int) or not isinstance(features, int):
            raise StartupError(f"{name}: {file}'s outputs have no fixed sizes ({outputs[0].shape}, {outputs[1].shape})")
        self._num_classes = classes
        self._scores = torch.sigmoid if multi_label else _softmax
        self._feature_dim = features
        # A file made for batch 1 only (some zoo files are) runs a batch one image at a time.
        batch = inputs[0].shape[0]
        self._fixed_batch = batch if isinstance(batch, int) else None
        self._num_parameters = num_parameters
        self._mean, self._std = channel_constants(preprocessing, device)
        self._info = RuntimeInfo(
            ONNXRUNTIME,
            ort.__version__,
            file=file,
            file_sha256=file_sha256,
            providers=tuple(self._session.get_providers()),
            quantization=quantization,
        )

    @property
    def info(self) -> RuntimeInfo:
        return self._info

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.outputs(batch).probabilities

    @torch.inference_mode()
    def outputs(self, batch: torch.Tensor) -> RuntimeOutputs:
        x = normalise(batch, self._mean, self._std).contiguous()
        run = self._run_on_cuda if self._on_cuda else self._run_on_cpu
        if self._fixed_batch is not None and x.shape[0] != self._fixed_batch:
            parts = [run(part) for part in torch.split(x, self._fixed_batch)]
            logits, features = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            logits, features = run(x)
        return RuntimeOutputs(self._scores(logits), features)

    def warm(self, batch: torch.Tensor) -> None:
        self.outputs(batch)

    def _run_on_cpu(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # .numpy() shares the tensor's memory: the session reads the batch in place.
        logits, features = self._session.run(self._outputs, {self._input: x.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(features).flatten(1)

    def _run_on_cuda(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = x.shape[0]
        logits = torch.empty((count, self._num_classes), dtype=torch.float32, device=self.device)
        features = torch.empty((count, self._feature_dim), dtype=torch.float32, device=self.device)
        binding = self._session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self._input, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for name, tensor in zip(self._outputs, (logits, features), strict=True):
            binding.bind_output(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        self._session.run_with_iobinding(binding)
        return logits, features


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)


def _in_a_compute_thread(create: Callable[[], T]) -> T:
    """`create()` on a thread of the compute threads' priority: the session starts its intra-op
    threads there, and a new thread inherits its creator's priority (service/cores.py)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        cores.lower_thread_priority()
        try:
            outcome.append(create())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="onnxruntime-setup")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
