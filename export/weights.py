"""An ONNX graph's weights read and written one tensor at a time, so that converting a graph of several
gigabytes (fp16, int4) holds one weight in memory, not the whole graph twice.

    from export.weights import load_graph
    model, weights = load_graph("llm_decoder.onnx")     # the graph; every weight over 64 KB is a stub
    w = weights.array("onnx::MatMul_123")                # one weight, read from disk now
    stub = weights.derive("w__fp16", "onnx::MatMul_123", lambda a: a.astype(np.float16), TensorProto.FLOAT16)
    model.graph.initializer.append(stub)                 # computed when written, not before
    weights.save(model, "out/llm_decoder.onnx")          # streams every weight into out/llm_decoder.onnx.data

A stub is an initializer with its name, type and dims but no values (marked as external data, so nothing
mistakes it for an empty tensor); the values live in the `Weights` store: a place in the source's external
data file, an array moved out of a graph that had no external data, a function of another weight (`derive`),
or bytes handed over (`put`, for what a quantizer made). `save` writes external data when the source had it
or the weights exceed protobuf's 2 GB; otherwise one self-contained file, as the exporter writes small graphs.
"""
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

INLINE_BYTES = 1 << 16  # weights up to this size stay in the graph (shape inference reads small constants)
EXTERNAL_DATA_BYTES = 1_800_000_000  # past this, one file cannot hold the graph (protobuf's limit is 2 GiB)
ALIGN = 4096  # each weight starts on a page in the data file (ONNX Runtime can map it)
_HELD = "held-in-memory-by-export.weights"  # the location a stub names until it is written


def _nbytes(t: TensorProto) -> int:
    """Bytes of `t`'s values (an upper bound for packed 4-bit types)."""
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _stub(t: TensorProto) -> None:
    """Drop the values of `t`, in place, keeping its name, type and dims."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=_HELD)


def _buffer(values: np.ndarray, dtype) -> memoryview:
    """The bytes of `values` as `dtype`, C-ordered, without a copy beyond the one making them so (`tobytes` would
    copy again: a second 0.8 GB for an LM head's transposed weight)."""
    return np.ascontiguousarray(values, dtype=dtype).reshape(-1).view(np.uint8).data


class Weights:
    """Where each stub initializer's values are, and how to get them (one at a time)."""

    def __init__(self, folder: Path, external_source: bool):
        self.folder, self.external_source = Path(folder), external_source
        self._get: dict[str, Callable[[], bytes | memoryview]] = {}  # (memoryview: values computed here)
        self._types: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._stubs: set[str] = set()
        self._sources: set[Path] = set()  # the data files read from

    def _hold(self, t: TensorProto, get: Callable[[], bytes], stub: bool = True) -> TensorProto:
        self._get[t.name], self._types[t.name] = get, (t.data_type, tuple(t.dims))
        if stub:
            _stub(t)
            self._stubs.add(t.name)
        return t

    def know(self, t: TensorProto) -> None:
        """Remember the values of a small initializer that stays in the graph (a copy: it may be replaced)."""
        data = numpy_helper.to_array(t).tobytes()
        self._hold(t, lambda: data, stub=False)

    def take(self, t: TensorProto) -> TensorProto:
        """Make `t` a stub whose values are read when needed: from the source's data file if it is external
        data, otherwise moved out of the proto into this store (the same bytes, not a copy kept beside them)."""
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            path, offset, length = self.folder / info.location, max(info.offset or 0, 0), info.length
            self._sources.add(path.resolve())
            if length is None or length < 0:
                length = _nbytes(t)

            def read() -> bytes:
                with open(path, "rb") as f:
                    data = os.pread(f.fileno(), length, offset)
                if len(data) != length:
                    raise ValueError(f"{path} ends before the {length} bytes of weight {t.name!r} at offset {offset}: "
                                     f"the file is truncated; export the graph again")
                return data
            return self._hold(t, read)
        data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()  # (packed 4-bit: raw)
        return self._hold(t, lambda: data)

    def put(self, t: TensorProto) -> TensorProto:
        """Hold the values of a tensor made here (a quantizer's output) and make it a stub."""
        return self.take(t) if _nbytes(t) > INLINE_BYTES else t

    def derive(self, name: str, source: str, fn: Callable[[np.ndarray], np.ndarray], data_type: int | None = None,
               dims: tuple[int, ...] | None = None) -> TensorProto:
        """A stub `name` whose values are fn(values of `source`) (of `data_type` and `dims`, by default the
        source's), computed when written (or read)."""
        source_type, source_dims = self._types[source]
        data_type = source_type if data_type is None else data_type
        stub = TensorProto(name=name, data_type=data_type, dims=dims if dims is not None else source_dims)
        dtype = helper.tensor_dtype_to_np_dtype(data_type)
        return self._hold(stub, lambda: _buffer(fn(self.array(source)), dtype))

    def transform(self, t: TensorProto, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace the values of initializer `t` with fn(its values), of the same type and shape: computed when
        read for a stub (no weight is held for it), now for a small one kept in the graph."""
        data_type, dims = self._types[t.name]
        dtype, get = helper.tensor_dtype_to_np_dtype(data_type), self._get[t.name]

        def values() -> memoryview:
            return _buffer(fn(np.frombuffer(get(), dtype=dtype).reshape(dims)), dtype)

        if t.name in self._stubs:
            self._get[t.name] = values
            return
        data = values()
        t.CopyFrom(numpy_helper.from_array(np.frombuffer(data, dtype=dtype).reshape(dims), t.name))
        self._get[t.name] = lambda: data

    def array(self, name: str) -> np.ndarray:
        """The values of stub `name` as a numpy array (read or computed now)."""
        data_type, dims = self._types[name]
        return np.frombuffer(self._get[name](), dtype=helper.tensor_dtype_to_np_dtype(data_type)).reshape(dims)

    def save(self, model: onnx.ModelProto, dst) -> None:
        """Write `model` to `dst`, every stub with its values, one weight at a time; then check the file."""
        dst = Path(dst)
        held = [t for t in model.graph.initializer if t.name in self._stubs]
        total = sum(_nbytes(t) for t in held)
        if self.external_source or total > EXTERNAL_DATA_BYTES:
            data = dst.with_name(dst.name + ".data")
            if data.resolve() in self._sources:
                raise ValueError(f"cannot write {dst} over the graph its weights are read from")
            with open(data, "wb") as f:
                for t in held:
                    offset = -(-f.tell() // ALIGN) * ALIGN
                    f.seek(offset)
                    values = self._get[t.name]()
                    f.write(values)
                    del t.external_data[:]
                    for key, value in (("location", data.name), ("offset", offset), ("length", len(values))):
                        t.external_data.add(key=key, value=str(value))
        else:
            for t in held:
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
                t.raw_data = bytes(self._get[t.name]())
        onnx.save(model, str(dst))
        onnx.checker.check_model(str(dst))


def load_graph(path) -> tuple[onnx.ModelProto, Weights]:
    """The ONNX graph at `path` without the values of its weights (stubs), and the store that has them."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    weights = Weights(path.parent, external_source=any(uses_external_data(t) for t in model.graph.initializer))
    for t in model.graph.initializer:
        if uses_external_data(t) or _nbytes(t) > INLINE_BYTES:
            weights.take(t)
        else:
            weights.know(t)
    return model, weights
