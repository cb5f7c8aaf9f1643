"""Q-Former modes: mask semantics (in PyTorch and in the exported graphs), parity of every mode,
ITM / ITC / retrieval / ITG captioning through the runtime, and their bad input."""
import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from export.parity import probe_images, same_ranking
from hf_calls import hf_pixel_values, processor, qformer_texts, until_eos
from runtime import Blip2Pipeline, EngineFolderError, PromptError
from runtime.retrieval import ImageGallery, RetrievalError
from runtime.backends import make_runner
from train.blip2.checkpoint import load_checkpoint
from train.blip2.masks import qformer_mask
from train.blip2.model import Blip2Edge, EdgeConfig
from train.blip2.presets import blip2_config
from train.blip2.reference import itg_greedy

TEXTS = ["a red circle on the left", "a blue square", "there is a small green triangle at the top of the image",
         "two shapes"]



# ---------------------------------------------------------------- masks, in PyTorch
def test_mask_patterns():
    text_mask = torch.tensor([[1, 1, 0]])
    allowed = {m: (qformer_mask(m, text_mask, 2, torch.float32) == 0)[0, 0] for m in ("unimodal", "bidirectional",
                                                                                       "causal")}
    q, t = slice(0, 2), slice(2, 5)
    assert allowed["unimodal"][q, q].all() and not allowed["unimodal"][q, t].any()
    assert not allowed["unimodal"][t, q].any() and allowed["unimodal"][3, 2]
    assert allowed["bidirectional"][:, :4].all() and not allowed["bidirectional"][:, 4].any()  # padding hidden
    assert allowed["causal"][q, q].all() and not allowed["causal"][q, t].any()
    assert allowed["causal"][t, q].all()
    assert allowed["causal"][2, 2] and not allowed["causal"][2, 3] and allowed["causal"][3, 2]
    with pytest.raises(ValueError, match="unknown Q-Former mask mode"):
        qformer_mask("diagonal", text_mask, 2, torch.float32)


@pytest.fixture(scope="module")
def model():
    cfg = blip2_config("tiny", qformer_vocab_size=64)
    cfg.image_token_index = None
    torch.manual_seed(0)
    m = Blip2Edge(cfg, EdgeConfig(stage=1)).eval()
    with torch.no_grad():  # stronger than the default init, so that every dependency shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _joint(model, mode, image_embeds, ids):
    """[queries; text] through one mask mode -> hidden [B, Nq+T, D]."""
    queries = model.query_tokens.expand(ids.shape[0], -1, -1)
    embeds = torch.cat([queries, model.text_embeds(ids)], 1)
    mask = qformer_mask(mode, torch.ones_like(ids), model.num_queries, torch.float32)
    return model.qformer_forward(embeds, mask, image_embeds, model.num_queries, has_text=True)[0]


@torch.no_grad()
def test_mask_semantics_in_the_model(model):
    nq = model.num_queries
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    other_image = model.encode_image(torch.randn(1, 3, 32, 32))
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    changed = ids.clone()
    changed[0, 4] = 40  # change the token at text position 4
    # unimodal: queries ignore the text, the text ignores the image
    a, b = _joint(model, "unimodal", image, ids), _joint(model, "unimodal", image, changed)
    assert torch.allclose(a[:, :nq], b[:, :nq])
    assert torch.allclose(a[:, :nq], model.query_forward(image)[0], atol=1e-6)
    assert torch.allclose(a[:, nq:], _joint(model, "unimodal", other_image, ids)[:, nq:])
    # bi-directional: queries see the text, every text position sees every other
    a, b = _joint(model, "bidirectional", image, ids), _joint(model, "bidirectional", image, changed)
    assert not torch.allclose(a[:, :nq], b[:, :nq])
    assert not torch.allclose(a[:, nq + 1], b[:, nq + 1])
    # causal: text position i depends on positions <= i only, and on the image through the queries
    a, b = _joint(model, "causal", image, ids), _joint(model, "causal", image, changed)
    assert torch.allclose(a[:, : nq + 4], b[:, : nq + 4])
    assert not torch.allclose(a[:, nq + 4:], b[:, nq + 4:])
    assert not torch.allclose(a[:, nq:], _joint(model, "causal", other_image, ids)[:, nq:])


@torch.no_grad()
def test_model_matches_hf_retrieval_model(model):
    """ITC and ITM through our forward equal Hugging Face's Blip2ForImageTextRetrieval on the same weights."""
    hf = model.hf_model()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(6, 60, (2, 7))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    image_embeds = model.encode_image(pixels)
    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert torch.allclose(model.itm_forward(image_embeds, ids, mask)[0], itm.logits_per_image, atol=1e-5)
    # one text against both images (retrieval's re-rank), the text right-padded as a batch would pad it
    for row in (0, 1):
        one = hf(pixel_values=pixels, input_ids=ids[row:row + 1].expand(2, -1),
                 attention_mask=mask[row:row + 1].expand(2, -1), use_image_text_matching_head=True)
        got = model.itm_one_text(image_embeds, ids[row:row + 1], mask[row:row + 1])
        assert torch.allclose(got, one.logits_per_image, atol=1e-5)
    # one image against both texts (image -> text), one of them padded
    for image in (0, 1):
        one = hf(pixel_values=pixels[image:image + 1].expand(2, -1, -1, -1), input_ids=ids, attention_mask=mask,
                 use_image_text_matching_head=True)
        got = model.itm_one_image(image_embeds[image:image + 1], ids, mask)
        assert torch.allclose(got, one.logits_per_image, atol=1e-5)
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    feats = model.image_feats(model.query_forward(image_embeds)[0])
    assert torch.allclose(feats, itc.image_embeds, atol=1e-6)
    assert torch.allclose(model.text_feat(ids, mask), itc.text_embeds, atol=1e-6)


@torch.no_grad()
def test_cached_itg_steps_equal_the_full_causal_pass(model):
    image_embeds = model.encode_image(torch.randn(2, 3, 32, 32))
    ids = torch.randint(6, 60, (2, 6))
    ids[:, 0] = model.edge.dec_token_id
    full = model.itg_logits(image_embeds, ids, torch.ones_like(ids))  # [2, 6, V]
    _, past = model.query_forward(image_embeds)
    nq = model.num_queries
    logits, past = model.itg_step(ids[:, :3], torch.ones(2, nq + 3, dtype=torch.long),
                                  torch.arange(3).expand(2, 3), past)
    assert torch.allclose(logits, full[:, :3], atol=1e-5)
    for i in range(3, 6):
        logits, past = model.itg_step(ids[:, i:i + 1], torch.ones(2, nq + i + 1, dtype=torch.long),
                                      torch.full((2, 1), i), past)
        assert torch.allclose(logits[:, 0], full[:, i], atol=1e-5)


# ---------------------------------------------------------------- the exported graphs
@pytest.fixture(scope="module")
def stage1(make_engine):
    ck_dir, engine = make_engine("stage1")
    return load_checkpoint(ck_dir), engine, Blip2Pipeline.from_dir(engine)


@pytest.mark.parametrize("variant", ["stage1", pytest.param("stage1-geometry", marks=pytest.mark.slow), "stage2text"])
@torch.no_grad()
def test_every_mode_computes_what_hugging_face_computes(make_engine, variant):
    """Each exported mode through the runtime against Hugging Face's Blip2ForImageTextRetrieval (ITC: unimodal
    text graph + queries; ITM: bi-directional graph) and the uncached causal pass (ITG, which HF lacks)."""
    ck_dir, engine = make_engine(variant)
    ck, pipe = load_checkpoint(ck_dir), Blip2Pipeline.from_dir(engine)
    hf = ck.hf if ck.model.edge.stage == 1 else ck.model.hf_model(stage=1)
    size = ck.config.vision_config.image_size
    images = probe_images(size, count=3, seed=12)
    pixels, (ids, mask) = hf_pixel_values(ck, images), qformer_texts(ck, TEXTS[:3])
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    np.testing.assert_allclose(pipe.similarity(pipe.embed_images(images), pipe.embed_texts(TEXTS[:3])),
                               itc.logits_per_image.numpy(), atol=1e-5)
    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    np.testing.assert_allclose(pipe.itm(images, TEXTS[:3]), itm.logits_per_image.softmax(-1)[:, 1].numpy(),
                               atol=1e-5)
    embeds = ck.model.encode_image(pixels)
    assert pipe.generate_ids(images, decoder="qformer", max_new_tokens=8) == itg_greedy(ck.model, embeds, 8)
    assert ("llm_decoder" in pipe.runners) == (variant == "stage2text")


def test_text_graph_does_not_see_the_image(stage1):
    _, engine, _ = stage1
    runner = make_runner(engine / "qformer_text.onnx")
    assert runner.input_names == ["input_ids", "attention_mask"]


def test_itg_graph_is_causal(stage1):
    """In the exported ITG graph, a text position's keys/values do not depend on later tokens."""
    ck, engine, _ = stage1
    runner = make_runner(engine / "qformer_itg.onnx")
    q = ck.config.qformer_config
    nq, layers, heads, d = ck.config.num_query_tokens, q.num_hidden_layers, q.num_attention_heads, 8
    rng = np.random.default_rng(0)
    past = {f"past_{k}_{i}": rng.standard_normal((1, heads, nq, d), dtype=np.float32)
            for i in range(layers) for k in ("key", "value")}
    ids = np.array([[5, 20, 21, 22]])
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, nq + 4), np.int64),
             "position_ids": np.arange(4)[None], **past}
    a = runner.run(feeds)
    b = runner.run({**feeds, "input_ids": np.array([[5, 20, 21, 40]])})
    last = f"present_key_{layers - 1}"
    np.testing.assert_array_equal(a[last][:, :, : nq + 3], b[last][:, :, : nq + 3])
    assert not np.allclose(a[last][:, :, nq + 3], b[last][:, :, nq + 3])


def test_itm_graph_queries_see_the_text(stage1):
    _, engine, _ = stage1
    runner = make_runner(engine / "qformer_itm.onnx")
    rng = np.random.default_rng(0)
    feeds = {"image_embeds": rng.standard_normal((1, 17, 32), dtype=np.float32),
             "input_ids": np.array([[2, 20, 21, 3]]), "attention_mask": np.ones((1, 4), np.int64)}
    a = runner.run(feeds)["query_output"]
    b = runner.run({**feeds, "input_ids": np.array([[2, 20, 40, 3]])})["query_output"]
    assert not np.allclose(a, b)


# ---------------------------------------------------------------- runtime against PyTorch
@torch.no_grad()
def test_itc_itm_and_rankings_equal_pytorch(stage1):
    ck, _, pipe = stage1
    images = probe_images(32, count=6, seed=9)
    model = ck.model
    image_embeds = model.encode_image(hf_pixel_values(ck, images))
    ids, mask = qformer_texts(ck, TEXTS)
    ref_sim = torch.einsum("iqd,td->iqt", model.image_feats(model.query_forward(image_embeds)[0]),
                           model.text_feat(ids, mask)).amax(1).numpy()
    feats, text_feats = pipe.embed_images(images), pipe.embed_texts(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(text_feats, axis=-1), 1.0, atol=1e-5)
    sim = pipe.similarity(feats, text_feats)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    assert same_ranking(sim, ref_sim, 1e-5) and same_ranking(sim.T, ref_sim.T, 1e-5)
    assert not same_ranking(sim, -ref_sim, 1e-5)
    # ITM for every (image, text) pair, one image against all texts
    ref_itm = model.itm_forward(image_embeds[:1].expand(4, -1, -1), ids, mask)[0].softmax(-1)[:, 1].numpy()
    np.testing.assert_allclose(pipe.itm(images[0], TEXTS), ref_itm, atol=1e-5)
    # two-step retrieval, text -> images: ITC top-k, re-ranked by ITM, same order as PyTorch
    for t, text in enumerate(TEXTS):
        k = 4
        top = np.argsort(-ref_sim[:, t], kind="stable")[:k]
        probs = model.itm_forward(image_embeds[top], ids[t:t + 1].expand(k, -1), mask[t:t + 1].expand(k, -1)
                                  )[0].softmax(-1)[:, 1].numpy()
        hits = pipe.retrieve(text, images, k=k)
        chosen = [h.index for h in hits]
        kth = np.sort(ref_sim[:, t])[::-1][k - 1]
        assert (ref_sim[chosen, t] >= kth - 1e-5).all()  # the ITC step picks PyTorch's top k (up to ties at the edge)
        if set(chosen) != set(top.tolist()):
            continue  # a tie at the edge of the top k: the ITM order below would compare different sets
        reference = dict(zip(top.tolist(), probs))
        got = np.array([reference[h.index] for h in hits])  # PyTorch's ITM probability of each hit, in our order
        assert (np.diff(got) <= 1e-5).all()  # best first by PyTorch's probabilities, up to ties
        np.testing.assert_allclose([h.itm for h in hits], got, atol=1e-5)


def test_gallery_is_encoded_once_and_reusable(stage1, tmp_path):
    _, _, pipe = stage1
    images = probe_images(32, count=5, seed=4)
    gallery = pipe.encode_gallery(images)
    gallery.save(tmp_path / "g")
    loaded = ImageGallery.load(tmp_path / "g")
    assert isinstance(loaded.embeds, np.memmap) and loaded.embeds.dtype == np.float16
    a = pipe.retrieve("a red circle", loaded, k=3)
    b = pipe.retrieve("a red circle", images, k=3)
    assert [(h.index, h.itc) for h in a] == [(h.index, h.itc) for h in b]  # features kept in float32
    # embeddings kept in float16: ITM probabilities within float16's rounding of the image embeddings
    np.testing.assert_allclose([h.itm for h in a], [h.itm for h in b], atol=2e-3)
    # image -> texts
    hits = pipe.retrieve(np.asarray(images[0]), TEXTS, k=2)
    assert len(hits) == 2 and hits[0].itm >= hits[1].itm
    itc_only = pipe.retrieve("a red circle", loaded, k=5, rerank=False)
    assert [h.itc for h in itc_only] == sorted((h.itc for h in itc_only), reverse=True)


def test_a_folder_without_the_one_text_or_one_image_graphs_reranks_with_itm(stage1, tmp_path):
    """Engine folders built before qformer_itm_one_text / _one_image existed: ITM of one text against many images
    and of one image against many texts go through qformer_itm, and give the same probabilities."""
    import json
    import shutil

    _, engine, pipe = stage1
    old = tmp_path / "old"
    shutil.copytree(engine, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for graph in ("qformer_itm_one_text", "qformer_itm_one_image"):
        del manifest["graphs"][graph]
        (old / f"{graph}.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    before = Blip2Pipeline.from_dir(old)
    assert {"qformer_itm_one_text", "qformer_itm_one_image"} & set(before.runners) == set()
    assert {"qformer_itm_one_text", "qformer_itm_one_image"} <= set(pipe.runners)
    images = probe_images(32, count=11, seed=3)  # more than the folder's max batch (8): two runs per re-rank
    texts = [f"{t} {i}" for i in range(3) for t in TEXTS[:3]] + ["a photo", "red"]  # 11 texts, padded rows
    gallery = pipe.encode_gallery(images)

    def by_index(hits):
        return sorted((h.index, h.itm) for h in hits)

    for text in TEXTS:
        np.testing.assert_allclose(by_index(pipe.retrieve(text, gallery, k=11)),
                                   by_index(before.retrieve(text, gallery, k=11)), atol=1e-6)
    for image in images[:2]:
        np.testing.assert_allclose(by_index(pipe.retrieve(image, texts, k=11)),
                                   by_index(before.retrieve(image, texts, k=11)), atol=1e-6)
        np.testing.assert_allclose(pipe.itm(image, texts), before.itm(image, texts), atol=1e-6)
    np.testing.assert_allclose(pipe.itm(images, "a red circle"), before.itm(images, "a red circle"), atol=1e-6)


def test_a_retrieval_search_runs_blas_on_one_thread(stage1, monkeypatch):
    """During a retrieval query's ITC step (both ways) numpy's BLAS and FAISS's OpenMP run on the calling thread:
    their worker threads spin after a call, on the cores the ITM graph needs next. The index's own search, used
    alone, keeps the libraries' threads, and a query gives them back."""
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is in the scale extra")
    from runtime import index as index_module

    _, _, pipe = stage1
    np.ones((64, 64)) @ np.ones((64, 64))  # (BLAS loaded)
    if importlib.util.find_spec("faiss") is not None:  # a scan made before FAISS (and its OpenMP) was loaded
        import faiss  # noqa: F401

        stale = threadpoolctl.ThreadpoolController().select(internal_api=["openblas", "mkl", "blis"])
        monkeypatch.setattr(index_module, "_controller", (stale, False))

    def pools():
        return {p["filepath"]: p["num_threads"] for p in threadpoolctl.threadpool_info()}

    before = pools()
    assert any(n > 1 for n in before.values()), "this check needs a BLAS with more than one thread"
    seen = []
    for name in ("exact_top_images", "similarity"):
        def spying(*args, _f=getattr(index_module, name), **kw):
            seen.append(pools())
            return _f(*args, **kw)

        monkeypatch.setattr(index_module, name, spying)
    import runtime.retrieval as retrieval_module
    monkeypatch.setattr(retrieval_module, "similarity", index_module.similarity)
    images = probe_images(32, count=5, seed=4)
    gallery = pipe.encode_gallery(images)
    seen.clear()
    gallery.search(pipe.embed_texts(["a red circle"])[0], 2)
    assert seen and seen[-1] == before  # the index alone: untouched
    for query, candidates in (("a red circle", gallery), (np.asarray(images[0]), TEXTS)):
        seen.clear()
        pipe.retrieve(query, candidates, k=2)
        assert seen and all(n == 1 for n in seen[0].values()), seen
        assert pools() == before


class _TorchItg:
    """A runtime.search StepModel over the uncached PyTorch ITG pass (for beam-search parity)."""

    def __init__(self, model, image_embeds, ids):
        self.model, self.image_embeds, self.ids = model, image_embeds, torch.as_tensor(ids)

    def logits(self):
        with torch.no_grad():
            return self.model.itg_logits(self.image_embeds, self.ids, torch.ones_like(self.ids))[:, -1].numpy()

    def step(self, tokens):
        self.ids = torch.cat([self.ids, torch.as_tensor(tokens).reshape(-1, 1)], 1)
        return self.logits()

    def reorder(self, index):
        self.ids, self.image_embeds = self.ids[index], self.image_embeds[index]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_qformer_captions_equal_pytorch(stage1, num_beams):
    from runtime import search

    ck, _, pipe = stage1
    images = probe_images(32, count=3, seed=2)
    with torch.no_grad():
        image_embeds = ck.model.encode_image(hf_pixel_values(ck, images))
    cfg = search.GenerationConfig(max_new_tokens=10, num_beams=num_beams, eos_token_id=3, pad_token_id=0)
    ids = np.full((3, 1), ck.model.edge.dec_token_id)
    ref_model = _TorchItg(ck.model, image_embeds, ids)
    ref = search.generate(ref_model, ref_model.logits(), ids, cfg)
    got = pipe.generate_ids(images, decoder="qformer", max_new_tokens=10, num_beams=num_beams)
    assert got == ref
    assert got == [pipe.generate_ids(im, decoder="qformer", max_new_tokens=10, num_beams=num_beams)[0]
                   for im in images]  # batch equals one by one
    if num_beams == 1:
        assert got == itg_greedy(ck.model, image_embeds, 10)
    texts = pipe.caption(images, decoder="qformer", max_new_tokens=10, num_beams=num_beams)
    assert texts == [ck.qformer_tokenizer.decode(r, skip_special_tokens=True).strip() for r in got]


@torch.no_grad()
def test_question_aware_generation_equals_pytorch(make_engine):
    """generate(qformer_text=...) feeds the question to the Q-Former's bi-directional graph; the reference builds
    the same soft prompt in PyTorch and generates with the frozen OPT as Blip2ForConditionalGeneration.generate
    does (projected queries in place of Blip2Processor's placeholders)."""
    ck_dir, engine = make_engine("stage2text")
    ck, pipe = load_checkpoint(ck_dir), Blip2Pipeline.from_dir(engine)
    images = probe_images(32, count=2, seed=1)
    questions, prompts = ["what colour is the circle?", "where is it?"], ["Question: where? Answer:", "a"]
    ids, mask = qformer_texts(ck, questions)
    soft = ck.model.soft_prompt(ck.model.itm_forward(ck.model.encode_image(hf_pixel_values(ck, images)), ids,
                                                     mask)[1])
    inputs = processor(ck)(images=images, text=prompts, padding=True, return_tensors="pt")
    embeds = ck.hf.get_input_embeddings()(inputs.input_ids)
    embeds = embeds.masked_scatter((inputs.input_ids == ck.config.image_token_index)[..., None], soft)
    out = ck.hf.language_model.generate(inputs_embeds=embeds, input_ids=inputs.input_ids,
                                        attention_mask=inputs.attention_mask, max_new_tokens=6, do_sample=False)
    ref = until_eos(out[:, inputs.input_ids.shape[1]:].tolist(), ck.config.text_config.eos_token_id)
    assert pipe.generate_ids(images, prompt=prompts, qformer_text=questions, max_new_tokens=6) == ref
    plain = pipe.generate_ids(images, prompt=prompts, max_new_tokens=6)
    assert pipe.generate(images, prompt=prompts, max_new_tokens=6) == [pipe.llm.tokenizer.decode(r) for r in plain]


@pytest.mark.slow  # (a build of its own: the default suite's time)
def test_hf_retrieval_folder_exports(tmp_path):
    """A plain Blip2ForImageTextRetrieval save_pretrained folder (BERT-style tokenizer, no extras) exports
    qformer_query / text / itm (no ITG head, so no ITG graph) and matches HF's own forward."""
    from transformers import Blip2ForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from export.build import build
    from train.blip2.tokenizers import build_qformer_tokenizer

    tok = build_qformer_tokenizer(96)
    cfg = blip2_config("tiny", qformer_vocab_size=len(tok))
    cfg.qformer_config.use_qformer_text_input = True
    cfg.image_token_index = None
    torch.manual_seed(1)
    hf = Blip2ForImageTextRetrieval(cfg).eval()
    folder = tmp_path / "itm-checkpoint"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    engine = build(folder, "onnx", tmp_path / "engines")
    assert {p.name for p in engine.glob("*.onnx")} == {
        f"{g}.onnx" for g in ("vision", "qformer_query", "qformer_text", "qformer_itm", "qformer_itm_one_text",
                              "qformer_itm_one_image")}
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(32, count=2, seed=6)
    enc = tok(["a red circle", "a red circle"], return_tensors="pt")
    pixels = BlipImageProcessorPil(size={"height": 32, "width": 32})(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1].numpy()
    np.testing.assert_allclose(pipe.itm(images, "a red circle"), ref, atol=1e-5)
    hits = pipe.retrieve("a red circle", images, k=2)  # qformer_itm_one_text: one text, both images
    np.testing.assert_allclose([h.itm for h in sorted(hits, key=lambda h: h.index)], ref, atol=1e-5)
    texts = ["a red circle", "a blue square on the left"]  # qformer_itm_one_image: one image, both texts (one padded)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(pixel_values=pixels[:1].expand(2, -1, -1, -1), input_ids=enc.input_ids,
                 attention_mask=enc.attention_mask, use_image_text_matching_head=True
                 ).logits_per_image.softmax(-1)[:, 1].numpy()
    hits = pipe.retrieve(images[0], texts, k=2)
    np.testing.assert_allclose([h.itm for h in sorted(hits, key=lambda h: h.index)], ref, atol=1e-5)
    with pytest.raises(EngineFolderError, match="qformer_itg"):
        pipe.caption(images, decoder="qformer")


# ---------------------------------------------------------------- bad input
def test_bad_input(stage1, tiny_engine):
    _, _, pipe = stage1
    images = probe_images(32, count=3, seed=0)
    with pytest.raises(PromptError, match="empty"):
        pipe.embed_texts(["a circle", "  "])
    with pytest.raises(PromptError, match="no texts"):
        pipe.embed_texts([])
    with pytest.raises(RetrievalError, match="k=5 is larger than the image gallery"):
        pipe.retrieve("a circle", images, k=5)
    with pytest.raises(RetrievalError, match="positive integer"):
        pipe.retrieve("a circle", images, k=0)
    with pytest.raises(PromptError, match="3 images but 2 texts"):
        pipe.itm(images, ["a", "b"])
    with pytest.raises(PromptError, match="max_new_tokens=40 does not fit"):
        pipe.caption(images, decoder="qformer", max_new_tokens=40)
    with pytest.raises(EngineFolderError, match="llm_decoder"):
        pipe.caption(images, decoder="llm")
    with pytest.raises(PromptError, match="decoder must be"):
        pipe.caption(images, decoder="gpt")
    # too long: cut to the limit with a warning, same result as the cut text
    long = " ".join(["red circle"] * 40)
    with pytest.warns(UserWarning, match="cut to the engine's limit of 32"):
        feat = pipe.embed_texts([long])
    assert feat.shape == (1, pipe.manifest.qformer.itc_dim)
    # mixed image sizes in one call are resized like any other
    mixed = [np.zeros((20, 50, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)]
    assert pipe.embed_images(mixed).shape[0] == 2
    # the pipeline still works afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(pipe.itm(images, "a circle")) == 3
    # an LLM-only folder explains what is missing
    plain = Blip2Pipeline.from_dir(tiny_engine[1])
    with pytest.raises(EngineFolderError, match="qformer_itm.*stage 1"):
        plain.itm(images, "a circle")


def test_cli_match_and_retrieve(stage1, tmp_path):
    _, engine, _ = stage1
    paths = []
    for i, im in enumerate(probe_images(32, count=3, seed=8)):
        paths.append(str(tmp_path / f"im{i}.png"))
        im.save(paths[-1])
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime", *a], capture_output=True, text=True)  # noqa
    out = run("match", "--engines", str(engine), "--text", "a red circle", *paths)
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == paths
    out = run("retrieve", "--engines", str(engine), "--text", "a red circle", "--k", "2", *paths)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0] == "rank\titm_probability\titc_similarity\timage" and len(lines) == 3
    out = run("retrieve", "--engines", str(engine), "--image", paths[0], "--k", "2", "a red circle", "a square")
    assert out.returncode == 0 and out.stdout.splitlines()[0].endswith("\ttext")
    assert out.stdout.splitlines()[1].split("\t")[3] in ("a red circle", "a square")
    out = run("retrieve", "--engines", str(engine), "--text", "x", "--k", "9", *paths)
    assert out.returncode == 2 and "k=9 is larger than the image gallery (3 candidates)" in out.stderr
    out = run("retrieve", "--engines", str(engine), "--text", "x", *paths)  # the default k: 10, or every candidate
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1 + len(paths), out.stderr
    out = run("retrieve", "--engines", str(engine), "--image", str(tmp_path / "nope.png"), "a", "b")
    assert out.returncode == 2 and "no such file" in out.stderr
    out = run("caption", "--engines", str(engine), "--decoder", "qformer", "--max-new-tokens", "5", paths[0])
    assert out.returncode == 0 and out.stdout.startswith(paths[0] + "\t") and "note:" not in out.stderr
    out = run("ask", "--engines", str(engine), "--prompt", "a picture of", "--max-new-tokens", "5", paths[0])
    assert out.returncode == 0 and out.stdout.startswith(paths[0] + "\t")
    assert "has no LLM (a stage-1 folder): the Q-Former's own text decoder (ITG) writes the text, continuing" in \
        out.stderr
