"""Build TensorRT engines from the exported ONNX graphs, one plan per graph, for the GPU this runs on.

    from export.trt_build import build_engine, hardware_info, require_tensorrt
    require_tensorrt()                            # TensorRTUnavailable saying what to install when it cannot work
    info = build_engine("tmp/llm_decoder.onnx", spec, "tmp/llm_decoder.engine",
                        timing_cache_path="engines/.timing.cache")
    # what the runtime checks (runtime.trt_runner.check_compatible) + per graph: profiles, onnx_sha256, build time
    # the manifest's build.tensorrt record: {**hardware_info(), "engines": {"llm_decoder": info, ...}}

Precision comes from the ONNX itself, never from builder flags: the network is strongly typed (required on
TensorRT 10.x for this path; always the case on 11.x, where the flag is accepted and ignored), and FP16 / INT8 engines
are built from the FP16-cast or Q/DQ ONNX that `onnx-fp16` / `onnx-int8` produce; `trt-int4` from the LLM graphs
with int4 weights read by block-quantized DequantizeLinear (opset 21, symmetric: TensorRT's weight-only INT4 takes
no zero points), the form `export.int4.to_int4(for_tensorrt=True)` writes (not run here: no TensorRT). TensorRT 11
removed `BuilderFlag.FP16/INT8` and weak typing altogether, so none is set here. `EXPLICIT_BATCH` is not set either:
TensorRT 10 documents it as deprecated and ignored (networks are always explicit batch), and 11 dropped it.

The optimization profiles are exactly `spec.trt_profiles()` (the same numbers as the export's dynamic axes); the
decoder graphs get two (context: prompt + empty cache; generation: one token against the cache).
Engines only run on the TensorRT version and GPU they were built with: record `hardware_info()` in the manifest;
`runtime.trt_runner.check_compatible` refuses a mismatch.
"""
import hashlib
import time
from pathlib import Path

from runtime.errors import BackendError
from runtime.trt_runner import current_hardware, import_tensorrt

DEFAULT_WORKSPACE = 1 << 30  # 1 GiB of scratch for tactics; Jetson memory is shared with the CPU, keep it modest


class TensorRTUnavailable(BackendError):
    """TensorRT, cuda-python or a GPU is missing; the message says what to install (or to build onnx-fp16/int8)."""


class TrtBuildError(Exception):
    """TensorRT could not parse the ONNX graph or build an engine from it; the message says why."""


def require_tensorrt():
    """The `tensorrt` module once TensorRT, cuda-python and a visible NVIDIA GPU are checked; else TensorRTUnavailable
    saying what is missing and how to install it."""
    return import_tensorrt(TensorRTUnavailable)


def hardware_info() -> dict:
    """What engines built here are tied to: {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7",
    "cuda": "12.6" (runtime), "cuda_driver": "12.6"}. Read through cuda-python, no torch."""
    require_tensorrt()
    return current_hardware()


def network_flags(trt) -> int:
    """STRONGLY_TYPED when this TensorRT has the flag (10.x needs it; 11.x is always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def format_parser_errors(parser) -> list[str]:
    """One line per ONNX parser error, naming the node (name, operator, index) when the error has one."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = []
        for attr in ("node_name", "node_operator"):  # TensorRT >= 10.x; older parsers only have node()
            value = getattr(err, attr, None)
            value = value() if callable(value) else value
            if value:
                where.append(str(value))
        index = err.node() if callable(getattr(err, "node", None)) else -1
        if index is not None and index >= 0:
            where.append(f"node #{index}")
        lines.append(f"{' '.join(where) or 'graph'}: {err.desc()} ({err.code()})")
    return lines


def onnx_sha256(onnx_path) -> str:
    """sha256 over the .onnx file and its external data file (`<name>.onnx.data`) when there is one."""
    h = hashlib.sha256()
    path = Path(onnx_path)
    for part in (path, path.with_name(path.name + ".data")):
        if part.is_file():
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _parse(trt, builder, logger, onnx_path: Path):
    """The network of `onnx_path` (parsed from the file, so external weights beside it are found)."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = format_parser_errors(parser) or ["no error recorded (see the TensorRT log above)"]
        raise TrtBuildError(
            f"TensorRT {trt.__version__} could not parse {onnx_path.name} ({len(errors)} error(s)):\n  "
            + "\n  ".join(errors)
            + "\nThe graph uses an operator or a type this TensorRT version does not support; export with opset "
              "17..25 (TensorRT 11 parses opsets 9-25) or check the node named above."
        )
    return network, parser


def _add_profiles(builder, config, network, spec, onnx_path: Path) -> list:
    """One optimization profile per `spec.trt_profiles()` entry; returns those profiles."""
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    profiles = spec.trt_profiles()
    for shapes in profiles:
        unknown = sorted(set(shapes) - network_inputs)
        if unknown:
            raise TrtBuildError(f"{onnx_path.name} has no input(s) {unknown} declared by the '{spec.name}' spec "
                                f"(inputs: {sorted(network_inputs)}); re-export the ONNX with this version")
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    return profiles


def _use_timing_cache(config, path: Path):
    """Load the timing cache at `path` into `config` (a cache from another TensorRT / GPU, or an unreadable one,
    is replaced by an empty cache, not fatal)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # unreadable cache file: start a new one
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):  # another TensorRT / GPU
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)


def build_engine(onnx_path, spec, engine_path, timing_cache_path=None, workspace_bytes: int = DEFAULT_WORKSPACE,
                 tf32: bool = True) -> dict:
    """Parse `onnx_path`, build a plan with one optimization profile per `spec.trt_profiles()` entry, write it to
    `engine_path`; returns the graph's TensorRT entry for the manifest.

    timing_cache_path: loaded when it exists (a cache from another TensorRT/GPU is dropped, not fatal) and saved
    after the build, so rebuilding the same shapes on the same device is fast. tf32=False keeps fp32 matmuls in full
    fp32 (TensorRT allows TF32 by default), which the fp32 parity tolerances need.
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TrtBuildError(f"{onnx_path} not found; export the graph first (`export.onnx_export.export_graph`)")
    started = time.time()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)  # (the parser must outlive the network's use)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profiles = _add_profiles(builder, config, network, spec, onnx_path)
    if timing_cache_path is not None:
        _use_timing_cache(config, Path(timing_cache_path))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtBuildError(
            f"TensorRT {trt.__version__} failed to build an engine for {onnx_path.name} (the reason is in the "
            f"TensorRT log above). Usual causes: not enough GPU memory for the largest profile (lower --max-batch or "
            f"the token limits), or a workspace too small for any tactic (workspace_bytes={workspace_bytes})."
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(plan))
    if timing_cache_path is not None:
        Path(timing_cache_path).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache_path).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {
        "engine": engine_path.name, "onnx": onnx_path.name, "onnx_sha256": onnx_sha256(onnx_path),
        "profiles": [{name: [list(low), list(opt), list(high)] for name, (low, opt, high) in p.items()}
                     for p in profiles],
        "tensorrt": trt.__version__, "workspace_bytes": int(workspace_bytes), "tf32": bool(tf32),
        "build_seconds": round(time.time() - started, 2), "engine_bytes": engine_path.stat().st_size,
    }
