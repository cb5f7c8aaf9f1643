"""The generic export loop: GraphSpec + model -> one ONNX file per graph.

    from export.onnx_export import export_graph
    path = export_graph(spec, model, out_dir)   # writes out_dir/<spec.name>.onnx

Uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, opset 18) with
`torch.export` dynamic dimensions built from the spec's named axes. Graphs whose
weights exceed 64 MiB are saved with external data (`<name>.onnx.data`).
"""
import gc
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.graph_spec import GraphSpec, torch_inputs

OPSET = 18
# Past this, a graph's weights go to `<name>.onnx.data` (protobuf cannot hold 2 GiB in one file in any case).
# Saving a graph inline builds the whole protobuf message and then its serialized bytes while the model is still
# loaded: twice the graph's weights on top of it (Flan-T5-XL's widths, 2 layers: the 0.91 GiB decoder graph's save
# peaked 1.91 GiB over the loaded model; its 0.2 GiB vision graph's, 0.48 GiB); external data is written one tensor
# at a time (0.00 GiB over it).
EXTERNAL_DATA_BYTES = 64 * 2**20


def _dims(spec: GraphSpec) -> dict[str, torch.export.Dim]:
    """One torch.export.Dim per named axis; a derived axis such as 'past+text' gets its own Dim."""
    names = {a for t in spec.inputs for a in t.shape if isinstance(a, str)}
    return {a: torch.export.Dim(re.sub(r"\W", "_", a.replace("+", "_plus_")), min=0) for a in sorted(names)}


def _dynamic_shapes(spec: GraphSpec, wrapper: torch.nn.Module) -> tuple:
    """dynamic_shapes matching the wrapper's signature: named args first, then a tuple for `*past`."""
    dims = _dims(spec)
    per_input = [{i: dims[a] for i, a in enumerate(t.shape) if isinstance(a, str)} for t in spec.inputs]
    import inspect

    params = list(inspect.signature(wrapper.forward).parameters.values())
    named = [p for p in params if p.kind != p.VAR_POSITIONAL]
    if len(named) == len(params):
        return tuple(per_input)
    return (*per_input[: len(named)], tuple(per_input[len(named):]))


def weight_bytes(program) -> int:
    """Bytes of the exported graph's initializers (only the weights the graph really uses)."""
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def export_graph(spec: GraphSpec, model: torch.nn.Module, out_dir: Path) -> Path:
    """Trace `spec` on `model` and write `<out_dir>/<spec.name>.onnx`; returns the path."""
    wrapper = spec.build(model).eval()
    feeds = spec.make_inputs(spec.export_sizes, np.random.default_rng(0))
    args = torch_inputs(spec, feeds)
    path = Path(out_dir) / f"{spec.name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec, wrapper),
        )
    program.save(str(path), external_data=weight_bytes(program) > EXTERNAL_DATA_BYTES)
    del program
    _forget_rewriter_matches()
    _finish(path, spec)
    onnx.checker.check_model(str(path))
    return path


def _forget_rewriter_matches() -> None:
    """onnxscript's rewrite rules (module-level objects the exporter optimizes with) keep, in their matchers, the
    last graph they matched, and through its initializers the model's parameters: a released model's weights would
    stay in memory. Reset that state (onnxscript 0.7; nothing to do where the matcher differs)."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for name in ("_graph", "_current_node", "_match", "_tracer"):
                if name in obj.__dict__:
                    obj.__dict__[name] = None


def _finish(path: Path, spec: GraphSpec) -> None:
    """Name the dynamic axes and put GELU in the form ONNX Runtime fuses, in the saved file (weights untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    _rename_dims(model, spec)
    gelu_for_fusion(model.graph)
    onnx.save(model, str(path))


def _rename_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give every dynamic axis of the ONNX graph's inputs and outputs its spec name ('past+text', ...)."""
    axes = spec.dynamic_axes()
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, name in axes.get(value.name, {}).items():
            dims[i].dim_param = name


def gelu_for_fusion(graph: onnx.GraphProto) -> int:
    """torch's exporter writes GELU as x * (0.5 * (1 + erf(x / sqrt 2))), a form ONNX Runtime's GeluFusion does not
    recognise: each GELU then runs as five element-wise kernels. Rewrite each to (x * 0.5) * (1 + erf(x / sqrt 2)),
    which it fuses into one (and with the bias Add before it into BiasGelu): 1.10 against 0.74 ms for 32 x 32 x
    1024 values on 2 cores. The rewritten graph computes the same values bit for bit (scaling by 0.5 is exact);
    the fused kernel evaluates erf its own way (the re-rank graph's logits moved by 4e-8). TensorRT, which reads
    the same file, fuses either form. Returns how many GELUs were rewritten."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scalars = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims}
    scalars.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
                    and not n.attribute[0].t.dims})

    def op(name, kind):  # the node of type `kind` producing `name`, or None
        node = producer.get(name)
        return node if node is not None and node.op_type == kind else None

    def has_scalar(node, value):  # (the input that is the scalar `value`, the other input), or None
        for i, name in enumerate(node.input):
            if name in scalars and scalars[name].dtype.kind == "f" and float(scalars[name]) == value:
                return name, node.input[1 - i]
        return None

    rewritten = 0
    for half in [n for n in graph.node if n.op_type == "Mul" and len(n.input) == 2]:
        found = has_scalar(half, 0.5)
        one = found and op(found[1], "Add")
        plus_one = one and has_scalar(one, 1.0)
        erf = plus_one and op(plus_one[1], "Erf")
        div = erf and op(erf.input[0], "Div")
        outer = consumers.get(half.output[0], [])
        if not (div and len(outer) == 1 and outer[0].op_type == "Mul" and div.input[0] in outer[0].input
                and has_scalar(div, float(np.float32(np.sqrt(2))))):
            continue
        x = div.input[0]
        half.input[:] = [x, found[0]]  # x * 0.5 ...
        outer[0].input[:] = [half.output[0], one.output[0]]  # ... * (1 + erf(x / sqrt 2))
        rewritten += 1
    return rewritten
