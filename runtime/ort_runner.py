"""ONNX Runtime's runner (the interface is `runtime.runner.Runner`; `runtime.backends.make_runner` opens a graph on
either backend), its execution providers and session options, and the arrays it keeps on a provider's device.

    from runtime.ort_runner import OrtRunner
    runner = OrtRunner("engines/demo/onnx/vision.onnx", providers=["CPUExecutionProvider"])
    outputs = runner.run({"pixel_values": x})      # {"image_embeds": array}
"""
import functools
import os

import numpy as np

from runtime.errors import BackendError, EngineFolderError
from runtime.runner import DeviceArray, Runner


@functools.cache
def int8_products_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's fast int8 products may saturate on this CPU, so that its sessions must ask for
    exact ones (`session.x64quantprecision`). On x86 CPUs without AVX-512 VNNI (AVX2, AVX-512 before Cascade
    Lake, AMD before Zen 4) its uint8 x int8 kernels add pairs of products in int16 (VPMADDUBSW), which
    saturates: on such a CPU the tiny preset's int8 vision graph was off by 0.13 of its output range instead of
    0.016. The option makes it compute those products as uint8 x uint8 instead, which costs time even where
    nothing saturates: on a Zen 4 CPU (AVX-512 VNNI, whose VPDPBUSD adds the products in int32) dynamic int8 ITM
    took 53.6 ms instead of 30.6 (16 pairs, 1 thread). So it is asked for unless the CPU is known to have AVX-512
    VNNI (read from /proc/cpuinfo; elsewhere, and when that file cannot be read, it is asked for: exact first; on
    ARM CPUs it changes nothing)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return "avx512_vnni" not in flags.split()


class OrtRunner(Runner):
    """ONNX Runtime on the CPU, or on the execution providers given (`providers`, as ONNX Runtime takes them:
    names, or (name, options) pairs, in order of preference).

    Outputs named in `run(..., keep=...)` (KV caches, cross keys/values) are returned as `OrtArray`s that stay on
    the first provider's device (IO binding) and are bound as they are when fed back: with the CUDA provider a
    decoder's cache does not cross PCIe between steps; on the CPU the same path runs (the tests' path).

    Thread pools: by default every session has its own intra-op pool whose threads sleep between runs instead
    of spinning (spinning pools of graphs that run back to back steal the cores from each other).
    `shared_pool=True` makes every session of the process share one pool, which is faster still (small preset,
    2 cores: about 70 against 80 ms per caption) but is process-wide: once it exists, ONNX Runtime refuses any
    session with a pool of its own, including sessions that other code in the process opens later. So the
    library leaves it off, and the command-line tools, which own their process, turn it on.

    `memory_arena=False` turns off ONNX Runtime's CPU memory arena, which otherwise keeps the memory of the largest
    call made so far for the next ones (faster; the build's checks turn it off to keep their peak low).
    `priority_order=True` runs nodes in ONNX Runtime's priority-based order, which runs a node soon after its
    inputs are ready (the INT8 calibration's graphs, whose extra reductions the default order runs last).
    """

    _global_pool: bool = False  # whether this process's ONNX Runtime environment has the shared pool

    def __init__(self, path, providers=None, threads: int | None = None, shared_pool: bool = False,
                 memory_arena: bool = True, priority_order: bool = False):
        self.providers = check_providers(providers)
        self.device = provider_device(self.providers)
        self.threads, self.shared_pool, self.memory_arena = threads, shared_pool, memory_arena
        self.priority_order = priority_order
        super().__init__(path)

    @classmethod
    def _create_shared_pool(cls, threads: int | None) -> bool:
        """Create the process-wide pool; it must exist before the process's first session."""
        if not cls._global_pool:
            import onnxruntime.capi._pybind_state as C

            try:
                C.set_global_thread_pool_sizes(threads or 0, 1)  # 0: one thread per core
                cls._global_pool = True
            except Exception:  # sessions were already made in this process with pools of their own
                pass
        return cls._global_pool

    def _load(self):
        import onnxruntime as ort

        shared = bool(self.shared_pool and self._create_shared_pool(self.threads))
        opts = session_options(self.threads, shared, self.memory_arena, self.priority_order)
        # ONNX Runtime's CPU kernel for the residual + LayerNorm it fuses into SkipLayerNormalization is 2.5-4x
        # slower than the Add and LayerNormalization it replaces (1.32, 2 cores: 1.07 against 0.28 ms for
        # 1024 x 256 rows, 7.4 against 1.9 ms for ViT-g's 2056 x 1408), so on the CPU the fusion is left off
        # (the re-rank graph: 15% faster). Other providers have fast kernels for it.
        disabled = ["SkipLayerNormFusion"] if provider_name(self.providers[0]) == "CPUExecutionProvider" else []
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers,
                                                disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise EngineFolderError(
                f"ONNX Runtime could not load {self.path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                f"the file is corrupt or from an incompatible exporter: rebuild the engine folder with "
                f"`python -m export.build`"
            ) from None

    def _names(self):
        return [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]

    def _infer(self, feeds, keep=frozenset()):
        if not keep and not any(isinstance(v, OrtArray) for v in feeds.values()):
            return self.session.run(self.output_names, feeds)
        # IO binding: inputs that are OrtArrays are bound where they are, outputs named in `keep` stay on the
        # provider's device as OrtArrays (a KV cache fed back next step never crosses to the host), the others
        # come back as numpy
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, OrtArray):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, *(self.device if name in keep else ("cpu", 0)))
        self.session.run_with_iobinding(binding)
        return [OrtArray(v, self.device) if name in keep else v.numpy()
                for name, v in zip(self.output_names, binding.get_outputs())]


# Where each execution provider keeps the tensors it computes: IO binding's (device type, device id). Providers not
# named here compute on the host's memory.
PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]  # a name, or (name, options)


def check_providers(providers) -> list:
    """`providers` (default: the CPU's), checked against what this onnxruntime package has: ONNX Runtime itself
    only warns and falls back to the CPU for a provider it lacks, which would hide a wrong install."""
    if not providers:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [provider_name(p) for p in providers if provider_name(p) not in available]
    if missing:
        hint = (" (install `onnxruntime-gpu` instead of `onnxruntime` for CUDA and TensorRT; on a Jetson, the "
                "onnxruntime-gpu wheel for its JetPack)" if any(m in PROVIDER_DEVICES for m in missing) else "")
        raise BackendError(f"ONNX Runtime provider(s) {', '.join(missing)} not available in this onnxruntime "
                           f"install, which has {', '.join(available)}{hint}")
    return list(providers)


def provider_device(providers) -> tuple[str, int]:
    """(device type, device id) of the first provider's memory, as IO binding names it."""
    first = providers[0]
    kind = PROVIDER_DEVICES.get(provider_name(first), "cpu")
    options = {} if isinstance(first, str) else dict(first[1])
    return kind, int(options.get("device_id", 0)) if kind != "cpu" else 0


# Gather(data, index) along axis 0, the whole ONNX model (opset 13), with the element type's code (TensorProto:
# 1 float32, 10 float16, 16 bfloat16) in its two {t} slots: how an OrtArray on a device gathers its rows there
# (beam search's reordering, rows leaving a batch). tests/test_providers.py rebuilds it with onnx.helper.
GATHER_MODEL = ("080712003a640a280a04646174610a05696e6465781204726f777322064761746865722a0b0a04617869731800a00102"
                "12066761746865725a0c0a046461746112040a0208{t}5a140a05696e646578120b0a09080712050a0312016e620c0a04"
                "726f777312040a0208{t}42040a00100d")
ELEMENT_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(bfloat16)": 16}


# The provider that gathers on each device type (CUDA's, also where TensorRT's provider computes).
DEVICE_PROVIDERS = {"cuda": "CUDAExecutionProvider"}


@functools.cache
def _gather_session(element_type: int, device: tuple[str, int]):
    import onnxruntime as ort

    model = bytes.fromhex(GATHER_MODEL.format(t=f"{element_type:02x}"))
    kind, device_id = device
    providers = [(DEVICE_PROVIDERS[kind], {"device_id": device_id})] if kind in DEVICE_PROVIDERS else \
        ["CPUExecutionProvider"]
    return ort.InferenceSession(model, session_options(), providers=providers)


def gather_rows(value, index: np.ndarray, device: tuple[str, int]):
    """value[index] along axis 0 (an OrtValue in, an OrtValue out), computed by ONNX Runtime on `device`, where
    `value` is."""
    session = _gather_session(ELEMENT_TYPES[value.data_type()], device)
    binding = session.io_binding()
    binding.bind_ortvalue_input("data", value)
    binding.bind_cpu_input("index", np.ascontiguousarray(index, dtype=np.int64))
    binding.bind_output("rows", *device)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0]


class OrtArray(DeviceArray):
    """A tensor ONNX Runtime keeps where its provider computes (an `OrtValue` on `device`): what OrtRunner returns
    for the outputs a call keeps, and binds as it is when fed back. It has what the decoders ask of a cache:
    `.shape`, rows gathered by an index array (`a[index]`, on the device), and `np.asarray(a)` (a view on the CPU,
    a copy from the device: what merging caches does, once per merge, not per step)."""

    __slots__ = ("value", "device")

    def __init__(self, value, device: tuple[str, int] = ("cpu", 0)):
        self.value, self.device = value, device

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape())

    def numpy(self) -> np.ndarray:
        return self.value.numpy()

    def __getitem__(self, index) -> "OrtArray":
        import onnxruntime as ort

        index = np.asarray(index, dtype=np.int64)
        if self.device[0] == "cpu":
            rows = np.ascontiguousarray(self.value.numpy()[index])
            return OrtArray(ort.OrtValue.ortvalue_from_numpy(rows), self.device)
        return OrtArray(gather_rows(self.value, index, self.device), self.device)

    def __repr__(self):
        return f"OrtArray({self.value.data_type()}, shape={self.shape}, on {self.device[0]}:{self.device[1]})"


def provider_names(text: str) -> list[str]:
    """Provider names from a comma-separated option (`--providers`, `runtime.serve:app providers=...`)."""
    return [n.strip() for n in text.split(",") if n.strip()]


# A whole ONNX model: one Cast, float16 [n] -> float32 [n] (77 bytes, opset 13; tests/test_index.py rebuilds it
# with onnx.helper and checks it against numpy on every float16 value).
FLOAT16_CAST_MODEL = bytes.fromhex(
    "08073a430a170a01781201792204436173742a090a02746f1801a001021204636173745a100a0178120b0a09080a12050a0312016e"
    "62100a0179120b0a09080112050a0312016e42040a00100d")


@functools.cache
def _float16_cast():
    import onnxruntime as ort

    return ort.InferenceSession(FLOAT16_CAST_MODEL, session_options(), providers=["CPUExecutionProvider"])


def float16_to_float32(array: np.ndarray) -> np.ndarray:
    """array (float16) in float32, through ONNX Runtime's vectorised conversion where ONNX Runtime is installed:
    numpy converts float16 one value at a time. For the 128 x 197 x 256 image embeddings that a k = 128 query
    re-ranks (small preset) on this 2-core machine: numpy 11.1 ms, ONNX Runtime 2.3 ms on one thread, 1.5 on two
    (`python bench/experiments/bench_float16.py [--threads 1]`). Both are exact (every float16 value is a float32
    value)."""
    try:
        session = _float16_cast()
    except ImportError:  # (a TensorRT-only device)
        return array.astype(np.float32)
    flat = np.ascontiguousarray(array, dtype=np.float16).reshape(-1)
    return session.run(None, {"x": flat})[0].reshape(array.shape)


def session_options(threads: int | None = None, shared_pool: bool = False, memory_arena: bool = True,
                    priority_order: bool = False):
    """The ONNX Runtime session options of every session the runtime opens (see OrtRunner)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = memory_arena
    if priority_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # Flush denormals to zero: tiny activations (common in small or freshly initialised models) otherwise
    # run through the CPU's slow microcode path; the values involved are below 1e-38.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if int8_products_saturate():
        opts.add_session_config_entry("session.x64quantprecision", "1")
    if shared_pool or OrtRunner._global_pool:
        opts.use_per_session_threads = False  # (once the shared pool exists, no session may have its own)
    elif threads:
        opts.intra_op_num_threads = threads
    return opts


def default_threads() -> int | None:
    """Threads per session from BLIP2_EDGE_THREADS, else ONNX Runtime's default (one per core)."""
    value = os.environ.get("BLIP2_EDGE_THREADS")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BackendError(f"BLIP2_EDGE_THREADS={value!r} is not a thread count; set it to a positive integer "
                           f"(e.g. 2) or unset it to use one thread per core")
    return int(value)
