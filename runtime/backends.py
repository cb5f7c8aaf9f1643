"""Opening a graph on a backend: `make_runner(path, backend, **options)` gives the backend's `runtime.runner.Runner`.

    from runtime.backends import make_runner
    runner = make_runner("engines/demo/onnx/vision.onnx", backend="onnxruntime", providers=["CPUExecutionProvider"])
    runner = make_runner("engines/demo/trt-fp16/vision.engine", backend="tensorrt", build_info=...)

A backend's module is imported only when a graph is opened on it: a Jetson without onnxruntime, or a CPU machine
without TensorRT, imports this module all the same.
"""
from pathlib import Path

from runtime.errors import BackendError
from runtime.runner import Runner


def _onnxruntime_runner(path, **kwargs) -> Runner:
    from runtime.ort_runner import OrtRunner

    return OrtRunner(path, **kwargs)


def _tensorrt_runner(path, **kwargs) -> Runner:
    from runtime.trt_runner import TrtRunner

    return TrtRunner(path, **kwargs)


BACKENDS = {"onnxruntime": _onnxruntime_runner, "tensorrt": _tensorrt_runner}


def make_runner(path, backend: str = "onnxruntime", **kwargs) -> Runner:
    """A runner for the graph file at `path` on `backend` ("onnxruntime" or "tensorrt"; kwargs go to its runner)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](Path(path), **kwargs)
