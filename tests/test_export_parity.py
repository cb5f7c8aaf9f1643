"""Export parity: every graph against PyTorch, and the whole pipeline token-exact against HF generate.

Runs on several tiny configurations unlike each other (see conftest.VARIANTS): OPT with
project_in/out, post-layernorm OPT, an untied LM head, other image/patch sizes and query counts.
"""
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import VARIANTS
from export.checkpoint import load_checkpoint
from export.e2e import hf_generate_ids, probe_images
from export.parity import TOLERANCES, ParityError, check_graph, raise_on_failure
from export.specs import graph_specs
from runtime import Blip2Pipeline
from runtime.runners import make_runner

PROMPTS = [None, "a photo of", "Question: what color is it? Answer:"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_build_records_passing_parity(make_engine, variant):
    _, engine = make_engine(variant)
    parity = json.loads((engine / "parity.json").read_text())
    manifest = json.loads((engine / "manifest.json").read_text())
    assert set(parity["graphs"]) == {"vision", "qformer_query", "llm_decoder"}
    for graph, summary in parity["graphs"].items():
        assert summary["passed"], graph
        assert summary["max_abs"] <= TOLERANCES["fp32"].atol
    assert parity["end_to_end"]["caption"]["token_agreement"] == 1.0
    assert parity["end_to_end"]["prompted"]["token_agreement"] == 1.0
    assert manifest["parity"]["passed"] is True
    # the gate checks shapes other than the export shapes: prefill with an empty cache and single-token steps
    cases = {c["case"] for c in parity["checks"] if c["graph"] == "llm_decoder"}
    assert any("past=0" in c for c in cases) and any("text=1" in c for c in cases)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_pipeline_token_exact_with_hf_generate(make_engine, variant, num_beams):
    ck_dir, engine = make_engine(variant)
    ck = load_checkpoint(ck_dir)
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(ck.config.vision_config.image_size, count=3, seed=11)
    for rows in (slice(0, 1), slice(0, 3)):  # batch 1 and batch 3 with prompts of different lengths
        imgs, prompts = images[rows], PROMPTS[rows]
        ref = hf_generate_ids(ck, imgs, prompts, max_new_tokens=12, num_beams=num_beams)
        got = pipe.generate_ids(imgs, prompt=prompts, max_new_tokens=12, num_beams=num_beams)
        assert got == ref, f"{variant} beams={num_beams} batch={len(imgs)}"


def test_repetition_and_min_length_match_hf(checkpoint, pipeline):
    images = probe_images(checkpoint.config.vision_config.image_size, count=2, seed=3)
    options = dict(max_new_tokens=10, min_new_tokens=6, repetition_penalty=1.5)
    ref = hf_generate_ids(checkpoint, images, [None, "a"], **options)
    assert pipeline.generate_ids(images, prompt=[None, "a"], **options) == ref


def test_decoder_weights_stored_once(tiny_engine, checkpoint):
    """One decoder graph serves prefill and decode: its weights appear once, not twice."""
    _, engine = tiny_engine
    model = onnx.load(str(engine / "llm_decoder.onnx"))
    stored = sum(np.prod(t.dims) * 4 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    lm = checkpoint.model.language_model
    unique = {p.data_ptr(): p.numel() * 4 for p in lm.parameters()}
    assert stored <= 1.05 * sum(unique.values())
    assert sorted(p.name for p in engine.glob("*.onnx")) == ["llm_decoder.onnx", "qformer_query.onnx", "vision.onnx"]


def test_gate_fails_on_a_wrong_graph(tiny_engine, checkpoint):
    """A graph that computes something else fails, and every failing output is listed."""
    _, engine = tiny_engine
    spec = next(s for s in graph_specs(checkpoint.model) if s.name == "qformer_query")
    wrapper = spec.build(checkpoint.model).eval()
    runner = make_runner(engine / "qformer_query.onnx")
    raise_on_failure(check_graph(spec, wrapper, runner, TOLERANCES["fp32"]))  # the real one passes
    with torch.no_grad():
        wrapper.model.language_projection.bias.add_(1e-2)  # a small but real difference in one output only
    results = check_graph(spec, wrapper, runner, TOLERANCES["fp32"])
    with torch.no_grad():
        wrapper.model.language_projection.bias.sub_(1e-2)
    with pytest.raises(ParityError) as err:
        raise_on_failure(results)
    failed = {(f.output, f.case) for f in err.value.failures}
    assert failed == {("llm_prompt", "batch=1"), ("llm_prompt", "batch=3")}
    assert "llm_prompt" in str(err.value)
