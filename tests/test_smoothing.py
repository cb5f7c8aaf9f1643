"""int8 where the LLM has outlier features: SmoothQuant-style migration of the activation outliers into the weights
(export/smoothing.py) computes the same function in float, is applied only where the calibration shows outliers,
and makes int8 pass its gate where one scale per tensor fails it."""
import json

import numpy as np

import export.smoothing as smoothing
from export.calibration import calibration_images, record_feeds
from export.parity import TOLERANCES, check_graph, select_cases
from export.int8 import int8_plan, int8_ranges, to_int8
from export.specs import graph_specs
from export.weights import load_graph
from runtime.manifest import load_manifest
from runtime.backends import make_runner
from train.blip2.checkpoint import load_checkpoint


def _decoder_feeds(engine, count=2):
    data = calibration_images(None, 32, 8, 0, 4)
    return record_feeds(engine, data.images[:count], data.texts[:count])["llm_decoder"]


def test_smoothing_computes_the_same_in_float(make_engine, tmp_path):
    """Smoothing the fp32 decoder of a model with outlier channels (no quantization) changes its weights and every
    LayerNorm's gain, not its outputs: within float32 rounding of the original."""
    _, engine = make_engine("opt-outliers")
    src = engine / "llm_decoder.onnx"
    feeds = _decoder_feeds(engine)
    model, weights = load_graph(src)
    plan = int8_plan(model.graph)
    ranges, report = smoothing.smooth(model.graph, weights, plan, int8_ranges(src, feeds))
    assert report["layer_norms_smoothed"] == len(plan.channels) >= 4  # two per decoder layer
    assert report["largest_channel_over_median"] > 20
    weights.save(model, tmp_path / "smoothed.onnx")
    before, after = make_runner(src), make_runner(tmp_path / "smoothed.onnx")
    for f in feeds[:3]:
        a, b = before.run(f), after.run(f)
        for name in a:
            assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(np.abs(a[name]).max(), 1.0), name


def test_int8_passes_its_gate_with_outliers_only_smoothed(make_engine, monkeypatch, tmp_path):
    """A tiny OPT with 3 outlier dimensions: its int8 build passes the gate smoothed (measured 0.018 of a KV cache's
    range against the bound of 0.1), alpha recorded in the manifest; the same graph quantized with one scale per
    activation tensor fails the gate's check (0.48); a model without outliers is not smoothed."""
    ck_dir, engine = make_engine("opt-outliers", "onnx-int8")
    details = load_manifest(engine).precision.details["llm_decoder"]
    assert details["smoothing"]["alpha"] == smoothing.SMOOTH_ALPHA and details["smoothing"]["layer_norms_smoothed"]
    assert json.loads((engine / "parity.json").read_text())["end_to_end"]["passed"]
    _, plain = make_engine("tiny", "onnx-int8")
    assert all("smoothing" not in d for d in load_manifest(plain).precision.details.values())

    ck = load_checkpoint(ck_dir)
    spec = next(s for s in graph_specs(ck.model) if s.name == "llm_decoder")
    engine32 = make_engine("opt-outliers")[1]
    src, feeds = engine32 / "llm_decoder.onnx", select_cases(_decoder_feeds(engine32, 3))
    ranges = int8_ranges(src, feeds)
    wrapper = spec.build(ck.model).eval()
    monkeypatch.setattr(smoothing, "OUTLIER_RATIO", float("inf"))
    to_int8(src, tmp_path / "plain.onnx", ranges)
    assert any(not r.passed for r in check_graph(spec, wrapper, make_runner(tmp_path / "plain.onnx"),
                                                 TOLERANCES["int8"], feeds=feeds))
    monkeypatch.undo()
    to_int8(src, tmp_path / "smoothed.onnx", ranges)
    assert all(r.passed for r in check_graph(spec, wrapper, make_runner(tmp_path / "smoothed.onnx"),
                                             TOLERANCES["int8"], feeds=feeds))
