"""Reduced precision: onnx-fp16 and onnx-int8 folders, their conversion rules, gates and accuracy reports.

The stage-2 model with the Q-Former's text side has every graph (vision, the four Q-Former modes, the
LLM decoder), so one build per precision covers them all.
"""
import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.calibration import calibration_images, record_feeds
from export.parity import GATE_TEXTS, TOLERANCES, check_graph, graph_tolerance, probe_images
from export.fp16 import to_fp16
from export.graph_edit import weight_matmuls
from export.int4 import to_int4
from export.int8 import INT8_OPTIONS, int8_plan, int8_plan_of, int8_ranges, shift_activations_to_uint8, to_int8
from export.smoothing import CHANNEL_MAX
from export.graph_spec import torch_inputs
from export.specs import graph_specs
from hf_calls import hf_generate
from runtime import Blip2Pipeline
from runtime.errors import ImageInputError
from runtime.manifest import load_manifest
from runtime.backends import make_runner
from runtime.ort_runner import int8_products_saturate
from train.blip2.checkpoint import load_checkpoint

VARIANT = "stage2text"
ALL_GRAPHS = {"vision", "qformer_query", "qformer_text", "qformer_itm", "qformer_itm_one_text", "qformer_itm_one_image",
              "qformer_itg", "llm_decoder"}


@pytest.fixture(scope="module", params=["onnx-fp16", "onnx-int8", "onnx-int4"])
def reduced(request, make_engine):
    ck, engine = make_engine(VARIANT, request.param)
    return request.param, ck, engine


def _errors(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max error relative to the output's range, cosine) of one output, computed here from scratch."""
    got, ref = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return np.abs(got - ref).max() / np.abs(ref).max(), got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))


@torch.no_grad()
def test_reduced_graphs_stay_within_their_tolerance_of_pytorch(reduced, make_engine):
    """Every reduced graph against its PyTorch module on what the pipeline feeds it for held-out images
    (prefills and decode steps included): within the documented bound of its precision."""
    target, ck_dir, engine = reduced
    precision = target.split("-")[1]
    ck = load_checkpoint(ck_dir)
    assert sorted(p.name for p in engine.glob("*.onnx")) == sorted(f"{g}.onnx" for g in ALL_GRAPHS)
    assert not (engine / "fp32").exists()
    held_out = calibration_images(None, 32, count=1, seed=0).held_out
    feeds = record_feeds(make_engine(VARIANT, "onnx")[1], held_out, GATE_TEXTS[:4])
    for spec in graph_specs(ck.model):
        calls = feeds[spec.name]
        calls = [calls[0], calls[len(calls) // 2], calls[-1]]  # first call (a prefill), a middle one, the last
        graph, tol = make_runner(engine / f"{spec.name}.onnx"), graph_tolerance(precision, spec)
        if tol.max_rel is None:  # a graph the precision leaves in fp32 (int4: all but the LLM's): fp32's bound
            results = check_graph(spec, spec.build(ck.model).eval(), graph, tol, feeds=calls)
            assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
            continue
        for f in calls:
            refs = spec.build(ck.model).eval()(*torch_inputs(spec, f))
            refs = refs if isinstance(refs, tuple) else (refs,)
            outputs = graph.run(f)
            for out, ref in zip(spec.outputs, refs):
                rel, cosine = _errors(outputs[out.name], ref.numpy())
                assert rel <= tol.max_rel and cosine >= tol.min_cosine, (spec.name, out.name, rel, cosine)


def test_reduced_captions_follow_hugging_face_teacher_forced(reduced):
    """Fed Hugging Face's greedy tokens, the reduced pipeline's top choice agrees with them at least as often
    as its precision requires (fp16 0.95, int8 and int4 0.85), captions and prompts alike."""
    target, ck_dir, engine = reduced
    ck, pipe = load_checkpoint(ck_dir), Blip2Pipeline.from_dir(engine)
    images = calibration_images(None, 32, count=1, seed=0).held_out
    for prompts in (None, ["a photo of", "Question: what color is it? Answer:", "a", "there is"]):
        ref = hf_generate(ck, images, prompts, max_new_tokens=12)
        picks = [s.argmax(-1).tolist() for s in pipe.score(images, ref, prompt=prompts)]
        agree = sum(a == b for p, r in zip(picks, ref) for a, b in zip(p, r)) / sum(len(r) for r in ref)
        assert agree >= {"onnx-fp16": 0.95, "onnx-int8": 0.85, "onnx-int4": 0.85}[target], (prompts, agree)


def test_fp16_graphs_keep_fragile_ops_in_fp32(make_engine):
    _, engine = make_engine(VARIANT, "onnx-fp16")
    for graph in ALL_GRAPHS:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(engine / f"{graph}.onnx")))
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        # inputs and outputs stay float32 (or int64): the runtime feeds every precision alike
        assert {v.type.tensor_type.elem_type for v in model.graph.input} <= {TensorProto.FLOAT, TensorProto.INT64}
        assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}
        fragile = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert {n.op_type for n in fragile} == {"LayerNormalization", "Softmax"}, graph
        for node in fragile:
            assert types[node.input[0]] == TensorProto.FLOAT, (graph, node.name)
        # each attention's scores (the MatMul feeding a Softmax through the scaling and the mask) are float32
        producers = {o: n for n in model.graph.node for o in n.output}
        for softmax in (n for n in fragile if n.op_type == "Softmax"):
            node = producers[softmax.input[0]]
            while node.op_type != "MatMul":
                assert types[node.output[0]] == TensorProto.FLOAT, (graph, node.name)
                node = producers[next(i for i in node.input if i in producers and types.get(i) == TensorProto.FLOAT)]
            assert types[node.output[0]] == TensorProto.FLOAT, (graph, node.name)
        weights = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights
                               if t.name.endswith("__fp16")), graph
        assert sum(t.data_type == TensorProto.FLOAT16 for t in weights) >= len(weights) // 2, graph


def test_int8_graphs_are_symmetric_qdq_with_per_channel_weights(make_engine):
    _, engine = make_engine(VARIANT, "onnx-int8")
    float_weight_products = {}
    for graph in ALL_GRAPHS:
        model = onnx.load(str(engine / f"{graph}.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert dq and q, graph
        for n in dq + q:
            zero = inits[n.input[2]]
            if n.input[0] in inits:  # weights: symmetric int8
                assert zero.dtype == np.int8 and not zero.any(), f"{graph}: {n.name} is not symmetric int8"
            else:  # activations: symmetric int8 shifted to uint8 for ONNX Runtime (zero point 128)
                assert zero.dtype == np.uint8 and (zero == 128).all(), f"{graph}: {n.name} is not shifted int8"
        per_channel = [n for n in dq if n.input[0] in inits and inits[n.input[1]].size > 1]
        assert per_channel, f"{graph}: no per-channel weight quantization"
        # products of two activations (attention) stay in float: only a MatMul with a weight reads DequantizeLinear
        producers = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if n.op_type != "MatMul":
                continue
            dq_inputs = [producers[i] for i in n.input if i in producers and producers[i].op_type == "DequantizeLinear"]
            has_weight = any(d.input[0] in inits for d in dq_inputs) or any(i in inits for i in n.input)
            assert has_weight or not dq_inputs, f"{graph}: {n.name} quantizes a product of two activations"
        float_weight_products[graph] = sum(n.op_type == "MatMul" and any(i in inits for i in n.input)
                                           for n in model.graph.node)
    # each attention's output projection stays in float, every other weight product is quantized (the tiny
    # preset: 2 ViT and 2 OPT layers)
    assert float_weight_products["vision"] == 2 and float_weight_products["llm_decoder"] == 2


def test_reduced_pipelines_do_everything_fp32_does(make_engine, reduced):
    target, _, engine = reduced
    fp32 = Blip2Pipeline.from_dir(make_engine(VARIANT, "onnx")[1])
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(32, count=3, seed=41)
    texts = ["a red circle", "two squares", "a photo"]
    limit = {"onnx-fp16": 1e-2, "onnx-int8": 0.05, "onnx-int4": 1e-4}[target]  # (int4: the Q-Former stays fp32)
    assert np.abs(pipe.itm(images, texts) - fp32.itm(images, texts)).max() < limit
    sims = [p.similarity(p.embed_images(images), p.embed_texts(texts)) for p in (fp32, pipe)]
    assert np.abs(sims[0] - sims[1]).max() < limit
    for decoder in ("llm", "qformer"):
        rows = pipe.generate_ids(images, prompt=[None, "a photo of", "Question: what? Answer:"] if decoder == "llm"
                                 else None, decoder=decoder, max_new_tokens=6, num_beams=2)
        assert len(rows) == 3 and all(len(r) >= 1 for r in rows)
    # retrieval of "a red circle" (texts[0]) among the 3 images: the 2 with this pipeline's highest ITC similarity,
    # re-ranked by ITM probability (best first), each score what fp32 gives the same pair within `limit`
    matches = pipe.retrieve("a red circle", images, k=2)
    itc = sims[1][:, 0]
    assert len(matches) == 2 and len({m.index for m in matches}) == 2
    left_out = ({0, 1, 2} - {m.index for m in matches}).pop()
    assert itc[left_out] <= min(itc[m.index] for m in matches) + 1e-6
    assert all(abs(m.itc - itc[m.index]) < 1e-5 and abs(m.itc - sims[0][m.index, 0]) < limit for m in matches)
    fp32_itm = fp32.itm(images, [texts[0]] * 3)
    assert all(abs(m.itm - fp32_itm[m.index]) < limit for m in matches)
    assert matches[0].itm >= matches[1].itm


def test_fp16_keeps_fully_masked_rows_finite(tmp_path):
    """An additive mask filled with float32's lowest value is -inf in fp16; the score path stays fp32, so a row
    whose keys are all masked (left padding) gives finite outputs, as in fp32."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    big = numpy_helper.from_array(np.array(1e6, dtype=np.float32), "big")
    lowest = numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), "lowest")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["mask", "lowest"], ["additive"], name="fill"),
        helper.make_node("Add", ["scores", "additive"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "q"], ["ctx"], name="pv"),
        helper.make_node("Mul", ["ctx", "big"], ["y"], name="scale_out"),  # 1e6 * ... overflows fp16
    ]
    model = helper.make_model(helper.make_graph(nodes, "attn", [x, mask], [y], [w, big, lowest]),
                              opset_imports=[helper.make_opsetid("", 18)])
    src, dst = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, str(src))
    info = to_fp16(src, dst, keep_fp32_nodes=("scale_out",))
    assert info["kept_fp32"]["attention scores"] == 3  # qk, fill, add_mask
    feeds = {"x": rng.standard_normal((2, 4, 8)).astype(np.float32) * 0.1,
             "mask": np.array([[[1, 1, 1, 1]], [[0, 0, 1, 1]]], dtype=np.float32)}  # row 0: every key masked
    ref = make_runner(src).run(feeds)["y"]
    got = make_runner(dst).run(feeds)["y"]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    halves = [t for t in onnx.load(str(dst)).graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert [t.name for t in halves] == ["w__fp16"]


def test_int8_gate_fails_with_clipped_calibration(make_engine):
    """A graph calibrated on inputs 100x too small clips real activations: the int8 gate must catch it."""
    ck_dir, engine32 = make_engine(VARIANT, "onnx")
    ck = load_checkpoint(ck_dir)
    spec = next(s for s in graph_specs(ck.model) if s.name == "vision")
    feeds = record_feeds(engine32, probe_images(32, count=3, seed=8), GATE_TEXTS[:3])["vision"]
    tiny = [{k: v * 0.01 for k, v in f.items()} for f in feeds]
    out = engine32.parent / "clipped-vision.onnx"
    to_int8(engine32 / "vision.onnx", out, int8_ranges(engine32 / "vision.onnx", tiny))
    results = check_graph(spec, spec.build(ck.model).eval(), make_runner(out), TOLERANCES["int8"], feeds=feeds)
    assert any(not r.passed for r in results)
    good = engine32.parent / "good-vision.onnx"
    to_int8(engine32 / "vision.onnx", good, int8_ranges(engine32 / "vision.onnx", feeds))
    assert all(r.passed for r in check_graph(spec, spec.build(ck.model).eval(), make_runner(good),
                                             TOLERANCES["int8"], feeds=feeds))


def test_tensorrt_form_and_onnxruntime_form_compute_the_same(make_engine, tmp_path):
    """trt-int8 builds from symmetric int8 Q/DQ; onnx-int8 stores the activations as uint8 + 128 for ONNX
    Runtime's fused kernels. Both forms of one calibration give the same outputs."""
    ck_dir, engine32 = make_engine(VARIANT, "onnx")
    images = probe_images(32, count=3, seed=9)
    feeds = record_feeds(engine32, images, GATE_TEXTS[:3])
    for graph in ("vision", "llm_decoder"):
        s8, u8 = tmp_path / f"{graph}-s8.onnx", tmp_path / f"{graph}-u8.onnx"
        ranges = int8_ranges(engine32 / f"{graph}.onnx", feeds[graph])
        to_int8(engine32 / f"{graph}.onnx", s8, ranges)
        to_int8(engine32 / f"{graph}.onnx", u8, ranges, uint8_activations=True)
        model = onnx.load(str(s8))
        zeros = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("zero_point")]
        assert zeros and all(z.dtype == np.int8 and not z.any() for z in zeros)  # symmetric int8 throughout
        assert shift_activations_to_uint8(model) > 0
        a, b = make_runner(s8), make_runner(u8)
        for f in feeds[graph][:3]:
            for name, x in a.run(f).items():
                np.testing.assert_allclose(b.run(f)[name], x, rtol=1e-5, atol=1e-5 * np.abs(x).max())


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def test_int8_conversion_is_onnxruntimes_quantize_static(make_engine, tmp_path):
    """to_int8 quantizes one product at a time with the weights left on disk (a graph of any size); the result
    must be what ONNX Runtime's own quantize_static makes of the whole graph, called as its users call it:
    the calibrated ranges (its MinMax calibrator) agree, and with those ranges the two graphs compute the same
    numbers (run unoptimized: ONNX Runtime fuses the two files' Q/DQ differently, rounding differently)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static

    _, engine32 = make_engine(VARIANT, "onnx")
    feeds = record_feeds(engine32, probe_images(32, count=2, seed=5), GATE_TEXTS[:2])
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for graph in ("vision", "llm_decoder"):
        src = engine32 / f"{graph}.onnx"
        calibrator = create_calibrator(str(src), ["MatMul", "Gemm", "Conv"], str(tmp_path / f"{graph}-aug.onnx"),
                                       CalibrationMethod.MinMax, extra_options={"symmetric": True})
        calibrator.collect_data(_Feeds(feeds[graph]))
        theirs = calibrator.compute_data()
        head = tuple(int8_plan_of(src).float_outputs)  # (quantize_static leaves a tied head alone: see below)
        plan = int8_plan_of(src, exclude=head)
        ours = int8_ranges(src, feeds[graph], exclude=head)
        channels = {CHANNEL_MAX.format(t) for t in plan.channels}  # (LayerNorm outputs' per-channel maxima too)
        assert set(ours) == set(plan.tensors) | channels and len(plan.tensors) > 4
        ours = {t: ours[t] for t in plan.tensors}
        for tensor, magnitude in ours.items():
            assert magnitude == pytest.approx(float(theirs[tensor].range_value[1][0]), rel=1e-5), tensor
        model = onnx.load(str(src))
        quantized = int8_plan(model.graph).quantized
        excluded = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                    and n.name not in quantized]
        named = tmp_path / f"{graph}-named.onnx"  # (the exporter leaves some nodes unnamed; int8_plan names them)
        onnx.save(model, str(named))
        reference = tmp_path / f"{graph}-ort.onnx"
        quantize_static(str(named), str(reference), _Feeds(feeds[graph]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={**INT8_OPTIONS, "CalibTensorRangeSymmetric": True})
        ours_file = tmp_path / f"{graph}-ours.onnx"
        to_int8(src, ours_file, {t: float(theirs[t].range_value[1][0]) for t in ours}, exclude=head)
        a, b = ort.InferenceSession(str(ours_file), plain), ort.InferenceSession(str(reference), plain)
        names = [o.name for o in b.get_outputs()]
        for f in feeds[graph][:4]:
            for name, x, y in zip(names, a.run(names, f), b.run(names, f)):
                np.testing.assert_array_equal(x, y, err_msg=f"{graph}: {name}")


def test_int8_slices_of_a_large_weight_give_the_same_graph(make_engine, tmp_path, monkeypatch):
    """A weight over QDQ_SLICE_BYTES is quantized in slices of output channels and joined; with the threshold
    lowered so that every weight here is sliced, the graph computes exactly what the unsliced one does."""
    import onnxruntime as ort

    import export.int8 as precision

    _, engine32 = make_engine(VARIANT, "onnx")
    src = engine32 / "llm_decoder.onnx"
    feeds = record_feeds(engine32, probe_images(32, count=2, seed=5), GATE_TEXTS[:2])["llm_decoder"]
    ranges = int8_ranges(src, feeds)
    whole, sliced = tmp_path / "whole.onnx", tmp_path / "sliced.onnx"
    to_int8(src, whole, ranges)
    monkeypatch.setattr(precision, "QDQ_SLICE_BYTES", 4096)
    to_int8(src, sliced, ranges)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = ort.InferenceSession(str(sliced), plain), ort.InferenceSession(str(whole), plain)
    names = [o.name for o in b.get_outputs()]
    for f in feeds[:3]:
        for name, x, y in zip(names, a.run(names, f), b.run(names, f)):
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_int8_quantizes_a_tied_head_and_keeps_its_logits_float(make_engine, tmp_path):
    """OPT's head reads the embedding table through a Transpose: to_int8 gives it its own transposed weight in int8
    (else ONNX Runtime folds a second float copy of the table at load: 515 MB at OPT-2.7B's size) and leaves
    its output, the logits, unquantized; the logits stay close to the fp32 graph's."""
    _, engine32 = make_engine(VARIANT, "onnx")
    src = engine32 / "llm_decoder.onnx"
    fp32 = onnx.load(str(src))
    table = next(n.input[0] for n in fp32.graph.node if n.op_type == "Transpose"
                 and n.input[0] in {t.name for t in fp32.graph.initializer})  # the tied head's source
    feeds = record_feeds(engine32, probe_images(32, count=2, seed=5), GATE_TEXTS[:2])["llm_decoder"]
    dst = tmp_path / "llm.onnx"
    to_int8(src, dst, int8_ranges(src, feeds), uint8_activations=True)
    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == table]
    head = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.INT8 and list(inits[n.input[0]].dims)
            == list(reversed([t.dims for t in fp32.graph.initializer if t.name == table][0]))]
    assert len(head) == 1  # the table, transposed, in int8
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers["logits"].op_type not in ("DequantizeLinear", "QuantizeLinear")
    a, b = make_runner(dst), make_runner(src)
    for f in feeds[:3]:
        got, ref = a.run(f)["logits"], b.run(f)["logits"]
        assert _errors(got, ref)[1] >= 0.999


def test_activation_products_are_not_quantized():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="with_weight"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t"),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="two_activations")]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    assert weight_matmuls(graph) == (["with_weight"], ["two_activations"])


@pytest.mark.slow  # a second int8/int4 build of its own: ~1.5 min on 2 cores
def test_calibration_from_a_folder_of_images(make_engine, tmp_path):
    from export.build import Calibration, build

    ck_dir, _ = make_engine(VARIANT, "onnx")
    with pytest.raises(ImageInputError, match="holds 0 images"):
        calibration_images(tmp_path, 32, 8)
    with pytest.raises(ImageInputError, match="not a folder"):
        calibration_images(tmp_path / "missing", 32, 8)
    for i, im in enumerate(probe_images(48, count=9, seed=2)):
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = calibration_images(tmp_path, 32, count=4)
    assert [p.name for p in data.images] == ["0.png", "1.png", "2.png", "3.png"]
    assert [p.name for p in data.held_out] == ["5.png", "6.png", "7.png", "8.png"] == [p.name for p in data.report]
    engine = build(ck_dir, "onnx-int8", tmp_path / "engines",
                   calibration=Calibration(images=str(tmp_path), count=4))
    calib = load_manifest(engine).precision.calibration  # the folder records where its ranges came from
    assert calib["source"] == str(tmp_path.resolve()) and calib["count"] == 4 and calib["seed"] is None
    # the int8 graphs were calibrated on these images, not the synthetic default: their ranges differ
    default = make_engine(VARIANT, "onnx-int8")[1]
    scales = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(e / "vision.onnx")).graph.initializer
               if t.name.endswith("_scale")} for e in (engine, default)]
    assert any(not np.allclose(scales[0][n], scales[1][n]) for n in scales[0] if n in scales[1])


def test_default_calibration_holds_out_shapescaps_val_images():
    from export.calibration import calibration_images

    data = calibration_images(None, 32, count=6, seed=3, report=10)
    assert len(data.images) == 6 and len(data.held_out) == 4 and len(data.report) == 10
    assert data.texts and data.held_out_texts and data.source["seed"] == 3
    assert data.held_out_texts[0] not in data.texts[:1]  # the val split, not the calibration images


def test_tensorrt_targets_fail_at_once_without_tensorrt(tiny_engine, tmp_path):
    from export.build import BuildError, build

    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401  (only whether it imports matters)
        pytest.skip("TensorRT is installed here; the GPU tests cover trt-* builds")
    except ImportError:
        pass
    for target in ("trt-fp16", "trt-int8"):
        with pytest.raises(BuildError, match="needs TensorRT") as err:
            build(tiny_engine[0], target, tmp_path / "engines")
        assert "onnx-" in str(err.value)  # says which target builds the same precision without TensorRT
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").rglob("*.onnx"))


def test_teacher_forcing_feeds_the_given_tokens_and_returns_their_logits():
    from runtime.search import teacher_forced

    vocab = 8

    class NextToken:  # a decoder whose top choice is always the token after the one just fed
        def __init__(self):
            self.fed = []

        def step(self, tokens):
            self.fed.append(tokens.tolist())
            logits = np.zeros((len(tokens), vocab), np.float32)
            logits[np.arange(len(tokens)), (tokens + 1) % vocab] = 1.0
            return logits

    first = np.zeros((2, vocab), np.float32)
    first[:, 0] = 1.0
    dec = NextToken()
    rows = teacher_forced(dec, first, [[0, 1, 2, 3], [0, 1, 5]], pad_token_id=7)
    assert dec.fed == [[0, 0], [1, 1], [2, 5]]  # the given tokens, the shorter row padded after its end
    assert [r.shape for r in rows] == [(4, vocab), (3, vocab)]
    assert [r.argmax(-1).tolist() for r in rows] == [[0, 1, 2, 3], [0, 1, 2]]  # row 2's last choice is not 5


def test_int8_products_do_not_saturate_on_any_cpu(tmp_path):
    """ONNX Runtime's x86 uint8 x int8 kernels add pairs of products in int16 on CPUs without VNNI (AVX2, older
    AVX-512): 255 * 127 * 2 overflows and saturates. A fused int8 MatMul whose activations and weights sit near
    the ends of their ranges must still give the exact product of its dequantized operands (on such a CPU it
    did not, before the runner asked ONNX Runtime for exact products; elsewhere this holds anyway)."""
    rng = np.random.default_rng(0)
    k, n = 64, 16
    x = rng.choice([-1.0, 1.0], size=(4, k)).astype(np.float32) * 1.27  # stored as 1 or 255
                                                                        # (scale 0.01, zero point 128)
    x[:, ::2] = 1.27  # pairs of large same-signed products
    w8 = (rng.choice([-1, 1], size=(k, n)) * 127).astype(np.int8)
    w8[::2] = w8[1::2]
    scale_x, scale_w = np.float32(0.01), np.full(n, 0.02, np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y0"]),
             helper.make_node("QuantizeLinear", ["y0", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    inits = [numpy_helper.from_array(np.array(scale_x), "sx"), numpy_helper.from_array(np.array(128, np.uint8), "zx"),
             numpy_helper.from_array(w8, "w"), numpy_helper.from_array(scale_w, "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
             numpy_helper.from_array(np.array(np.float32(0.2)), "sy"),
             numpy_helper.from_array(np.array(128, np.uint8), "zy")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "mm.onnx")
    xq = np.clip(np.round(x / scale_x), -128, 127)  # what the graph's activations hold, as signed values
    expected = np.clip(np.round((xq * scale_x) @ (w8 * scale_w) / 0.2), -128, 127) * 0.2
    got = make_runner(tmp_path / "mm.onnx").run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, atol=0.2 + 1e-5)  # one output step


@pytest.mark.parametrize("text, exact", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n", False),  # Zen 4, Ice Lake
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", True),  # Skylake-SP: saturates
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx_vnni\n", True),  # 256-bit VNNI: not relied on
    ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", True),  # ARM: the option changes nothing there
    (None, True),  # no /proc/cpuinfo (not Linux)
])
def test_exact_int8_products_are_asked_for_unless_the_cpu_has_avx512_vnni(tmp_path, text, exact):
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    assert int8_products_saturate(str(path)) is exact


def _weight_products(path) -> list[str]:
    """MatMul/Gemm nodes of a graph that read an initializer (a weight), found here from the graph itself."""
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)]


def test_int4_stores_every_llm_weight_in_4_or_8_bits_and_leaves_the_rest(make_engine):
    """onnx-int4: every weight product of the fp32 LLM graph (OPT's FFN is exported as Gemm) becomes ONNX
    Runtime's MatMulNBits with 4-bit blocks of 32 (8-bit in the first quarter of the layers), none is left in
    float, and the LM head tied to the embedding table (read through a Transpose) gets 8-bit blocks of its own;
    the other graphs are the fp32 files, byte for byte; the manifest records the block size, symmetry, the CPU
    kernel's accuracy level, the head and the 8-bit layers."""
    ck, engine32 = make_engine(VARIANT, "onnx")
    _, engine4 = make_engine(VARIANT, "onnx-int4")
    fp32 = onnx.load(str(engine32 / "llm_decoder.onnx"))
    weights = {t.name: t for t in fp32.graph.initializer}
    tied_head = {n.output[0] for n in fp32.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    products = _weight_products(engine32 / "llm_decoder.onnx")
    heads = [n.name for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in tied_head]
    assert len(heads) == 1  # this OPT's head reads the embedding table through a Transpose
    model = onnx.load(str(engine4 / "llm_decoder.onnx"))
    nbits = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node
             if n.op_type == "MatMulNBits"}
    assert len(nbits) == len(products) + 1 and not _weight_products(engine4 / "llm_decoder.onnx")
    details = load_manifest(engine4).precision.details["llm_decoder"]
    assert details["logits_product"] == {"node": heads[0], "bits": 8}
    head = {name: a for name, a in nbits.items() if name.startswith(heads[0])}
    assert len(head) == 1 and all(a["bits"] == 8 for a in head.values())  # the LM head: 8-bit blocks
    body = {name: a for name, a in nbits.items() if name not in head}
    # the first quarter of the layers (rounded up) in 8-bit blocks: in graph order, the first products
    layers = json.loads((ck / "config.json").read_text())["text_config"]["num_hidden_layers"]
    first = products[:len(products) // layers * math.ceil(layers / 4)]
    assert layers >= 2 and len(products) % layers == 0 and first
    eight = {name for name in body if any(name.startswith(p) for p in first)}
    assert len(eight) == len(first) and all(body[name]["bits"] == 8 for name in eight)
    assert details["eight_bit_layers"] == {"layers": math.ceil(layers / 4), "of": layers,
                                           "weight_products": len(first)}
    body = {name: a for name, a in body.items() if name not in eight}
    assert body and all(a["bits"] == 4 and a["block_size"] == 32 for a in body.values())
    # 4 bits per weight and a float32 scale per 32 of them: 0.156 of the float32 bytes
    stored = {t.name: t for t in model.graph.initializer}
    packed = sum(numpy_helper.to_array(stored[n.input[i]]).nbytes for n in model.graph.node if n.name in body
                 for i in (1, 2))
    full = sum(numpy_helper.to_array(weights[i]).nbytes for n in fp32.graph.node if n.name in set(products)
               for i in n.input[1:2])
    assert packed <= 0.16 * full, (packed, full)
    for graph in ALL_GRAPHS - {"llm_decoder"}:
        assert (engine4 / f"{graph}.onnx").read_bytes() == (engine32 / f"{graph}.onnx").read_bytes(), graph
    assert (details["block_size"], details["symmetric"], details["accuracy_level"]) == (32, True, 4)


def test_int4_tensorrt_form_computes_what_the_onnxruntime_form_computes(make_engine, tmp_path):
    """trt-int4 builds from int4 initializers read by a block-quantized DequantizeLinear (symmetric: no zero
    points, which TensorRT's weight-only INT4 does not take); ONNX Runtime runs that form too, and it gives
    what MatMulNBits with float compute gives (all layers int4 there too). (ONNX Runtime's own optimizer would
    fuse the form back into MatMulNBits with int8 compute, so the plain form runs unoptimized here:
    DequantizeLinear, then MatMul.)"""
    import onnxruntime as ort

    _, engine32 = make_engine(VARIANT, "onnx")
    ort_form, trt_form = tmp_path / "nbits.onnx", tmp_path / "qdq.onnx"
    # the head float in both, every layer int4 in both (TensorRT's block quantization is int4 only)
    to_int4(engine32 / "llm_decoder.onnx", ort_form, accuracy_level=0, head_bits=None, eight_bit_layers=0)
    to_int4(engine32 / "llm_decoder.onnx", trt_form, for_tensorrt=True)
    model = onnx.load(str(trt_form))
    inits = {t.name: t for t in model.graph.initializer}
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(blocked) == len(_weight_products(engine32 / "llm_decoder.onnx"))
    for n in blocked:
        assert inits[n.input[0]].data_type == TensorProto.INT4 and len(n.input) == 2  # int4, no zero point
        assert {a.name: helper.get_attribute_value(a) for a in n.attribute}["block_size"] == 32
    feeds = record_feeds(engine32, probe_images(32, count=2, seed=3), GATE_TEXTS[:2])["llm_decoder"]
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = make_runner(ort_form), ort.InferenceSession(str(trt_form), plain)
    for f in (feeds[0], feeds[-1]):
        got = a.run(f)
        for name, y in zip(a.output_names, b.run(a.output_names, f)):
            assert np.abs(got[name] - y).max() <= 1e-5 * np.abs(y).max() + 1e-7, name


@pytest.mark.slow  # a second int8/int4 build of its own: ~1.5 min on 2 cores
def test_reduced_build_reuses_only_an_fp32_folder_of_the_same_checkpoint(make_engine, tmp_path, monkeypatch):
    """A reduced build starts from the fp32 folder beside it when that folder was exported from the same
    checkpoint with the same limits (no second export, which at full size takes most of a build); an fp32
    folder of another checkpoint under the same name is exported again, not reused."""
    import shutil

    import export.build as build_module

    ck_dir, engine32 = make_engine(VARIANT, "onnx")
    other_ck, _ = make_engine("tiny")
    exported = []
    real_export = build_module.export_graph
    monkeypatch.setattr(build_module, "export_graph", lambda spec, *a: exported.append(spec.name) or real_export(
        spec, *a))
    shutil.copytree(engine32, tmp_path / "engines" / "m" / "onnx")
    build_module.build(ck_dir, "onnx-int4", tmp_path / "engines", name="m")
    assert exported == []
    folder = build_module.build(other_ck, "onnx-int4", tmp_path / "engines", name="m")
    assert sorted(exported) == sorted(load_manifest(folder).graphs)  # every graph of the other model exported
