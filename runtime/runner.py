"""The runner interface: one graph, a dict of inputs in, a dict of outputs out (like polygraphy's BaseRunner).

Backends subclass `Runner` and fill in three small hooks: `_load` (open the graph), `_names` (its input and
output names) and `_infer` (run it). `run(feeds, keep=names)` returns the named outputs as `DeviceArray`s, kept
in the backend's memory (TensorRT's GPU buffers; ONNX Runtime's OrtValues on its provider's device, by IO binding),
that the next call takes back as inputs as they are, so a KV cache never leaves the GPU; other outputs are numpy.

    from runtime.backends import make_runner
    runner = make_runner("engines/demo/onnx/vision.onnx", backend="onnxruntime")
    outputs = runner.run({"pixel_values": x})      # {"image_embeds": array}

This module imports nothing but numpy: `runtime.ort_runner` (ONNX Runtime) and `runtime.trt_runner` (TensorRT)
build on it, and `runtime.backends.make_runner` opens a graph on either.
"""
from pathlib import Path
from typing import Callable

import numpy as np


class Runner:
    """Base class: checks feeds against the graph's declared inputs, then calls `_infer`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._load()
        self.input_names, self.output_names = self._names()

    def _load(self) -> None:
        raise NotImplementedError

    def _names(self) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray], keep: frozenset = frozenset()) -> list[np.ndarray]:
        """Outputs in `output_names` order; those named in `keep` may stay in the backend's memory."""
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray], keep=()) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing} (expects {self.input_names})")
        outputs = self._infer({n: feeds[n] for n in self.input_names}, frozenset(keep))
        return dict(zip(self.output_names, outputs))


class DeviceArray:
    """An output a backend keeps in its own memory (`run(..., keep=...)`) and takes back as an input as it is: what
    the decoders ask of a cache is `.shape`, rows gathered by an index array (`a[index]`, done where the array is)
    and `np.asarray(a)` (a copy to the host where the memory is not the host's). Subclasses give `shape`, `numpy()`
    and `__getitem__`: TensorRT's `DeviceTensor` and ONNX Runtime's `OrtArray`."""

    __slots__ = ()
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)


# How a pipeline opens each graph: factory(path of the graph's file, graph name) -> Runner. The default opens
# it on the folder's backend; the exporter passes its own to record feeds or to run other graph files.
RunnerFactory = Callable[[Path, str], Runner]
