"""FP16 from an exported fp32 ONNX graph (pre-cast; export.int8 and export.int4 are the other precisions).

TensorRT 11 takes its precision from the ONNX itself (no FP16/INT8 builder flags, no calibrators), and
ONNX Runtime runs the same graphs on the CPU, so one converted graph serves both and its accuracy is
checked here before any engine is built:

    from export.fp16 import to_fp16
    info = to_fp16("vision.onnx", "out/vision.onnx")                 # {"kept_fp32": {...}, ...}

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
"""
from collections import defaultdict, deque

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.graph_edit import drop_unused_initializers, ensure_names, in_scope, producers_of
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


def attention_score_nodes(graph, floats: set[str]) -> set[str]:
    """Names of the nodes between each Softmax and the MatMul that made its scores (both included),
    and of everything that computes the additive mask on that path. The walk goes up through nodes
    with float outputs only, so it stops at Shape, comparisons and integer index arithmetic."""
    producers = producers_of(graph)
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


def to_fp16(src, dst, keep_fp32_nodes: tuple[str, ...] = (), only_ops: tuple[str, ...] | None = None,
            fp32_scopes: tuple[str, ...] = ()) -> dict:
    """Write an fp16 copy of `src` to `dst` (fp32 inputs/outputs); returns what was kept in fp32.

    only_ops: compute only these op types in fp16 (e.g. MatMul: fp16 weights and products, with everything
    between them, the residual stream included, in fp32); fp32_scopes: keep the nodes of these modules in fp32
    (T5's `DenseReluDense.wo`, whose output overflows fp16, as Hugging Face keeps it)."""
    model, weights = load_graph(src)
    graph = model.graph
    ensure_names(graph)
    floats = _float_tensors(model)
    scores = attention_score_nodes(graph, floats)
    fp32_nodes = {n.name for n in graph.node
                  if n.op_type in FP32_OPS or n.op_type in CONSTANT_OPS or n.name in scores
                  or (only_ops is not None and n.op_type not in only_ops and n.op_type != "Cast")
                  or in_scope(n, fp32_scopes)} | set(keep_fp32_nodes)
    half = _half_outputs(graph, fp32_nodes, floats)
    fixer = _TypeFixer(graph, half, weights)
    body = fixer.rewrite(graph, fp32_nodes, floats)
    body += _float_graph_outputs(graph, body, half)
    del graph.node[:]
    graph.node.extend(body)
    drop_unused_initializers(graph)  # (the float32 weights now read as float16)
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
