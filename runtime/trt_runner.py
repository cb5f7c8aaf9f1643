"""TensorRT backend: one serialized engine per graph, device memory through cuda-python (no torch, no pycuda).

    from runtime.backends import make_runner
    runner = make_runner("engines/demo/trt-fp16/llm_decoder.engine", backend="tensorrt")
    out = runner.run(feeds, keep=["present_key_0", ...])   # kept outputs stay on the GPU as DeviceTensor
    out = runner.run({**feeds, "past_key_0": out["present_key_0"], ...})   # ... and go back in without a copy

Written against the Python API common to TensorRT 10.3 (JetPack 6) and 11.x: `Runtime.deserialize_cuda_engine`,
`ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_shape /
get_tensor_profile_shape / num_optimization_profiles / create_execution_context`, and
`IExecutionContext.set_optimization_profile_async / set_input_shape / get_tensor_shape / set_tensor_address /
execute_async_v3`. Nothing here uses the APIs TensorRT 11 removed (weak-typing flags, `device_memory_size`).

One execution context per optimization profile: the decoder graphs have two (context: many tokens and an empty
cache; generation: one token against the cache), and each call runs on the context whose profile contains every
input's shape (`pick_profile`). Memory: inputs given as numpy are copied to the GPU for the call; outputs are
allocated per call at the shape TensorRT infers from the inputs. Copies are synchronous `cudaMemcpy` calls on the
legacy default stream, which orders them with the runner's (blocking) stream; the engine runs on its own stream
and is synchronized before `run` returns.

`import tensorrt` and cuda-python happen inside functions only, so this module imports anywhere.
"""
from pathlib import Path

import numpy as np

from runtime.errors import BackendError, EngineFolderError
from runtime.runner import DeviceArray, Runner

NO_TENSORRT = (
    "TensorRT's Python package is not usable here ({reason}). Install it where the engines will run: on x86-64 "
    "with an NVIDIA driver, `pip install \".[trt]\"` (the TensorRT wheels from PyPI and cuda-python); "
    "on a Jetson, the TensorRT Python bindings of the JetPack (`sudo apt install python3-libnvinfer`; JetPack 6 "
    "ships TensorRT 10.3, which the PyPI wheels do not cover; in a virtualenv, create it with "
    "--system-site-packages). Without TensorRT, build `--target onnx-fp16` or `--target onnx-int8`: the same "
    "precision, run by ONNX Runtime (backend='onnxruntime')."
)
NO_CUDA_PYTHON = (
    "cuda-python is not installed ({reason}); the TensorRT backend manages GPU memory through it. Install it with "
    "`pip install cuda-python` choosing the major version of your CUDA (e.g. `pip install \"cuda-python>=12,<13\"` "
    "for CUDA 12 / JetPack 6). Or build `--target onnx-fp16`/`onnx-int8` and run them with ONNX Runtime."
)
NO_GPU = (
    "no NVIDIA GPU is usable ({reason}). TensorRT needs an NVIDIA GPU and its driver: check that `nvidia-smi` (on "
    "Jetson: `tegrastats`) sees the device and that CUDA_VISIBLE_DEVICES does not hide it. Without a GPU, build "
    "`--target onnx-fp16`/`onnx-int8` and run them with ONNX Runtime on the CPU."
)


def _rebuild(folder) -> str:
    """The build command for an engine folder (engines/<name>/<target>/): its own trt target, else trt-fp16."""
    name = Path(folder).name
    return f"python -m export.build --model CHECKPOINT --target {name if name.startswith('trt') else 'trt-fp16'}"


# ---------------------------------------------------------------- CUDA runtime through cuda-python
class CudaRuntime:
    """The few CUDA runtime calls this backend needs, through cuda-python.

    cuda-python >= 12.6 (and 13.x) has them in `cuda.bindings.runtime`; older releases in `cuda.cudart`. Every call
    returns a tuple (error, *values).
    """

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt  # cuda-python < 12.6; raises ImportError when cuda-python is absent
        self.rt = rt

    def _call(self, result, what: str):
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            try:
                name = self.rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                name = str(err)
            raise BackendError(f"CUDA {what} failed: {name}")
        return values[0] if len(values) == 1 else (values or None)

    def device_count(self) -> int:
        return int(self._call(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def device_info(self) -> dict:
        device = self._call(self.rt.cudaGetDevice(), "cudaGetDevice")
        prop = self._call(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        runtime = self._call(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        driver = self._call(self.rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
        return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}",
                "cuda": _cuda_version(runtime), "cuda_driver": _cuda_version(driver)}

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), f"cudaMalloc of {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, dst: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpy(dst, array.ctypes.data, array.nbytes, kind), "cudaMemcpy host to device")

    def dtoh(self, array: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpy(array.ctypes.data, src, array.nbytes, kind), "cudaMemcpy device to host")

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call(self.rt.cudaMemcpy(dst, src, nbytes, kind), "cudaMemcpy device to device")

    def stream_create(self):
        return self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_sync(self, stream) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream) -> None:
        self._call(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12060) as '12.6'."""
    return f"{v // 1000}.{(v % 1000) // 10}"


_CUDA: CudaRuntime | None = None  # one per process; tests swap in a fake


def _cuda() -> CudaRuntime:
    global _CUDA
    if _CUDA is None:
        _CUDA = CudaRuntime()
    return _CUDA


def import_tensorrt(error: type = BackendError):
    """`import tensorrt`, and check that cuda-python and a GPU are there; else raise `error` saying what to install."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing under the bindings
        raise error(NO_TENSORRT.format(reason=f"import tensorrt: {type(e).__name__}: {e}")) from None
    if not hasattr(trt, "Runtime") or not hasattr(trt, "Builder"):
        raise error(NO_TENSORRT.format(reason=f"the installed 'tensorrt' package ({getattr(trt, '__file__', '?')}) "
                                              f"has no TensorRT bindings, only a placeholder"))
    try:
        cuda = _cuda()
    except ImportError as e:
        raise error(NO_CUDA_PYTHON.format(reason=str(e))) from None
    try:
        count = cuda.device_count()
    except BackendError as e:  # cudaErrorNoDevice, cudaErrorInsufficientDriver, ...
        raise error(NO_GPU.format(reason=str(e))) from None
    if count < 1:
        raise error(NO_GPU.format(reason="cudaGetDeviceCount found 0 devices"))
    return trt


def current_hardware() -> dict:
    """{"tensorrt", "gpu", "compute_capability", "cuda", "cuda_driver"} of this machine (current CUDA device)."""
    trt = import_tensorrt()
    return {"tensorrt": trt.__version__, **_cuda().device_info()}


COMPARED = {"tensorrt": "TensorRT version", "compute_capability": "compute capability", "gpu": "GPU"}


def check_compatible(build_info: dict, folder) -> None:
    """Refuse engines built with another TensorRT version or for another GPU (TensorRT plans are not portable).

    build_info: the engine folder's manifest.build.tensorrt, as written by `export.trt_build.hardware_info()`.
    """
    here = current_hardware()
    wrong = [k for k in COMPARED if str(build_info.get(k)) != str(here.get(k))]
    if not wrong:
        return
    diffs = "; ".join(f"{COMPARED[k]}: built with {build_info.get(k, 'not recorded')!s}, this machine has {here.get(k)}"
                      for k in wrong)
    raise EngineFolderError(
        f"the TensorRT engines in {folder} were built for another setup ({diffs}). TensorRT engines only run on the "
        f"TensorRT version and GPU they were built with; rebuild them on this device with "
        f"`{_rebuild(folder)}`"
    )


# ---------------------------------------------------------------- device tensors
class DeviceTensor(DeviceArray):
    """A C-contiguous array in GPU memory: `.shape`, `.dtype`, `.numpy()` (copy to the host).

    Owns its allocation (freed on `__del__` or `free()`), or views part of another DeviceTensor's (a slice along
    axis 0), keeping that one alive. Indexing with an integer array gathers rows along axis 0 into a new tensor
    with one device-to-device copy per row (KVCache.reorder for beam search: a few rows, no host round trip).
    """

    def __init__(self, shape, dtype, ptr: int | None = None, base: "DeviceTensor | None" = None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._cuda = _cuda()
        self._base = base  # a view keeps the tensor owning the memory alive
        self._owned = ptr is None
        if ptr is None:
            ptr = self._cuda.malloc(self.nbytes) if self.nbytes else 0
        self.ptr = int(ptr)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "DeviceTensor":
        array = np.ascontiguousarray(array)
        tensor = cls(array.shape, array.dtype)
        if array.nbytes:
            tensor._cuda.htod(tensor.ptr, array)
        return tensor

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            self._cuda.dtoh(out, self.ptr)
        return out

    def __getitem__(self, index) -> "DeviceTensor":
        row = self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step == 1:  # contiguous rows: a view, no copy
                count = max(0, stop - start)
                return DeviceTensor((count, *self.shape[1:]), self.dtype, self.ptr + start * row if count else 0,
                                    base=self._base if self._base is not None else self)
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise TypeError(f"DeviceTensor supports indexing along axis 0 by a slice or a 1-D integer array, "
                            f"not {index!r}")
        if index.size and (index.max() >= self.shape[0] or index.min() < -self.shape[0]):
            raise IndexError(f"index {index.tolist()} out of range for axis 0 of size {self.shape[0]}")
        out = DeviceTensor((len(index), *self.shape[1:]), self.dtype)
        for i, src in enumerate(index % max(self.shape[0], 1)):
            if row:
                self._cuda.dtod(out.ptr + i * row, self.ptr + int(src) * row, row)
        return out

    def free(self) -> None:
        if self._owned and self.ptr:
            self._cuda.free(self.ptr)
        self.ptr, self._owned, self._base = 0, False, None

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown, or the CUDA context already gone
            pass

    def __repr__(self):
        return f"DeviceTensor(shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x})"


# ---------------------------------------------------------------- profile selection
def _flag_for(axis: str | None, graph: str) -> str:
    """The `python -m export.build` option that raises the limit of a named axis (export.specs.Limits)."""
    if axis == "batch":
        return "--max-batch"
    if axis in ("text", "past", "past+text") and graph.startswith("qformer"):
        return "max_qformer_tokens (export.specs.Limits, no CLI option; at most the checkpoint's max_text_tokens)"
    if axis == "text":
        return "--max-prompt-tokens"
    if axis == "past":
        return "--max-new-tokens (or --max-prompt-tokens)"
    if axis == "past+text":
        return "--max-prompt-tokens or --max-new-tokens"
    return "--max-batch, --max-prompt-tokens or --max-new-tokens"


def _fmt_range(lo, hi) -> str:
    return "[" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + "]"


def pick_profile(shapes: dict, profile_ranges: list, axis_names: dict | None = None, graph: str = "engine") -> int:
    """Index of the first optimization profile whose [min, max] contains every input's shape.

    shapes: {input: shape}; profile_ranges: per profile {input: (min, [opt,] max)} (the engine's
    get_tensor_profile_shape, or GraphSpec.trt_profiles()); axis_names: {input: {dim: axis name}} (the manifest's
    dynamic_axes) to name the build option to raise in the error; without it dimension 0 is taken for the batch.
    Raises ValueError naming the input, its shape and each profile's range when none fits.
    """
    axis_names = axis_names or {}
    report, best = [], None
    for p, ranges in enumerate(profile_ranges):
        bad = []
        for name, r in ranges.items():
            if name not in shapes:
                continue
            shape, lo, hi = tuple(shapes[name]), tuple(r[0]), tuple(r[-1])
            if len(shape) != len(lo):
                bad.append((name, shape, lo, hi, None, f"rank {len(shape)}, the engine expects {len(lo)}"))
                continue
            for d, (s, a, b) in enumerate(zip(shape, lo, hi)):
                if not a <= s <= b:
                    axis = axis_names.get(name, {}).get(d, "batch" if d == 0 and not axis_names else None)
                    label = f"axis {axis!r}" if axis else f"dim {d}"
                    bad.append((name, shape, lo, hi, axis, f"{label} is {s}, allowed {a}..{b}"))
                    break
        if not bad:
            return p
        if best is None or len(bad) < len(best):
            best = bad
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        report.append(f"  profile {p}: " + "; ".join(
            f"'{n}' {list(s)} not in {_fmt_range(lo, hi)} ({why})" for n, s, lo, hi, _, why in bad[:3]) + more)
    if not profile_ranges:
        return 0
    axes = {axis for *_, axis, _ in best}
    flags = sorted({_flag_for(a, graph) for a in axes - {"past+text"}} or {_flag_for("past+text", graph)})
    raise ValueError(
        f"{graph}: no optimization profile of the TensorRT engine accepts these input shapes:\n" + "\n".join(report)
        + f"\nThese limits were fixed when the engine was built; to serve larger inputs rebuild it with a larger "
          f"{' / '.join(flags)} (`python -m export.build --model CHECKPOINT --target trt-fp16 ...`), or split the "
          f"request (smaller batches, shorter prompts, fewer new tokens)."
    )


# ---------------------------------------------------------------- the runner
class TrtRunner(Runner):
    """Runs one serialized TensorRT engine (`.engine` plan).

    build_info: the engine folder's manifest.build.tensorrt; when given, checked against this machine before the plan
    is deserialized (`check_compatible`). dynamic_axes: the manifest's {tensor: {dim: axis}} of the graph, only
    used to name the build option in out-of-range errors.
    """

    def __init__(self, path, build_info: dict | None = None, dynamic_axes: dict | None = None):
        self.build_info = build_info
        self.dynamic_axes = {n: {int(d): a for d, a in axes.items()} for n, axes in (dynamic_axes or {}).items()}
        super().__init__(path)

    def _load(self):
        trt = import_tensorrt()
        if self.build_info is not None:
            check_compatible(self.build_info, self.path.parent)
        if not self.path.is_file():
            raise EngineFolderError(f"TensorRT engine not found: {self.path}; rebuild the engine folder with "
                                    f"`{_rebuild(self.path.parent)}`")
        self._cuda = _cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._logger)
        engine = self._trt_runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineFolderError(
                f"TensorRT {trt.__version__} could not load {self.path} (see its log above): the plan was built by "
                f"another TensorRT version or for another GPU, or the file is corrupt; rebuild it on this device "
                f"with `{_rebuild(self.path.parent)}`"
            )
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError:
                raise BackendError(f"{self.path.name}: tensor '{n}' has type {engine.get_tensor_dtype(n)}, which numpy "
                                   f"cannot hold; the graph's inputs and outputs must be fp32/fp16/int64/int32/bool "
                                   f"(keep bf16/fp8 inside the graph)") from None
        dynamic = [n for n in self._inputs if any(int(d) < 0 for d in engine.get_tensor_shape(n))]
        self.profile_ranges = [
            {n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, p)) for n in dynamic}
            for p in range(engine.num_optimization_profiles)
        ]
        self._stream = self._cuda.stream_create()
        self._contexts = []
        for p in range(engine.num_optimization_profiles):
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"{self.path.name}: TensorRT could not create an execution context (out of GPU "
                                   f"memory?); close other GPU programs or build with a smaller --max-batch")
            if p and not context.set_optimization_profile_async(p, int(self._stream)):
                raise BackendError(f"{self.path.name}: TensorRT refused optimization profile {p}")
            self._contexts.append(context)
        self._cuda.stream_sync(self._stream)
        # TensorRT needs a non-null address even for an empty tensor (a cache of length 0, a soft prompt of 0 rows)
        self._dummy = DeviceTensor((256,), np.uint8)

    def _names(self):
        return list(self._inputs), list(self._outputs)

    def _infer(self, feeds, keep=frozenset()):
        shapes = {n: tuple(feeds[n].shape) for n in self._inputs}
        profile = pick_profile(shapes, self.profile_ranges, self.dynamic_axes, graph=self.path.name)
        context = self._contexts[profile]
        alive = []  # device copies of numpy inputs, freed after the call
        for name in self._inputs:
            value = feeds[name]
            if isinstance(value, DeviceTensor):
                if value.dtype != self._dtypes[name]:
                    raise ValueError(f"{self.path.name}: input '{name}' is a {value.dtype} device tensor, the engine "
                                     f"takes {self._dtypes[name]}")
                tensor = value  # bound directly: a KV cache from the previous call stays where it is
            else:
                tensor = DeviceTensor.from_numpy(np.asarray(value, dtype=self._dtypes[name]))
                alive.append(tensor)
            if not context.set_input_shape(name, tensor.shape):
                raise ValueError(f"{self.path.name}: TensorRT rejected shape {list(tensor.shape)} for input '{name}' "
                                 f"(engine shape {list(self.engine.get_tensor_shape(name))}, profile {profile})")
            context.set_tensor_address(name, tensor.ptr or self._dummy.ptr)
        outputs = []
        for name in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.path.name}: output '{name}' has a data-dependent shape {list(shape)}, "
                                   f"which this runner does not support")
            out = DeviceTensor(shape, self._dtypes[name])
            context.set_tensor_address(name, out.ptr or self._dummy.ptr)
            outputs.append(out)
        if not context.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self.path.name}: TensorRT execution failed (see its log above)")
        self._cuda.stream_sync(self._stream)
        del alive
        return [out if name in keep else out.numpy() for name, out in zip(self._outputs, outputs)]

    def __del__(self):
        try:
            self._contexts = []
            self._cuda.stream_destroy(self._stream)
        except Exception:
            pass
