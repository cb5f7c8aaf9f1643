"""The declarative description of one exported graph, in the spirit of optimum's `OnnxConfig`.

A `GraphSpec` says everything the generic export loop, the parity gate, the manifest and the TensorRT builder
need to know about a graph: the wrapper module, input and output tensors with symbolic axes, how to make
example inputs at any axis sizes, and the TensorRT optimization profiles, all derived from the same
`AxisRange` numbers. The specs themselves are in `export/specs.py` (vision, Q-Former) and
`export/llm_specs.py` (one set per LLM family).
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from runtime.manifest import Graph, Tensor


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple  # ints for fixed axes, str for named dynamic axes


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis; the TensorRT profile and the export checks use the same numbers.
    `opt` (the size TensorRT tunes for) is kept within [min, max]."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        object.__setattr__(self, "opt", max(self.min, min(self.opt, self.max)))


@dataclass
class GraphSpec:
    name: str
    build: Callable  # model -> torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    make_inputs: Callable  # (sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]
    profiles: list[dict[str, AxisRange]]  # one dict per TensorRT optimization profile
    export_sizes: dict[str, int]  # axis sizes of the dummy inputs used for tracing
    check_sizes: list[dict[str, int]] = field(default_factory=list)  # other sizes for the parity gate
    fp16: dict = field(default_factory=dict)  # options of export.fp16.to_fp16 for this graph
    int8: dict = field(default_factory=dict)  # options of export.int8.to_int8 for this graph
    large_input: tuple[str, float] | None = None  # (input, factor): the fp16 gate scales it to probe overflow
    int4: bool = False  # onnx-int4 / trt-int4 store this graph's weight MatMuls as int4 (the LLM's graphs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: axis name}} for inputs and outputs."""
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs + self.outputs}

    def trt_profiles(self) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
        """Per profile, {input name: (min shape, opt shape, max shape)} for every input with a dynamic axis."""
        out = []
        for ranges in self.profiles:
            shapes = {}
            for t in self.inputs:
                if not any(isinstance(a, str) for a in t.shape):
                    continue
                shapes[t.name] = tuple(tuple(_axis_size(a, ranges, k) for a in t.shape) for k in ("min", "opt", "max"))
            out.append(shapes)
        return out

    def to_manifest(self, file: str) -> Graph:
        """The manifest's entry for this graph, stored in `file`."""
        return Graph(file=file,
                     inputs=[Tensor(t.name, t.dtype, list(t.shape)) for t in self.inputs],
                     outputs=[Tensor(t.name, t.dtype, list(t.shape)) for t in self.outputs],
                     profiles=[{k: [r.min, r.opt, r.max] for k, r in p.items()} for p in self.profiles])


def _axis_size(axis, ranges: dict[str, AxisRange], which: str) -> int:
    if isinstance(axis, int):
        return axis
    return sum(getattr(ranges[a], which) for a in axis.split("+"))


def needs(*attributes: str):
    """Declare the model attributes (weights) a graph needs; without them the graph is not exported."""
    def mark(builder):
        builder.needs = attributes
        return builder
    return mark


def torch_inputs(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> tuple:
    """The wrapper's positional arguments, in spec order, as torch tensors."""
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
