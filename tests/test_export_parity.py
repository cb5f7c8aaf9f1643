"""Export parity, checked independently of the gate: every graph against Hugging Face's own modules, and the
runtime token-exact against `Blip2ForConditionalGeneration.generate` called as its users call it.

Runs on several tiny configurations unlike each other (see conftest.VARIANTS): a tokenizer that adds no BOS,
post-layernorm OPT, an untied LM head, other image/patch sizes and query counts, and both T5 layouts (Flan-T5's
and the original T5's). The Hugging Face calls are
written out in tests/hf_calls.py, not taken from the toolkit (a shared helper would hide a shared mistake).
"""
import numpy as np
import onnx
import pytest
import torch

from conftest import ACTIVATION_VARIANTS, SLOW_VARIANTS, VARIANTS, variants
from hf_calls import ForceAt, hf_generate, hf_rows, processor
from export.parity import TOLERANCES, ParityError, check_graph, probe_images, raise_on_failure
from export.specs import graph_specs
from runtime import Blip2Pipeline
from runtime.backends import make_runner
from train.blip2.checkpoint import load_checkpoint

PROMPTS = [None, "a photo of", "Question: what color is it? Answer:"]
# Both T5 layouts' greedy cases run in the default suite with trained-like scales (t5-trained, t5-orig-trained),
# Flan-T5's beam search there too (t5-3); the greedy cases at random scales are the slow suite's (its time).
SLOW_CASES = {("t5", 1), ("t5-orig", 1)}


@pytest.mark.parametrize("variant,num_beams", [
    pytest.param(v, beams, marks=[pytest.mark.slow] if v in SLOW_VARIANTS or (v, beams) in SLOW_CASES else [],
                 id=f"{v}-{beams}")
    for beams in (1, 3) for v in VARIANTS if beams == 1 or v not in ACTIVATION_VARIANTS])
def test_pipeline_token_exact_with_hf_generate(make_engine, variant, num_beams):
    ck_dir, engine = make_engine(variant)
    ck = load_checkpoint(ck_dir)
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(ck.config.vision_config.image_size, count=4, seed=11)
    # captions in a batch of 4 (every row is a caption, HF's no-input-ids call), then single images
    assert pipe.generate_ids(images, max_new_tokens=12, num_beams=num_beams) == hf_generate(
        ck, images, None, max_new_tokens=12, num_beams=num_beams), f"{variant} captions"
    # prompts of different lengths in one batch (and a caption row among them), and each alone
    prompts = PROMPTS + ["a"]
    options = dict(max_new_tokens=12, num_beams=num_beams)
    assert pipe.generate_ids(images, prompt=prompts, **options) == hf_rows(ck, images, prompts, **options), variant
    for image, prompt in zip(images[:2], prompts[1:3]):
        assert pipe.generate_ids([image], prompt=prompt, **options) == hf_generate(ck, [image], [prompt], **options)


def test_caption_starts_from_bos_when_the_tokenizer_adds_none(make_engine):
    """HF's generate(pixel_values) puts text_config.bos_token_id after the placeholders even when the tokenizer
    adds no BOS to a prompt; the runtime's caption must start from the same ids (it used tokenizer(''))."""
    ck_dir, engine = make_engine("nobos")
    ck = load_checkpoint(ck_dir)
    assert ck.tokenizer("").input_ids == [] and ck.config.text_config.bos_token_id is not None
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(ck.config.vision_config.image_size, count=4, seed=2)
    assert pipe.generate_ids(images, max_new_tokens=10) == hf_generate(ck, images, None, max_new_tokens=10)
    for image in images[:2]:
        assert pipe.generate_ids(image, max_new_tokens=10) == hf_generate(ck, [image], None, max_new_tokens=10)


@pytest.mark.parametrize("variant", ["tiny", "untied", "t5"])
def test_generated_placeholder_is_embedded_like_any_token(make_engine, variant):
    """A decode step fed a generated token equal to image_token_index embeds it with OPT's table, as HF generate
    does (the runtime used to put zeros there): HF is forced to generate the placeholder at step 1, the runtime
    is fed the same tokens, and every later step's logits match."""
    ck_dir, engine = make_engine(variant)
    ck = load_checkpoint(ck_dir)
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(ck.config.vision_config.image_size, count=2, seed=4)
    inputs = processor(ck)(images=images, text=["a photo of", "Question: what is it? Answer:"], padding=True,
                           return_tensors="pt")
    with torch.no_grad():
        out = ck.hf.generate(**inputs, max_new_tokens=8, min_new_tokens=8, output_logits=True,
                             return_dict_in_generate=True,
                             logits_processor=[ForceAt(1, ck.config.image_token_index)])
    tokens = out.sequences[:, -len(out.logits):]  # the new tokens (an encoder-decoder returns only the decoder's)
    assert (tokens[:, 1] == ck.config.image_token_index).all()
    scores = pipe.score(images, tokens.tolist(), prompt=["a photo of", "Question: what is it? Answer:"])
    for row, got in enumerate(scores):
        want = torch.stack([step[row] for step in out.logits]).numpy()
        np.testing.assert_allclose(got[2:], want[2:], atol=1e-4, rtol=1e-3)  # the steps after the placeholder
        np.testing.assert_allclose(got[:2], want[:2], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", ["tiny", "t5"])
def test_repetition_and_min_length_match_hf(make_engine, variant):
    ck_dir, engine = make_engine(variant)
    checkpoint, pipeline = load_checkpoint(ck_dir), Blip2Pipeline.from_dir(engine)
    images = probe_images(checkpoint.config.vision_config.image_size, count=2, seed=3)
    options = dict(max_new_tokens=10, min_new_tokens=6, repetition_penalty=1.5)
    assert pipeline.generate_ids(images, **options) == hf_generate(checkpoint, images, None, **options)
    assert pipeline.generate_ids(images, prompt="a", **options) == hf_generate(checkpoint, images, ["a", "a"],
                                                                                **options)


@pytest.mark.parametrize("variant", variants(["tiny", "postln", "geometry"]))
@torch.no_grad()
def test_each_graph_computes_what_hugging_face_modules_compute(make_engine, variant):
    """vision, qformer_query and llm_decoder (a prefill, then decode steps on its cache) against the
    Hugging Face model's own forward passes on the same inputs."""
    ck_dir, engine = make_engine(variant)
    ck = load_checkpoint(ck_dir)
    hf, cfg = ck.hf, ck.config
    run = {name: make_runner(engine / f"{name}.onnx").run for name in ("vision", "qformer_query", "llm_decoder")}
    pixels = torch.randn(3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    features = hf.get_image_features(pixels)
    close = dict(atol=1e-4, rtol=1e-3)
    embeds = run["vision"]({"pixel_values": pixels.numpy()})["image_embeds"]
    np.testing.assert_allclose(embeds, features.last_hidden_state.numpy(), **close)
    soft = run["qformer_query"]({"image_embeds": embeds})["llm_prompt"]
    np.testing.assert_allclose(soft, features.pooler_output.numpy(), **close)

    nq = cfg.num_query_tokens
    text = torch.tensor([[1, 1, 2, 40, 41], [2, 50, 51, 52, 53], [1, 1, 1, 2, 60]])  # left-padded rows
    ids = torch.cat([torch.full((3, nq), cfg.image_token_index), text], 1)
    mask = torch.cat([torch.ones(3, nq, dtype=torch.long), (text != 1).long()], 1)
    ids_np, mask_np = ids.numpy(), mask.numpy()
    positions = np.clip(np.cumsum(mask_np, 1) - 1, 0, None)
    layers = cfg.text_config.num_hidden_layers
    past = {f"past_{k}_{i}": np.zeros((3, cfg.text_config.num_attention_heads, 0,
                                       cfg.text_config.hidden_size // cfg.text_config.num_attention_heads), np.float32)
            for i in range(layers) for k in ("key", "value")}
    out = run["llm_decoder"]({"input_ids": ids_np, "soft_prompt": soft, "attention_mask": mask_np,
                              "position_ids": positions, **past})
    want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits[:, -1]
    np.testing.assert_allclose(out["logits"], want.numpy(), atol=1e-4, rtol=1e-3)
    # two decode steps: an ordinary token, then the placeholder id, embedded like any other token
    for token in (7, cfg.image_token_index):
        step = np.full((3, 1), token, np.int64)
        ids_np, mask_np = np.concatenate([ids_np, step], 1), np.concatenate([mask_np, np.ones((3, 1), np.int64)], 1)
        cache = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        out = run["llm_decoder"]({"input_ids": step, "soft_prompt": np.zeros((3, 0, soft.shape[2]), np.float32),
                                  "attention_mask": mask_np, "position_ids": np.cumsum(mask_np, 1)[:, -1:] - 1,
                                  **cache})
        embeds_in = hf.get_input_embeddings()(torch.from_numpy(ids_np))
        embeds_in[:, :nq] = torch.from_numpy(soft)  # the placeholders of the prompt hold the soft prompt
        want = hf.language_model(inputs_embeds=embeds_in, attention_mask=torch.from_numpy(mask_np)).logits[:, -1]
        np.testing.assert_allclose(out["logits"], want.numpy(), atol=1e-4, rtol=1e-3)


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


def _erf_left_by_onnx_runtime(model: onnx.ModelProto, tmp_path) -> int:
    """How many Erf nodes ONNX Runtime's CPU optimizer leaves in `model` (each an unfused GELU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Erf" for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_gelu_is_exported_in_the_form_onnx_runtime_fuses(tiny_engine, tmp_path):
    """torch writes GELU in a form ONNX Runtime runs as five kernels; the export rewrites it to one it fuses,
    computing the same values."""
    from export.onnx_export import gelu_for_fusion

    module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU()).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},))
    torch_form = program.model_proto
    rewritten = onnx.ModelProto.FromString(torch_form.SerializeToString())
    assert _erf_left_by_onnx_runtime(torch_form, tmp_path) == 1  # (if this fails, ONNX Runtime now fuses torch's form)
    assert gelu_for_fusion(rewritten.graph) == 1
    assert _erf_left_by_onnx_runtime(rewritten, tmp_path) == 0
    feeds = {torch_form.graph.input[0].name: np.random.default_rng(0).standard_normal((4, 7, 16)).astype(np.float32)}
    import onnxruntime as ort

    no_fusion = ort.SessionOptions()
    no_fusion.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before, after = (ort.InferenceSession(m.SerializeToString(), no_fusion, providers=["CPUExecutionProvider"])
                     .run(None, feeds)[0] for m in (torch_form, rewritten))
    np.testing.assert_array_equal(before, after)
    with torch.no_grad():
        np.testing.assert_allclose(after, module(torch.from_numpy(next(iter(feeds.values())))).numpy(), atol=1e-6)
    # every GELU of an exported engine is in the fused form already
    vision = onnx.load(str(tiny_engine[1] / "vision.onnx"))
    assert any(n.op_type == "Erf" for n in vision.graph.node) and gelu_for_fusion(vision.graph) == 0
    assert _erf_left_by_onnx_runtime(vision, tmp_path) == 0
