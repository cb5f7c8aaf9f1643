"""Editing ONNX graphs, shared by the precisions (export.fp16, export.int8, export.int4): naming nodes, finding
producers and the weight products, the LM head, transposed weights, dropping unused initializers."""
import contextlib
import logging

import numpy as np
import onnx

from export.weights import Weights


def producers_of(graph) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def ensure_names(graph) -> None:
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def in_scope(node, scopes: tuple[str, ...]) -> bool:
    """Whether the node was exported from a module whose path contains one of `scopes` (the dynamo exporter
    records the module path of every node in its metadata)."""
    meta = {p.key: p.value for p in node.metadata_props}
    where = meta.get("pkg.torch.onnx.name_scopes", "") + meta.get("namespace", "")
    return any(scope in where for scope in scopes)


def drop_unused_initializers(graph) -> None:
    """Remove, in place, the initializers no node reads (deleting by index copies none of the others, as
    rebuilding the list would: a graph's weights can be gigabytes)."""
    used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


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


@contextlib.contextmanager
def quiet_onnxruntime():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def transposed_weights_as_kn(graph, weights: Weights) -> int:
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
    drop_unused_initializers(graph)
    return rewritten


def logits_product(graph) -> str | None:
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
