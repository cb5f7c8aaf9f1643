"""Reduced precision from an exported fp32 ONNX graph: FP16 (pre-cast) and INT8 (explicit symmetric Q/DQ).

TensorRT 11 takes its precision from the ONNX itself (no FP16/INT8 builder flags, no calibrators), and
ONNX Runtime runs the same graphs on the CPU, so one converted graph serves both and its accuracy is
checked here before any engine is built:

    from export.precision import int8_ranges, to_fp16, to_int8
    info = to_fp16("vision.onnx", "out/vision.onnx")                 # {"kept_fp32": {...}, ...}
    ranges = int8_ranges("vision.onnx", feeds_list)                  # {tensor: largest magnitude seen}
    info = to_int8("vision.onnx", "out/vision.onnx", ranges)

FP16 (`to_fp16`): weights and compute in float16, with the numerically fragile parts kept in float32
by an explicit rule, recorded in the manifest:
  * every `LayerNormalization`, `Softmax`, `ReduceL2` (the ITC feature norm), `ReduceMean`, `Pow`, `Sqrt`;
  * each attention's score path: from the Softmax back up to and including the Q·Kᵀ MatMul (scaling,
    the additive mask and the mask's own arithmetic with its -3.4e38 fill, which is -inf in fp16
    and turns fully masked padding rows into NaN); this is where BLIP-2/OPT users hit fp16 overflow;
  * constants (`Constant`, `ConstantOfShape`): produced in fp32 and cast where an fp16 node reads them.
Graph inputs and outputs stay float32 (the runtime feeds and reads the same types at every precision);
casts are inserted at every boundary between fp16 and fp32 nodes, and fp16 weights are clamped to ±65504.

No conversion holds a graph's weights in memory: the graph is loaded as stubs and each weight is read,
converted and written on its own (`export.weights`), so a graph of any size converts in about one weight's
memory.

INT8 (`to_int8`): ONNX Runtime's `quantize_static` in QDQ format, symmetric int8 activations and
per-channel symmetric int8 weights (the form TensorRT consumes), for the MatMul/Gemm/Conv nodes that have
a weight; matrix products of two activations (attention scores and attention-weighted values), each
attention's output projection (the most sensitive product, measured) and the nodes named in `exclude`
stay in float32. Activation ranges (MinMax, symmetric) are measured while the fp32 pipeline runs on
calibration images (`export.calibration.record_ranges`: each graph runs as a copy that also outputs the min and
max of the tensors to quantize, so no feed is kept). Each product is then quantized by ONNX Runtime's own QDQ
quantizer on a graph of that product alone, with quantize_static's options: the same graph quantize_static
makes (tests/test_precision.py), without loading the whole graph, which quantize_static does several times over.
"""
import contextlib
import logging
import math
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.smoothing import CHANNEL_MAX, smooth, smoothable
from export.weights import Weights, load_graph

FP16_MAX = 65504.0
# Ops always computed in float32 in the fp16 graph: normalisations and reductions whose sums overflow or
# lose precision in fp16.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "Pow", "Sqrt")
# Ops whose output is a constant: kept fp32 and cast where needed (casts of constants fold at load time).
CONSTANT_OPS = ("Constant", "ConstantOfShape")
# Float inputs that must stay float32 whatever the node's precision (op, input index).
FP32_INPUTS = {("Resize", 2)}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor in the graph (inputs, initializers, intermediates, outputs). The weights
    are stubs (`export.weights.load_graph`): inference reads only their type and dims."""
    g = onnx.shape_inference.infer_shapes(model).graph
    infos = list(g.input) + list(g.output) + list(g.value_info)
    out = {v.name for v in infos if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    out |= {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    return out


def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def attention_score_nodes(graph, floats: set[str]) -> set[str]:
    """Names of the nodes between each Softmax and the MatMul that made its scores (both included),
    and of everything that computes the additive mask on that path. The walk goes up through nodes
    with float outputs only, so it stops at Shape, comparisons and integer index arithmetic."""
    producers = _producers(graph)
    keep = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        queue = deque([node])
        while queue:
            n = queue.popleft()
            if n.name in keep:
                continue
            keep.add(n.name)
            if n.op_type == "MatMul" and n is not node:
                continue  # the Q·Kᵀ product: kept fp32, its inputs are not
            if not any(o in floats for o in n.output):
                continue
            queue.extend(producers[i] for i in n.input if i in producers)
    return keep


def _ensure_names(graph) -> None:
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _half_outputs(graph, fp32_nodes: set[str], floats: set[str]) -> set[str]:
    """The float tensors that are fp16 after conversion: outputs of every node not kept in fp32 (a Cast to
    float32 becomes a Cast to float16)."""
    half = set()
    for node in graph.node:
        if node.name in fp32_nodes:
            continue
        if node.op_type == "Cast":
            to = next((a for a in node.attribute if a.name == "to"), None)
            if to is not None and to.i == TensorProto.FLOAT:
                to.i = TensorProto.FLOAT16
                half.update(node.output)
            continue
        half.update(o for o in node.output if o in floats)
    return half


def _half_weight(w: np.ndarray) -> np.ndarray:
    return np.clip(w, -FP16_MAX, FP16_MAX).astype(np.float16)


class _TypeFixer:
    """Gives every node's float inputs the type the node computes in: a Cast node before it, or an fp16 copy of
    a weight (clamped to the fp16 range). Casts are shared between the nodes that read the same tensor."""

    def __init__(self, graph, half: set[str], weights: Weights):
        self.initializers = {t.name for t in graph.initializer}
        self.half, self.casts, self.half_weights, self.new_nodes = half, {}, {}, []
        self.weights = weights

    def __call__(self, name: str, want_half: bool) -> str:
        if (name in self.half) == want_half:
            return name
        if name in self.initializers and want_half:
            if name not in self.half_weights:  # (computed when the graph is written, one weight at a time)
                self.half_weights[name] = self.weights.derive(f"{name}__fp16", name, _half_weight, TensorProto.FLOAT16)
            return f"{name}__fp16"
        if (name, want_half) not in self.casts:
            out = f"{name}__{'fp16' if want_half else 'fp32'}"
            self.new_nodes.append(helper.make_node("Cast", [name], [out], name=f"Cast_{out}",
                                                   to=TensorProto.FLOAT16 if want_half else TensorProto.FLOAT))
            self.casts[name, want_half] = out
        return self.casts[name, want_half]

    def rewrite(self, graph, fp32_nodes: set[str], floats: set[str]) -> list:
        """The graph's nodes with the casts they need inserted before them."""
        body = []
        for node in graph.node:
            if node.op_type != "Cast":  # a Cast reads either type
                want_half = node.name not in fp32_nodes
                for idx, name in enumerate(node.input):
                    if name and name in floats:
                        node.input[idx] = self(name, want_half and (node.op_type, idx) not in FP32_INPUTS)
            body += self.new_nodes + [node]
            self.new_nodes = []
        return body


def _float_graph_outputs(graph, body: list, half: set[str]) -> list:
    """Graph outputs keep float32: an fp16 producer writes `<name>__fp16out` and a Cast gives back `<name>`;
    returns those Casts (to append after `body`)."""
    outputs, renamed, tail = {o.name for o in graph.output}, {}, []
    for node in body:
        for i, o in enumerate(node.output):
            if o in outputs and o in half:
                renamed[o] = node.output[i] = f"{o}__fp16out"
                tail.append(helper.make_node("Cast", [renamed[o]], [o], name=f"Cast_{o}_out", to=TensorProto.FLOAT))
        for i, name in enumerate(node.input):
            if name in renamed:  # an output that is also read inside the graph
                node.input[i] = renamed[name]
    return tail


def _in_scope(node, scopes: tuple[str, ...]) -> bool:
    """Whether the node was exported from a module whose path contains one of `scopes` (the dynamo exporter
    records the module path of every node in its metadata)."""
    meta = {p.key: p.value for p in node.metadata_props}
    where = meta.get("pkg.torch.onnx.name_scopes", "") + meta.get("namespace", "")
    return any(scope in where for scope in scopes)


def to_fp16(src, dst, keep_fp32_nodes: tuple[str, ...] = (), only_ops: tuple[str, ...] | None = None,
            fp32_scopes: tuple[str, ...] = ()) -> dict:
    """Write an fp16 copy of `src` to `dst` (fp32 inputs/outputs); returns what was kept in fp32.

    only_ops: compute only these op types in fp16 (e.g. MatMul: fp16 weights and products, with everything
    between them, the residual stream included, in fp32); fp32_scopes: keep the nodes of these modules in fp32
    (T5's `DenseReluDense.wo`, whose output overflows fp16, as Hugging Face keeps it)."""
    model, weights = load_graph(src)
    graph = model.graph
    _ensure_names(graph)
    floats = _float_tensors(model)
    scores = attention_score_nodes(graph, floats)
    fp32_nodes = {n.name for n in graph.node
                  if n.op_type in FP32_OPS or n.op_type in CONSTANT_OPS or n.name in scores
                  or (only_ops is not None and n.op_type not in only_ops and n.op_type != "Cast")
                  or _in_scope(n, fp32_scopes)} | set(keep_fp32_nodes)
    half = _half_outputs(graph, fp32_nodes, floats)
    fixer = _TypeFixer(graph, half, weights)
    body = fixer.rewrite(graph, fp32_nodes, floats)
    body += _float_graph_outputs(graph, body, half)
    del graph.node[:]
    graph.node.extend(body)
    _drop_unused_initializers(graph)  # (the float32 weights now read as float16)
    graph.initializer.extend(fixer.half_weights.values())
    del graph.value_info[:]  # stale types; ONNX Runtime and TensorRT infer them again
    weights.save(model, dst)
    kept = defaultdict(int)
    for n in graph.node:
        if n.name in fp32_nodes and n.op_type not in CONSTANT_OPS:
            kept["attention scores" if n.name in scores and n.op_type not in FP32_OPS else n.op_type] += 1
    rule = ("LayerNormalization, Softmax, reductions and each attention's score path (Q·Kᵀ, scale, additive mask) "
            "in float32; everything else float16; weights clamped to ±65504")
    if only_ops is not None:
        rule = (f"only {', '.join(only_ops)} in float16 (weights clamped to ±65504), everything else in float32, "
                f"the residual stream included")
    if fp32_scopes:
        rule += f"; modules {', '.join(fp32_scopes)} in float32"
    return {"kept_fp32": dict(sorted(kept.items())), "io_dtype": "float32", "rule": rule}


def _drop_unused_initializers(graph) -> None:
    """Remove, in place, the initializers no node reads (deleting by index copies none of the others, as
    rebuilding the list would: a graph's weights can be gigabytes)."""
    used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


# ---------------------------------------------------------------- INT8 (Q/DQ)
def weight_matmuls(graph) -> tuple[list[str], list[str]]:
    """(nodes with a weight: MatMul/Gemm/Conv reading an initializer, products of two activations)."""
    inits = {t.name for t in graph.initializer}
    with_weight, activations = [], []
    for n in graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        (with_weight if any(i in inits for i in n.input[:2]) else activations).append(n.name)
    return with_weight, activations


PASS_THROUGH = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def attention_output_projections(graph, with_weight: list[str], activation_products: list[str]) -> list[str]:
    """Weight products that read an attention's result (through reshapes/transposes only): the attention
    output projection of every layer. Its int8 input error goes straight into the residual stream; kept in
    float, the LLM's top-1 agreement with fp32 rose from 0.875 to 0.961 on the small preset (out of every
    group of projections tried, this one cost the most accuracy)."""
    producers = _producers(graph)
    products, with_weight = set(activation_products), set(with_weight)
    found = []
    for node in graph.node:
        if node.name not in with_weight:
            continue
        source = producers.get(node.input[0])
        while source is not None and source.op_type in PASS_THROUGH:
            source = producers.get(source.input[0])
        if source is not None and source.name in products:
            found.append(node.name)
    return found


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def shift_activations_to_uint8(model: onnx.ModelProto) -> int:
    """Rewrite symmetric int8 activation Q/DQ (zero point 0) as uint8 with zero point 128, in place; returns
    how many nodes changed. The quantized values are the same numbers shifted by 128 (saturation included:
    -128..127 becomes 0..255), so the graph computes exactly the same; ONNX Runtime's x86 kernels fuse
    uint8 activations with int8 weights (QLinearMatMul, QGemm) and leave int8 activations half unfused,
    dequantizing weights at every call. Weights keep their int8 zero points. The weights may be stubs
    (`export.weights.load_graph`): only the zero points' values are read."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.output[0] for n in model.graph.node
               if n.op_type == "QuantizeLinear" and n.input[0] in inits}  # (weights are stored quantized)
    shifted, changed = {}, 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.input[0] in inits or node.input[0] in weights:
            continue  # a weight: stays int8
        zero = node.input[2]
        if numpy_helper.to_array(inits[zero]).dtype != np.int8:
            continue
        if zero not in shifted:
            value = numpy_helper.to_array(inits[zero]).astype(np.int16) + 128
            shifted[zero] = numpy_helper.from_array(value.astype(np.uint8), f"{zero}__u8")
            model.graph.initializer.append(shifted[zero])
        node.input[2] = shifted[zero].name
        changed += 1
    return changed


@dataclass
class Int8Plan:
    """Which weight products of a graph get int8, which stay float and why, and the activations whose ranges
    the calibration must measure (each quantized product's input and output, as ONNX Runtime's QDQ quantizer
    puts Q/DQ on both)."""
    quantized: list[str]  # node names
    kept_fp32: dict
    tensors: list[str]  # activations to calibrate
    float_outputs: set[str]  # quantized products whose output stays float (the LM head: one int8 scale for every
    # logit would put them on a grid of max|logit| / 127, which turns near-ties into exact ties)
    channels: dict = field(default_factory=dict)  # LayerNorm outputs that may be smoothed (export/smoothing.py):
    # the calibration also measures their per-channel maxima


def int8_plan(graph, exclude: tuple[str, ...] = (), fp32_scopes: tuple[str, ...] = ()) -> Int8Plan:
    """The int8 plan of `graph` (its weights may be stubs): every MatMul/Gemm/Conv with a weight, except
    products of two activations (attention), each attention's output projection, the nodes named in
    `exclude` and those exported from the modules `fp32_scopes` (as to_fp16)."""
    _ensure_names(graph)
    with_weight, activations = weight_matmuls(graph)
    projections = attention_output_projections(graph, with_weight, activations)
    scoped = [n.name for n in graph.node if fp32_scopes and _in_scope(n, fp32_scopes)]
    excluded = set(activations) | set(projections) | set(exclude) | set(scoped)
    quantized = [n for n in with_weight if n not in excluded]
    nodes, head = {n.name: n for n in graph.node}, _logits_product(graph)
    float_outputs = {head} & set(quantized)
    tensors = list(dict.fromkeys(t for name in quantized for t in nodes[name].input[:1]
                                 + ([] if name in float_outputs else nodes[name].output[:1])))
    return Int8Plan(quantized, {"activation x activation products (attention)": len(activations),
                                "attention output projections": len(projections),
                                **({"excluded by name": sorted(set(exclude))} if exclude else {}),
                                **({f"in {', '.join(fp32_scopes)}": len(set(scoped) & set(with_weight))}
                                   if fp32_scopes else {})}, tensors, float_outputs,
                    smoothable(graph, quantized))


def _int8_graph(src) -> tuple[onnx.ModelProto, Weights]:
    """The graph at `src` as stubs, prepared for int8: a head tied to the embedding table (read through a
    Transpose) gets its own transposed weight, so that it is quantized like the other products and ONNX Runtime
    does not fold a second float copy of the table at load (for OPT-2.7B's table, 515 MB)."""
    model, weights = load_graph(src)
    _ensure_names(model.graph)
    _transposed_weights_as_kn(model.graph, weights)
    return model, weights


def int8_plan_of(src, exclude: tuple[str, ...] = (), fp32_scopes: tuple[str, ...] = ()) -> Int8Plan:
    """The int8 plan of the graph file `src` (read without its weights); its `tensors` are what to calibrate."""
    return int8_plan(_int8_graph(src)[0].graph, exclude, fp32_scopes)


RANGE_OUTPUT = "{}__int8_range_{}"  # the calibration graph's extra outputs: a tensor's min and max


def write_calibration_graph(src, tensors: list[str], channels: list[str] = ()) -> Path:
    """Write, beside `src`, a copy of the graph that also outputs the min and max of each of `tensors` (ReduceMin
    and ReduceMax nodes, as ONNX Runtime's MinMax calibrator adds them) and the largest magnitude of each last-axis
    channel of `channels`, and return its path; the caller removes it (`RangeRunner` does both). Only the graph
    is written: its weights stay in `src`'s external data file, which the copy reads."""
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    for t in tensors:
        for op in ("min", "max"):
            out = RANGE_OUTPUT.format(t, op)
            model.graph.node.append(helper.make_node(f"Reduce{op.title()}", [t], [out], keepdims=0, name=out))
            model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
    if channels:
        axis = "__int8_channel_axis"
        model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axis))
    for t in channels:
        out = CHANNEL_MAX.format(t)
        model.graph.node.extend([
            helper.make_node("Abs", [t], [out + "_abs"], name=out + "_abs"),
            helper.make_node("Flatten", [out + "_abs"], [out + "_rows"], axis=-1, name=out + "_rows"),
            helper.make_node("ReduceMax", [out + "_rows", axis], [out], keepdims=0, name=out)])
        model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [None]))
    dst = src.with_name(f".{src.stem}.calibration.onnx")
    onnx.save(model, str(dst))
    return dst


class RangeRunner:
    """Runs the graph at `src` through its calibration copy (`write_calibration_graph`): returns the graph's own
    outputs and keeps the running min and max of `tensors` in `ranges` (no feed is kept). The copy is removed as
    soon as ONNX Runtime has loaded it. It runs in ONNX Runtime's priority-based execution order: in the default
    order the reductions ran last and every calibrated tensor stayed alive until then (the full-size ViT-g at
    batch 8: 10.3 GB instead of 4.3)."""

    def __init__(self, src, tensors: list[str], channels: list[str] = ()):
        from runtime.backends import make_runner

        self.ranges = ActivationRanges(tensors, channels)
        path = write_calibration_graph(src, self.ranges.tensors, self.ranges.channels)
        try:
            self.runner = make_runner(path, "onnxruntime", memory_arena=False, priority_order=True)
        finally:
            path.unlink(missing_ok=True)
        self.input_names = self.runner.input_names
        self.output_names = [n for n in self.runner.output_names if n not in self.ranges.outputs]

    def run(self, feeds, keep=()):
        outputs = self.runner.run(feeds, keep)
        self.ranges.update(outputs)
        return {n: outputs[n] for n in self.output_names}


class ActivationRanges:
    """The running min and max of each calibrated tensor over every call (what ONNX Runtime's MinMax calibrator
    computes), and the running per-channel maxima of `channels`, read from the calibration graph's extra outputs."""

    def __init__(self, tensors: list[str], channels: list[str] = ()):
        self.tensors, self.channels, self.low, self.high, self.channel_max = list(tensors), list(channels), {}, {}, {}
        self.outputs = {RANGE_OUTPUT.format(t, op) for t in tensors for op in ("min", "max")} | {
            CHANNEL_MAX.format(t) for t in self.channels}

    def update(self, outputs: dict) -> None:
        for t in self.tensors:
            low, high = outputs[RANGE_OUTPUT.format(t, "min")], outputs[RANGE_OUTPUT.format(t, "max")]
            self.low[t] = np.minimum(self.low.get(t, low), low)
            self.high[t] = np.maximum(self.high.get(t, high), high)
        for t in self.channels:
            seen = outputs[CHANNEL_MAX.format(t)]
            self.channel_max[t] = np.maximum(self.channel_max.get(t, seen), seen)

    def symmetric(self) -> dict:
        """{tensor: the largest magnitude seen}, and {CHANNEL_MAX.format(t): per-channel maxima} for `channels`;
        raises when a tensor was never computed."""
        missing = [t for t in self.tensors if t not in self.low]
        if missing:
            raise ValueError(f"the calibration never computed {len(missing)} of the tensors to quantize "
                             f"(e.g. {missing[0]!r}): give calibration images the pipeline runs every graph on")
        return {**{t: float(max(abs(self.low[t]), abs(self.high[t]))) for t in self.tensors},
                **{CHANNEL_MAX.format(t): m for t, m in self.channel_max.items()}}


def int8_ranges(src, feeds: list[dict], exclude: tuple[str, ...] = (), fp32_scopes: tuple[str, ...] = ()) -> dict:
    """{tensor: magnitude} for `to_int8`, measured by running the graph at `src` on `feeds` (dicts of graph
    inputs). The build measures them while the fp32 pipeline runs (`export.calibration.record_ranges`), which
    holds no feeds; this is the same measurement over feeds at hand."""
    if not feeds:
        raise ValueError(f"no calibration feeds for {Path(src).name}: give calibration images (--calib-images DIR)")
    plan = int8_plan_of(src, exclude, fp32_scopes)
    runner = RangeRunner(src, plan.tensors, list(plan.channels))
    for f in feeds:
        runner.run(f)
    return runner.ranges.symmetric()


INT8_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
                "QuantizeBias": False,  # float biases: what TensorRT fuses
                "DedicatedQDQPair": True}  # one Q/DQ pair per consumer: ONNX Runtime fuses each


QDQ_SLICE_BYTES = 64 << 20  # a weight over this is quantized in slices of output channels (see _qdq_product)


def _qdq_product(node, model: onnx.ModelProto, weights: Weights, ranges: dict, float_output: bool) -> tuple[list, list]:
    """(nodes, initializers) replacing one weight product with its Q/DQ form, made by ONNX Runtime's QDQ quantizer
    on a graph of that node alone (`_quantize_alone`). A MatMul weight over QDQ_SLICE_BYTES goes through it in
    slices of output channels, joined afterwards: per-channel quantization treats each channel on its own, so the
    result is the same, while the quantizer's per-channel loop over a whole LM head (50272 channels, 515 MB in
    float32) held 4.6 GB."""
    held = {t.name for t in model.graph.initializer}
    values = {i: weights.array(i) for i in node.input[1:] if i in held}
    weight = values.get(node.input[1])
    if node.op_type != "MatMul" or weight is None or weight.ndim != 2 or weight.nbytes <= QDQ_SLICE_BYTES:
        return _quantize_alone(node, model, values, ranges, float_output)
    step = max(1, QDQ_SLICE_BYTES // (weight.itemsize * weight.shape[0]))
    parts = [_quantize_alone(node, model, {**values, node.input[1]: weight[:, i:i + step]}, ranges, float_output)
             for i in range(0, weight.shape[1], step)]
    nodes, first = parts[0]
    dequantize = next(n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] in
                      {i for m in nodes if m.op_type == "MatMul" for i in m.input[1:2]})
    axes = {dequantize.input[0]: 1, dequantize.input[1]: 0, dequantize.input[2]: 0}  # weight [K, N], scale [N], zero
    joined = []
    for t in first:
        if t.name in axes:
            pieces = [numpy_helper.to_array(next(u for u in inits if u.name == t.name)) for _, inits in parts]
            t = numpy_helper.from_array(np.concatenate(pieces, axis=axes[t.name]), t.name)
        joined.append(t)
    return nodes, joined


def _quantize_alone(node, model: onnx.ModelProto, constants: dict[str, np.ndarray], ranges: dict,
                    float_output: bool) -> tuple[list, list]:
    """(nodes, initializers) of ONNX Runtime's QDQ quantizer run on a graph of `node` alone: its input (under a name
    of its own, so that every consumer of a tensor gets its own pair, as DedicatedQDQPair gives), its constant
    inputs `constants` (weight, bias) and its output (unquantized with `float_output`)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    source, output = node.input[0], node.output[0]
    alias = f"{source}__to_{node.name}"
    single = onnx.NodeProto()
    single.CopyFrom(node)
    single.input[0] = alias
    inputs = [alias] + [i for i in node.input[1:] if i and i not in constants]  # (a bias computed in the graph)
    graph = helper.make_graph([single], "one_product", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None)
                                                        for i in inputs],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(v), i) for i, v in constants.items()])
    alone = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    # (marked as shape-inferred, as quantize_static marks the model it hands the quantizer: otherwise the quantizer
    # saves and reloads the graph to infer shapes, which this one node does not need, holding its weight 4 times)
    helper.set_model_props(alone, {"onnx.infer": "onnxruntime.quant"})
    magnitude = {alias: ranges[source], **({} if float_output else {output: ranges[output]})}
    tensors_range = TensorsData(CalibrationMethod.MinMax, {
        t: (np.array([-m], np.float32), np.array([m], np.float32)) for t, m in magnitude.items()})
    quantizer = QDQQuantizer(alone, True, False, QuantType.QInt8, QuantType.QInt8, tensors_range, None, None,
                             ["MatMul", "Gemm", "Conv"], {**INT8_OPTIONS, **(
                                 {"OpTypesToExcludeOutputQuantization": [node.op_type]} if float_output else {})})
    quantizer.quantize_model()
    done = quantizer.model.model.graph
    for n in done.node:
        n.input[:] = [source if i == alias else i for i in n.input]
    # copies, not references: a reference to one message of `done` keeps all of it, the float weight included,
    # alive (protobuf's arena): 0.4 GB more per layer of the 677M variant's LLM until the graph was written
    nodes = [_copy(n, onnx.NodeProto) for n in done.node]
    return _in_order(nodes), [_copy(t, TensorProto) for t in done.initializer if t.name not in constants]


def _copy(message, kind):
    out = kind()
    out.CopyFrom(message)
    return out


def _in_order(nodes: list) -> list:
    """`nodes` sorted so that each comes after the nodes making its inputs (the quantizer appends some after)."""
    made = {o: n.name for n in nodes for o in n.output}
    done, order = set(), []

    def visit(node):
        if node.name not in done:
            done.add(node.name)
            for i in node.input:
                if i in made:
                    visit(by_name[made[i]])
            order.append(node)
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        visit(n)
    return order


def to_int8(src, dst, ranges: dict[str, float], exclude: tuple[str, ...] = (), uint8_activations: bool = False,
            fp32_scopes: tuple[str, ...] = ()) -> dict:
    """Write a QDQ int8 copy of `src` to `dst`, with the activation ranges `ranges` ({tensor: largest magnitude},
    from `int8_ranges` or the build's calibration). The result is the form TensorRT builds from (symmetric int8
    everywhere); with `uint8_activations` the activations are then shifted to uint8 for ONNX Runtime
    (`shift_activations_to_uint8`: the same values). `exclude` names nodes, `fp32_scopes` modules (as to_fp16),
    whose products stay in float.

    ONNX Runtime's `quantize_static` loads the whole graph and holds it several times over (12.8 GB, then a
    protobuf error, for a 2.4 GB graph), so each product is quantized on its own by ONNX Runtime's QDQ quantizer
    (the same quantizer, options and numbers as quantize_static's, checked in tests/test_precision.py) while
    the graph's weights stay on disk: one weight in memory at a time, a graph of any size."""
    model, weights = _int8_graph(src)
    graph = model.graph
    plan = int8_plan(graph, exclude, fp32_scopes)
    missing = [t for t in plan.tensors if t not in ranges]
    if missing:
        raise ValueError(f"no calibrated range for {len(missing)} activations of {Path(src).name} (e.g. "
                         f"{missing[0]!r}): measure them with int8_ranges on this graph")
    smoothing = None
    if plan.channels:  # outlier channels migrated into the weights first (export/smoothing.py)
        ranges, smoothing = smooth(graph, weights, plan, ranges)
    targets, body, made, produced = set(plan.quantized), [], {t.name for t in graph.initializer}, set()
    with _quiet_logging():
        for node in graph.node:  # one weight at a time: read, quantized by ONNX Runtime, its output held
            if node.name not in targets:
                body.append(node)
                continue
            nodes, constants = _qdq_product(node, model, weights, ranges, node.name in plan.float_outputs)
            body += [n for n in nodes if not produced.issuperset(n.output)]  # (a shared weight's DequantizeLinear)
            produced.update(o for n in nodes for o in n.output)
            for t in constants:
                if t.name not in made:  # (a weight two products share is quantized once)
                    made.add(t.name)
                    graph.initializer.append(weights.put(t))
    del graph.node[:]
    graph.node.extend(body)
    _drop_unused_initializers(graph)
    if uint8_activations:
        shift_activations_to_uint8(model)
    weights.save(model, dst)  # (checks the model)
    return {"quantized_nodes": len(plan.quantized), "kept_fp32": plan.kept_fp32,
            "scheme": "QDQ, symmetric int8 activations (per tensor), symmetric int8 weights (per channel)" + (
                "; the LM head's logits float" if plan.float_outputs else "") + (
                "; activations stored as uint8 with zero point 128 (the same values) for ONNX Runtime"
                if uint8_activations else ""),
            **({"smoothing": smoothing} if smoothing and smoothing["layer_norms_smoothed"] else {})}



# ---------------------------------------------------------------- INT4 (weight-only, block-wise)
INT4_BLOCK_SIZE = 32  # weights per scale along the input dimension: 32 keeps a trained demo model's metrics
INT4_ACCURACY_LEVEL = 4  # MatMulNBits compute: 4 = int8 activations (MLAS's fastest CPU path), 0/1 = float32
# The LM head sets every logit from one product: int4 there (8.6% relative error per product on Gaussian
# weights, bench/bench_int4_error.py) moves the whole distribution, 8-bit blocks (0.76%) keep it while still
# reading a quarter of the float32 bytes per token (the head is 19% of OPT-2.7B's per-token weights in int4).
INT4_LOGITS_BITS = 8
# int4's error is not spread evenly over the layers: on blip2-opt-2.7b's widths with 6 OPT layers (random weights),
# layer 0 alone carried half of the teacher-forced logit error (1 - cosine 0.012 of 0.023), layer 1 a sixth, the
# later ones less and less (`python bench/bench_int4_error.py --model DIR`). The first quarter of the layers keeps
# 8-bit blocks: there, teacher-forced logit cosine 0.977 -> 0.992 (bench/bench_engines.py), graphs 1.34 GB instead
# of 1.26 GB (llama.cpp's Q4_K_M spends its extra bits on the first layers too).
INT4_EIGHT_BIT_LAYERS = 0.25
LAYER_PATTERN = re.compile(r"\.(?:layers|layer|block|h)\.(\d+)\.")  # in a module path


def layer_index(node) -> int | None:
    """The transformer layer a node was exported from, read from the module path the exporter records in the
    node's metadata (`...decoder.layers.3.fc1`, T5's `...block.3.layer.0...`); None when it is not recorded."""
    for prop in node.metadata_props:
        if prop.key in ("namespace", "pkg.torch.onnx.name_scopes"):
            found = LAYER_PATTERN.search(prop.value)
            if found:
                return int(found.group(1))
    return None


def first_layers(graph, names: set[str], fraction: float) -> tuple[set[str], int, int]:
    """(the nodes of `names` in the first `fraction` of the graph's layers, rounded up; how many layers that is;
    how many layers `names` come from)."""
    layers = {n.name: layer_index(n) for n in graph.node if n.name in names}
    known = [i for i in layers.values() if i is not None]
    if not known:
        return set(), 0, 0
    count = max(known) + 1
    cut = math.ceil(count * fraction)
    return {name for name, i in layers.items() if i is not None and i < cut}, cut, count


def _gemms_as_matmuls(graph, weights: Weights) -> int:
    """Rewrite Gemm(x, W, b) with a constant W (the exporter's form of a Linear over 2-D input, OPT's FFN) as
    MatMul(x, W as [K, N]) + b, in place, so that the weight-only quantizer, which handles MatMul, sees it;
    returns how many were rewritten. The numbers are the same (alpha = beta = 1, no transposed input)."""
    inits = {t.name: t for t in graph.initializer}
    body, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            body.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):  # stored [N, K]: a transposed copy, made when it is quantized
            n, k = inits[weight].dims
            weight = f"{weight}__kn"
            if weight not in inits:
                inits[weight] = weights.derive(weight, node.input[1], np.transpose, dims=(k, n))
                graph.initializer.append(inits[weight])
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        body.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}__matmul"))
        body[-1].metadata_props.extend(node.metadata_props)  # (the module path: which layer it belongs to)
        if has_bias:
            body.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(body)
    _drop_unused_initializers(graph)
    return rewritten


def _transposed_weights_as_kn(graph, weights: Weights) -> int:
    """Give MatMul(x, Transpose(W)) with a constant 2-D W (a head tied to the embedding table: the graph reads
    the table through a Transpose) a transposed copy of W as its own initializer, in place, so that the
    weight-only quantizer sees the head's weight (it quantizes only initializers) and ONNX Runtime does not
    fold a second float copy of the table at load; returns how many were rewritten. The Gather of the
    embedding keeps reading W."""
    inits = {t.name: t for t in graph.initializer}
    transposed = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits
                  and len(inits[n.input[0]].dims) == 2
                  and [a.ints for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in transposed:
            continue
        source = transposed[node.input[1]].input[0]
        weight = f"{source}__kn"
        if weight not in inits:
            n, k = inits[source].dims
            inits[weight] = weights.derive(weight, source, np.transpose, dims=(k, n))
            graph.initializer.append(inits[weight])
        node.input[1] = weight
        rewritten += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.node))):
        if graph.node[i].op_type == "Transpose" and graph.node[i].output[0] in transposed \
                and graph.node[i].output[0] not in used:
            del graph.node[i]
    _drop_unused_initializers(graph)
    return rewritten


def _logits_product(graph) -> str | None:
    """The weight MatMul that computes the graph's `logits` output (the LM head), found by walking back from
    that output through the ops that only move values (the decode graph's Gather of the last position)."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    name = next((o.name for o in graph.output if o.name == "logits"), None)
    while name in producer:
        node = producer[name]
        if node.op_type == "MatMul" and node.input[1] in inits:
            return node.name
        if node.op_type not in PASS_THROUGH + ("Gather", "Slice", "Cast"):
            return None
        name = node.input[0]
    return None


def _int4_opsets(model: onnx.ModelProto, for_tensorrt: bool) -> None:
    """What the quantized nodes need of the model, as ONNX Runtime's MatMulNBitsQuantizer.process sets it:
    MatMulNBits is in the com.microsoft domain; int4 initializers need opset 21 and IR version 10."""
    if not for_tensorrt:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.add(domain="com.microsoft", version=1)
        return
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < 21:
            o.version = 21
    model.ir_version = max(model.ir_version, 10)


def to_int4(src, dst, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = True,
            accuracy_level: int = INT4_ACCURACY_LEVEL, for_tensorrt: bool = False,
            head_bits: int | None = INT4_LOGITS_BITS, eight_bit_layers: float = INT4_EIGHT_BIT_LAYERS) -> dict:
    """Write a copy of `src` whose weight MatMuls store their weights as block-wise int4 (one scale, and with
    `symmetric=False` one zero point, per `block_size` weights along the input dimension), everything else
    unchanged, to `dst`. ONNX Runtime's own weight-only quantizer does the packing: for ONNX Runtime the
    result is its `MatMulNBits` operator (int4 weights, float activations; `accuracy_level` picks the CPU
    kernel's compute type); `for_tensorrt` gives the standard form TensorRT 10 builds from instead (int4
    initializers read by a block-quantized `DequantizeLinear`, then the MatMul). The LM head (the product
    computing `logits`) gets `head_bits`-bit blocks, or stays float with None (always for TensorRT, whose
    block quantization is int4 only); the weight products of the first `eight_bit_layers` of the layers get
    8-bit blocks (for TensorRT, int4 like the others)."""
    model, weights = load_graph(src)
    graph = model.graph
    _ensure_names(graph)
    _gemms_as_matmuls(graph, weights)
    _transposed_weights_as_kn(graph, weights)
    with_weight, _ = weight_matmuls(graph)
    targets = _int4_targets(graph, with_weight)
    head = _logits_product(graph)
    head_bits = None if for_tensorrt else head_bits
    if head_bits is None:
        targets.discard(head)
    eight, first, layers = first_layers(graph, targets - {head}, 0 if for_tensorrt else eight_bit_layers)
    quantizer = _nbits_quantizer(block_size, symmetric, accuracy_level, for_tensorrt)
    bits = {name: (head_bits or 4) if name == head else 8 if name in eight else 4 for name in targets}
    quantized = _quantize_weight_matmuls(graph, weights, bits, quantizer)
    _drop_unused_initializers(graph)
    _int4_opsets(model, for_tensorrt)
    weights.save(model, dst)
    return {"quantized_nodes": quantized,
            "kept_fp32": {"weight MatMuls not quantized": len(targets) - quantized,
                          "other weight products (Gemm, Conv)": len(with_weight) - len(targets)},
            "scheme": (f"weight-only int4, blocks of {block_size} along the input dimension, "
                       f"{'symmetric' if symmetric else 'asymmetric (zero points)'}; activations float32"
                       + ("" if head is None else "; the LM head float" if head_bits is None else
                          f"; the LM head in {head_bits}-bit blocks")
                       + (f"; the first {first} of {layers} layers in 8-bit blocks" if eight else "")
                       + ("; TensorRT form: block-quantized DequantizeLinear + MatMul" if for_tensorrt else
                          f"; ONNX Runtime MatMulNBits, accuracy_level {accuracy_level}")),
            "block_size": block_size, "symmetric": symmetric,
            "accuracy_level": None if for_tensorrt else accuracy_level,
            "logits_product": None if head is None else {"node": head, "bits": head_bits},
            "eight_bit_layers": {"layers": first, "of": layers, "weight_products": len(eight)}}


def _int4_targets(graph, with_weight) -> set[str]:
    """The weight MatMuls MatMulNBits can take: a 2-D initializer weight [K, N] (Gemm/Conv stay as they are)."""
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    return {name for name in with_weight if nodes[name].op_type == "MatMul" and nodes[name].input[1] in inits
            and len(inits[nodes[name].input[1]].dims) == 2}


def _nbits_quantizer(block_size: int, symmetric: bool, accuracy_level: int, for_tensorrt: bool):
    """bits -> ONNX Runtime's weight-only quantizer for that many bits (MatMulNBits, or QDQ for TensorRT)."""
    from onnxruntime.quantization import QuantFormat

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    root.handlers[:], root.level = handlers, level  # (its import turns the process's root logger to INFO)
    made = {}

    def quantizer(bits: int):
        if bits not in made:
            made[bits] = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits,
                op_types_to_quantize=("MatMul",),
                quant_format=QuantFormat.QDQ if for_tensorrt else QuantFormat.QOperator))
        return made[bits]
    return quantizer


def _quantize_weight_matmuls(graph, weights, bits: dict[str, int], quantizer) -> int:
    """Replace each MatMul named in `bits` by its quantized form, one weight at a time (read, quantized by ONNX
    Runtime, its output held); -> how many were replaced."""
    body, quantized = [], 0
    with _quiet_logging():
        for node in graph.node:
            if node.name not in bits:
                body.append(node)
                continue
            weight = numpy_helper.from_array(weights.array(node.input[1]), node.input[1])
            scratch = onnx.GraphProto(initializer=[weight])
            replaced = quantizer(bits[node.name]).quantize(node, [scratch])
            quantized += replaced != [node]
            body += replaced
            graph.initializer.extend(weights.put(t) for t in scratch.initializer[1:])
    del graph.node[:]
    graph.node.extend(body)
    return quantized
