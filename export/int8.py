"""INT8 (explicit symmetric Q/DQ) from an exported fp32 ONNX graph, and the calibration graphs that measure its
activation ranges.

    from export.int8 import int8_ranges, to_int8
    ranges = int8_ranges("vision.onnx", feeds_list)                  # {tensor: largest magnitude seen}
    info = to_int8("vision.onnx", "out/vision.onnx", ranges)

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.graph_edit import (PASS_THROUGH, drop_unused_initializers, ensure_names, in_scope, logits_product,
                               producers_of, quiet_onnxruntime, transposed_weights_as_kn, weight_matmuls)
from export.smoothing import CHANNEL_MAX, smooth, smoothable
from export.weights import Weights, load_graph


def attention_output_projections(graph, with_weight: list[str], activation_products: list[str]) -> list[str]:
    """Weight products that read an attention's result (through reshapes/transposes only): the attention
    output projection of every layer. Its int8 input error goes straight into the residual stream; kept in
    float, the LLM's top-1 agreement with fp32 rose from 0.875 to 0.961 on the small preset (out of every
    group of projections tried, this one cost the most accuracy)."""
    producers = producers_of(graph)
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
    ensure_names(graph)
    with_weight, activations = weight_matmuls(graph)
    projections = attention_output_projections(graph, with_weight, activations)
    scoped = [n.name for n in graph.node if fp32_scopes and in_scope(n, fp32_scopes)]
    excluded = set(activations) | set(projections) | set(exclude) | set(scoped)
    quantized = [n for n in with_weight if n not in excluded]
    nodes, head = {n.name: n for n in graph.node}, logits_product(graph)
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
    ensure_names(model.graph)
    transposed_weights_as_kn(model.graph, weights)
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
    with quiet_onnxruntime():
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
    drop_unused_initializers(graph)
    if uint8_activations:
        shift_activations_to_uint8(model)
    weights.save(model, dst)  # (checks the model)
    return {"quantized_nodes": len(plan.quantized), "kept_fp32": plan.kept_fp32,
            "scheme": "QDQ, symmetric int8 activations (per tensor), symmetric int8 weights (per channel)" + (
                "; the LM head's logits float" if plan.float_outputs else "") + (
                "; activations stored as uint8 with zero point 128 (the same values) for ONNX Runtime"
                if uint8_activations else ""),
            **({"smoothing": smoothing} if smoothing and smoothing["layer_norms_smoothed"] else {})}
