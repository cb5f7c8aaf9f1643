"""INT4 weight-only, block-wise quantization of an exported fp32 ONNX graph (ONNX Runtime's MatMulNBits, or
Q/DQ blocks for TensorRT): the LLM's weight products in 4 bits, its first layers and its head in 8.

    from export.int4 import to_int4
    info = to_int4("llm_decoder.onnx", "out/llm_decoder.onnx")
"""
import logging
import math
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat

from export.graph_edit import (drop_unused_initializers, ensure_names, logits_product, quiet_onnxruntime,
                               transposed_weights_as_kn, weight_matmuls)
from export.weights import Weights, load_graph

# ---------------------------------------------------------------- INT4 (weight-only, block-wise)
INT4_BLOCK_SIZE = 32  # weights per scale along the input dimension: 32 keeps a trained demo model's metrics
INT4_ACCURACY_LEVEL = 4  # MatMulNBits compute: 4 = int8 activations (MLAS's fastest CPU path), 0/1 = float32
# The LM head sets every logit from one product: int4 there (8.6% relative error per product on Gaussian
# weights, bench/experiments/bench_int4_error.py) moves the whole distribution, 8-bit blocks (0.76%) keep it while
# still reading a quarter of the float32 bytes per token (the head is 19% of OPT-2.7B's per-token weights in int4).
INT4_LOGITS_BITS = 8
# int4's error is not spread evenly over the layers: on blip2-opt-2.7b's widths with 6 OPT layers (random weights),
# layer 0 alone carried half of the teacher-forced logit error (1 - cosine 0.012 of 0.023), layer 1 a sixth, the
# later ones less and less (`python bench/experiments/bench_int4_error.py --model DIR`). The first quarter of the
# layers keeps 8-bit blocks: there, teacher-forced logit cosine 0.977 -> 0.992 (bench/bench_engines.py), graphs
# 1.34 GB instead of 1.26 GB (llama.cpp's Q4_K_M spends its extra bits on the first layers too).
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
    drop_unused_initializers(graph)
    return rewritten


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
    ensure_names(graph)
    _gemms_as_matmuls(graph, weights)
    transposed_weights_as_kn(graph, weights)
    with_weight, _ = weight_matmuls(graph)
    targets = _int4_targets(graph, with_weight)
    head = logits_product(graph)
    head_bits = None if for_tensorrt else head_bits
    if head_bits is None:
        targets.discard(head)
    eight, first, layers = first_layers(graph, targets - {head}, 0 if for_tensorrt else eight_bit_layers)
    quantizer = _nbits_quantizer(block_size, symmetric, accuracy_level, for_tensorrt)
    bits = {name: (head_bits or 4) if name == head else 8 if name in eight else 4 for name in targets}
    quantized = _quantize_weight_matmuls(graph, weights, bits, quantizer)
    drop_unused_initializers(graph)
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


# A weight larger than this goes through ONNX Runtime's quantizer a block of output columns at a time: the
# quantizer copies its float weight twice (into the graph it is handed, and out of it), so an LM head of 4096 x
# 50272 (OPT-6.7B's, 0.82 GB in float32) added 1.9 GB at once and set the OPT-6.7B-width onnx-int4 build's peak
# (4.02 GiB, 1.57x its float32 weights). MatMulNBits keeps each column's blocks apart ([N, blocks, bytes]), so the
# blocks of column ranges, joined along N, are the blocks of the whole weight, byte for byte.
COLUMN_BLOCK_BYTES = 64 * 2**20


def _quantize_one(node, weight: np.ndarray, bits: int, quantizer, scratch_inits: list) -> list:
    """ONNX Runtime's quantized form of MatMul `node` reading `weight` [K, N] (its nodes; its new initializers
    appended to `scratch_inits`); a large weight for MatMulNBits a block of columns at a time."""
    k, n = weight.shape
    quantize = quantizer(bits)
    columns = max(1, COLUMN_BLOCK_BYTES // (4 * k))
    if quantize.config.quant_format != QuantFormat.QOperator:  # (QDQ's int4 weights are [K, N]: whole)
        columns = n
    pieces = []
    for start in range(0, n, columns):
        block = np.ascontiguousarray(weight[:, start:start + columns]) if columns < n else weight
        scratch = onnx.GraphProto(initializer=[numpy_helper.from_array(block, node.input[1])])
        replaced = quantize.quantize(node, [scratch])
        pieces.append(scratch.initializer[1:])
    if len(pieces) == 1:
        scratch_inits += pieces[0]
        return replaced
    if len(replaced) != 1 or replaced[0].op_type != "MatMulNBits":
        raise RuntimeError(f"ONNX Runtime's quantizer made {[r.op_type for r in replaced]} of {node.name}, "
                           f"not one MatMulNBits")
    for i, made in enumerate(pieces[0]):  # packed blocks, scales, zero points: each [N, ...], joined along N
        scratch_inits.append(numpy_helper.from_array(
            np.concatenate([numpy_helper.to_array(p[i]) for p in pieces]), made.name))
    for attribute in replaced[0].attribute:
        if attribute.name == "N":
            attribute.i = n
    return replaced


def _quantize_weight_matmuls(graph, weights, bits: dict[str, int], quantizer) -> int:
    """Replace each MatMul named in `bits` by its quantized form, one weight at a time (read, quantized by ONNX
    Runtime, its output held); -> how many were replaced."""
    body, quantized = [], 0
    with quiet_onnxruntime():
        for node in graph.node:
            if node.name not in bits:
                body.append(node)
                continue
            made = []
            replaced = _quantize_one(node, weights.array(node.input[1]), bits[node.name], quantizer, made)
            quantized += replaced != [node]
            body += replaced
            graph.initializer.extend(weights.put(t) for t in made)
    del graph.node[:]
    graph.node.extend(body)
    return quantized
