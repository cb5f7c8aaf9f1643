"""SmoothQuant-style migration of activation outliers into the weights, before int8 quantization.

Real OPT checkpoints from 6.7B on carry a few hidden dimensions whose activations are 20-60x the rest (LLM.int8(),
SmoothQuant). int8 activations have one scale per tensor (what TensorRT and ONNX Runtime's QDQ kernels run), so an
outlier channel sets the step for all: the other channels keep a few of their 8 bits, and the gate fails
(a tiny OPT with 3 outlier dimensions: a KV cache 0.12 of its range off, against the int8 bound of 0.1).

SmoothQuant (Xiao et al., 2023) moves part of each input channel's range into the weights, exactly in float:
for a LayerNorm whose output X is read only by weight products X @ W, with s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
per input channel j, the LayerNorm's gain and bias are divided by s and every row j of each W multiplied by it, so
(X / s) @ (s W) = X @ W, while X / s has its channels' ranges evened out (alpha 0.5: the split the paper uses for
OPT). Weights are quantized per output channel, so the rows it scales up share their scale with other rows and
absorb the range more easily than the activations.

Only LayerNorms whose calibrated channel maxima show outliers are smoothed: the largest channel over `OUTLIER_RATIO`
times the median channel (OPT-6.7B's outlier dimensions: 20-60x; every LayerNorm of the random and trained demo
models measured 1.2-4.5x, `python bench/experiments/bench_gate_noise.py` prints it), so a model without outliers gets
the same int8 graph as before. The alpha and what was smoothed are recorded in the manifest's precision details.

    plan = int8_plan(graph)                  # plan.channels: the LayerNorm outputs whose channels to measure
    ranges = ...                             # calibration: {tensor: max|x|, CHANNEL_MAX.format(t): max|x_j| per j}
    ranges, report = smooth(graph, weights, plan, ranges)   # in place on the graph and its weights
"""
import numpy as np
from onnx import TensorProto, helper

SMOOTH_ALPHA = 0.5
OUTLIER_RATIO = 8.0
CHANNEL_MAX = "{}__int8_channel_max"  # the calibration's per-channel maxima of tensor {} (a key of the ranges)


def smoothable(graph, quantized: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{LayerNorm output: (LayerNorm node, the products reading it)} for each LayerNormalization with a constant gain
    whose output is read only by quantized MatMuls (weight [K, N]) or Gemms (weight [K, N], or [N, K] with transB)
    with a weight of their own, and is no graph output."""
    initializers = {t.name: t for t in graph.initializer}
    consumers, uses = {}, {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
            uses[i] = uses.get(i, 0) + 1
    outputs, chosen, out = {o.name for o in graph.output}, set(quantized), {}
    for node in graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        y = node.output[0]
        readers = consumers.get(y, [])
        if y in outputs or not readers or any(
                r.op_type not in ("MatMul", "Gemm") or r.name not in chosen or r.input[0] != y
                or r.input[1] not in initializers
                or len(initializers[r.input[1]].dims) != 2 or uses[r.input[1]] != 1 for r in readers):
            continue
        out[y] = (node.name, [r.name for r in readers])
    return out


def smooth(graph, weights, plan, ranges: dict, alpha: float = SMOOTH_ALPHA,
           outlier_ratio: float | None = None) -> tuple[dict, dict]:
    """Smooth every LayerNorm of `plan.channels` whose calibrated channels have outliers (graph and `weights`
    changed in place, computing the same function in float); returns the ranges with the smoothed activations'
    new per-tensor range (max_j max|X_j| / s_j: no recalibration needed) and a report for the manifest.
    `outlier_ratio`: default OUTLIER_RATIO."""
    outlier_ratio = OUTLIER_RATIO if outlier_ratio is None else outlier_ratio
    nodes, initializers = {n.name: n for n in graph.node}, {t.name: t for t in graph.initializer}
    ranges, smoothed, ratios = dict(ranges), [], []
    for y, (norm, readers) in plan.channels.items():
        channel_max = np.asarray(ranges.get(CHANNEL_MAX.format(y)), dtype=np.float64)
        if channel_max.ndim != 1 or not channel_max.size:
            continue
        ratio = float(channel_max.max() / max(np.median(channel_max), 1e-12))
        ratios.append(ratio)
        if ratio <= outlier_ratio:
            continue
        rows = {r: _input_axis(nodes[r]) for r in readers}  # the weight's axis along X's channels
        w_max = np.max([np.abs(weights.array(nodes[r].input[1])).max(axis=1 - rows[r]) for r in readers], axis=0)
        s = np.where((channel_max > 0) & (w_max > 0),
                     channel_max ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        ln = nodes[norm]
        for i in (1, 2):  # gain and bias divided by s, as this LayerNorm's own (others may share the originals)
            if len(ln.input) > i and ln.input[i]:
                own = helper.make_tensor(f"{ln.input[i]}__smoothed_{norm}", TensorProto.FLOAT, [len(s)],
                                         (weights.array(ln.input[i]) / s).astype(np.float32))
                graph.initializer.append(own)
                weights.know(own)
                ln.input[i] = own.name
        for r in readers:
            shape = (-1, 1) if rows[r] == 0 else (1, -1)
            weights.transform(initializers[nodes[r].input[1]], lambda v, s=s.reshape(shape): v * s)
        ranges[y] = float((channel_max / s).max())
        smoothed.append(norm)
    report = {"alpha": alpha, "outlier_ratio": outlier_ratio, "layer_norms_smoothed": len(smoothed),
              "layer_norms_measured": len(ratios),
              "largest_channel_over_median": round(max(ratios), 2) if ratios else None}
    return ranges, report


def _input_axis(node) -> int:
    """The axis of a product's weight along its input's channels: 0 for MatMul's [K, N], 1 for a Gemm's transB."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    return 1 if trans_b else 0
