"""The exported graphs of a model (one declarative `GraphSpec` each, export/graph_spec.py) and the build's
limits that bound their dynamic axes.

    >>> from export.specs import graph_specs
    >>> [s.name for s in graph_specs(model)]          # model: train.blip2.model.Blip2Edge with OPT
    ['vision', 'qformer_query', 'qformer_text', 'qformer_itm', 'qformer_itm_one_text', 'qformer_itm_one_image',
     'qformer_itg', 'llm_decoder']

A graph is exported when the weights it needs exist (`@needs`): a stage-1 checkpoint has no LLM graphs, a
plain HF stage-2 one no Q-Former text graphs. The LLM's graphs depend on its family (export/llm_specs.py):
`llm_decoder` for OPT, `llm_encoder` + `llm_decoder` for T5.

Axis names used across graphs: `batch`, `text` (tokens fed in this call), `past` (tokens already in the KV
cache), `queries` (soft-prompt rows), `source` (an encoder's input tokens) and the derived `past+text`.
"""
import numpy as np

from export.graph_spec import AxisRange, GraphSpec, TensorSpec, needs
from export.llm_specs import llm_specs
from export.wrappers import (
    QFormerItgWrapper, QFormerItmOneWrapper, QFormerItmWrapper, QFormerQueryWrapper, QFormerTextWrapper, VisionWrapper,
    query_outputs,
)
from runtime.manifest import Limits, kv_names
from train.blip2.families import family
from train.blip2.presets import image_tokens


class LimitError(ValueError):
    """A build limit out of the range the model allows; the message gives the range."""


def resolve_limits(model, max_batch: int = 8, max_prompt_tokens: int | None = None,
                   max_new_tokens: int | None = None, max_qformer_tokens: int | None = None) -> Limits:
    """The build's limits for `model`, checked before any export. None means "as much as the position table
    allows, at most 64" (the Q-Former: its text limit). A decoder-only LLM must fit its position table:
    queries + prompt tokens (BOS included) + new tokens <= max_position_embeddings; T5 has none."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise LimitError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
    cfg = model.config
    q_limit = min(model.edge.max_text_tokens, cfg.qformer_config.max_position_embeddings)
    if max_qformer_tokens is not None and not 3 <= max_qformer_tokens <= q_limit:
        raise LimitError(f"max_qformer_tokens must be in [3, {q_limit}] (the Q-Former's text limit), got "
                         f"{max_qformer_tokens}")
    q_tokens = max_qformer_tokens or q_limit
    if not hasattr(model, "language_model"):
        if max_prompt_tokens is not None or max_new_tokens is not None:
            raise LimitError("--max-prompt-tokens and --max-new-tokens bound the LLM, and this checkpoint has none "
                             "(stage 1); leave them out")
        return Limits(max_batch, None, None, q_tokens)
    room = family(cfg).position_room(cfg)
    if room is None:  # relative positions (T5): no table to outgrow
        new = 64 if max_new_tokens is None else max_new_tokens
        prompt = 64 if max_prompt_tokens is None else max_prompt_tokens
        for flag, value in (("--max-new-tokens", new), ("--max-prompt-tokens", prompt)):
            if not isinstance(value, int) or value < 1:
                raise LimitError(f"{flag} must be an integer >= 1, got {value!r}")
        return Limits(max_batch, prompt, new, q_tokens)
    new = max_new_tokens if max_new_tokens is not None else min(64, room // 2)
    if not isinstance(new, int) or not 1 <= new <= room - 1:
        raise LimitError(f"--max-new-tokens must be in [1, {room - 1}]: the LLM's position table has "
                         f"{cfg.text_config.max_position_embeddings} positions, {cfg.num_query_tokens} taken by the "
                         f"image and at least 1 by the prompt; got {new}")
    prompt = max_prompt_tokens if max_prompt_tokens is not None else min(64, room - new)
    if not isinstance(prompt, int) or not 1 <= prompt <= room - new:
        raise LimitError(f"--max-prompt-tokens must be in [1, {room - new}] with --max-new-tokens {new} (the LLM's "
                         f"position table has {cfg.text_config.max_position_embeddings} positions, "
                         f"{cfg.num_query_tokens} taken by the image); got {prompt}")
    return Limits(max_batch, prompt, new, q_tokens)


# ---------------------------------------------------------------- vision
def vision_spec(model, limits: Limits) -> GraphSpec:
    v = model.config.vision_config

    def make_inputs(sizes, rng):
        return {"pixel_values": rng.standard_normal((sizes["batch"], 3, v.image_size, v.image_size), dtype=np.float32)}

    return GraphSpec(
        name="vision",
        build=VisionWrapper,
        inputs=[TensorSpec("pixel_values", "float32", ("batch", 3, v.image_size, v.image_size))],
        outputs=[_image_embeds(model.config)],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch)}],
        export_sizes={"batch": 2},
        check_sizes=[{"batch": 1}, {"batch": 3}],
    )


# ---------------------------------------------------------------- Q-Former
def _image_embeds(cfg) -> TensorSpec:
    v = cfg.vision_config
    return TensorSpec("image_embeds", "float32", ("batch", image_tokens(v), v.hidden_size))


def _random_image_embeds(cfg, batch: int, rng) -> np.ndarray:
    shape = _image_embeds(cfg).shape
    return rng.standard_normal((batch, *shape[1:]), dtype=np.float32)


def _random_text(model, batch: int, length: int, rng, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Q-Former token ids starting with `first` ([CLS] or [DEC]); the first row right-padded when it can be."""
    vocab = model.config.qformer_config.vocab_size
    ids = rng.integers(6, vocab, size=(batch, length), dtype=np.int64)
    ids[:, 0] = first
    mask = np.ones((batch, length), dtype=np.int64)
    if batch > 1 and length > 2:
        mask[0, -2:] = 0
        ids[0, -2:] = model.edge.pad_token_id
    return ids, mask


def qformer_query_spec(model, limits: Limits) -> GraphSpec:
    cfg = model.config
    nq, q = cfg.num_query_tokens, cfg.qformer_config
    head_dim = q.hidden_size // q.num_attention_heads
    wanted = query_outputs(model)
    outputs = [TensorSpec("query_output", "float32", ("batch", nq, q.hidden_size))]
    if "llm_prompt" in wanted:
        outputs.append(TensorSpec("llm_prompt", "float32", ("batch", nq, cfg.text_config.hidden_size)))
    if "image_feats" in wanted:
        outputs.append(TensorSpec("image_feats", "float32", ("batch", nq, cfg.image_text_hidden_size)))
    if "query_kv" in wanted:
        outputs += [TensorSpec(n, "float32", ("batch", q.num_attention_heads, nq, head_dim))
                    for n in kv_names(q.num_hidden_layers, "query")]
    return GraphSpec(
        name="qformer_query",
        build=QFormerQueryWrapper,
        inputs=[_image_embeds(cfg)],
        outputs=outputs,
        make_inputs=lambda sizes, rng: {"image_embeds": _random_image_embeds(cfg, sizes["batch"], rng)},
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch)}],
        export_sizes={"batch": 2},
        check_sizes=[{"batch": 1}, {"batch": 3}],
    )


@needs("embeddings", "text_projection")
def qformer_text_spec(model, limits: Limits) -> GraphSpec:
    cfg = model.config

    def make_inputs(sizes, rng):
        ids, mask = _random_text(model, sizes["batch"], sizes["text"], rng, model.edge.cls_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    return GraphSpec(
        name="qformer_text",
        build=QFormerTextWrapper,
        inputs=[TensorSpec("input_ids", "int64", ("batch", "text")),
                TensorSpec("attention_mask", "int64", ("batch", "text"))],
        outputs=[TensorSpec("text_feat", "float32", ("batch", cfg.image_text_hidden_size))],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch), "text": AxisRange(2, 12, limits.max_qformer_tokens)}],
        export_sizes={"batch": 2, "text": 7},
        check_sizes=[{"batch": 1, "text": 4}, {"batch": 3, "text": 11}],
    )


@needs("embeddings", "itm_head")
def qformer_itm_spec(model, limits: Limits) -> GraphSpec:
    cfg = model.config
    nq, q = cfg.num_query_tokens, cfg.qformer_config
    outputs = [TensorSpec("itm_logits", "float32", ("batch", 2)),
               TensorSpec("query_output", "float32", ("batch", nq, q.hidden_size))]
    if hasattr(model, "language_projection"):
        outputs.append(TensorSpec("llm_prompt", "float32", ("batch", nq, cfg.text_config.hidden_size)))

    def make_inputs(sizes, rng):
        ids, mask = _random_text(model, sizes["batch"], sizes["text"], rng, model.edge.cls_token_id)
        return {"image_embeds": _random_image_embeds(cfg, sizes["batch"], rng), "input_ids": ids,
                "attention_mask": mask}

    return GraphSpec(
        name="qformer_itm",
        build=QFormerItmWrapper,
        inputs=[_image_embeds(cfg), TensorSpec("input_ids", "int64", ("batch", "text")),
                TensorSpec("attention_mask", "int64", ("batch", "text"))],
        outputs=outputs,
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch), "text": AxisRange(2, 12, limits.max_qformer_tokens)}],
        export_sizes={"batch": 2, "text": 7},
        check_sizes=[{"batch": 1, "text": 4}, {"batch": 3, "text": 11}],
    )


def _itm_one_against_many(model, limits: Limits, one: str) -> GraphSpec:
    """ITM of one text (`one`="text") or one image against a batch of the other side: that side's axis is fixed
    at 1, the other's is `batch`."""
    cfg = model.config
    image, texts = (("batch", 1) if one == "text" else (1, "batch"))

    def make_inputs(sizes, rng):
        count = {1: 1, "batch": sizes["batch"]}
        ids, mask = _random_text(model, count[texts], sizes["text"], rng, model.edge.cls_token_id)
        embeds = _random_image_embeds(cfg, count[image], rng)
        return {"image_embeds": embeds, "input_ids": ids, "attention_mask": mask}

    return GraphSpec(
        name=f"qformer_itm_one_{one}",
        build=lambda m: QFormerItmOneWrapper(m, one),
        inputs=[TensorSpec("image_embeds", "float32", (image, *_image_embeds(cfg).shape[1:])),
                TensorSpec("input_ids", "int64", (texts, "text")),
                TensorSpec("attention_mask", "int64", (texts, "text"))],
        outputs=[TensorSpec("itm_logits", "float32", ("batch", 2))],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch), "text": AxisRange(2, 12, limits.max_qformer_tokens)}],
        export_sizes={"batch": 2, "text": 7},
        check_sizes=[{"batch": 1, "text": 4}, {"batch": 3, "text": 11}],
    )


@needs("embeddings", "itm_head")
def qformer_itm_one_text_spec(model, limits: Limits) -> list[GraphSpec]:
    """ITM of one text against a batch of images (text -> image retrieval); a one-layer Q-Former has no work
    to share and uses qformer_itm."""
    if model.config.qformer_config.num_hidden_layers < 2:
        return []
    return [_itm_one_against_many(model, limits, "text")]


@needs("embeddings", "itm_head")
def qformer_itm_one_image_spec(model, limits: Limits) -> GraphSpec:
    """ITM of one image against a batch of texts (image -> text retrieval, zero-shot labels)."""
    return _itm_one_against_many(model, limits, "image")


@needs("itg_head")
def qformer_itg_spec(model, limits: Limits) -> GraphSpec:
    cfg = model.config
    nq, q = cfg.num_query_tokens, cfg.qformer_config
    heads, layers = q.num_attention_heads, q.num_hidden_layers
    head_dim = q.hidden_size // heads
    max_text = limits.max_qformer_tokens

    def make_inputs(sizes, rng):
        b, text, past = sizes["batch"], sizes["text"], sizes["past"]  # past >= nq: the queries come first
        ids, _ = _random_text(model, b, text, rng, model.edge.dec_token_id)
        mask = np.ones((b, past + text), dtype=np.int64)
        if b > 1 and past + text - nq > 2:
            mask[0, -1] = 0  # a finished row (padding after its [SEP])
        position_ids = np.tile(np.arange(past - nq, past - nq + text, dtype=np.int64), (b, 1))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        for name in kv_names(layers, "past"):
            feeds[name] = rng.standard_normal((b, heads, past, head_dim), dtype=np.float32)
        return feeds

    batch = AxisRange(1, 1, limits.max_batch)
    return GraphSpec(
        name="qformer_itg",
        build=QFormerItgWrapper,
        inputs=[TensorSpec("input_ids", "int64", ("batch", "text")),
                TensorSpec("attention_mask", "int64", ("batch", "past+text")),
                TensorSpec("position_ids", "int64", ("batch", "text")),
                *[TensorSpec(n, "float32", ("batch", heads, "past", head_dim)) for n in kv_names(layers, "past")]],
        outputs=[TensorSpec("logits", "float32", ("batch", q.vocab_size)),
                 *[TensorSpec(n, "float32", ("batch", heads, "past+text", head_dim))
                   for n in kv_names(layers, "present")]],
        make_inputs=make_inputs,
        profiles=[
            {"batch": batch, "text": AxisRange(1, 1, max_text), "past": AxisRange(nq, nq, nq)},  # [DEC] (+ prompt)
            {"batch": batch, "text": AxisRange(1, 1, 1), "past": AxisRange(nq + 1, nq + 8, nq + max_text - 1)},
        ],
        export_sizes={"batch": 2, "text": 3, "past": nq + 2},
        check_sizes=[{"batch": 3, "text": 1, "past": nq}, {"batch": 1, "text": 1, "past": nq + 5},
                     {"batch": 2, "text": 4, "past": nq + 3}],
    )


SPEC_BUILDERS = [vision_spec, qformer_query_spec, qformer_text_spec, qformer_itm_spec, qformer_itm_one_text_spec,
                 qformer_itm_one_image_spec, qformer_itg_spec, llm_specs]


def graph_specs(model, limits: Limits | None = None) -> list[GraphSpec]:
    """The specs of every graph this model exports (those whose weights exist), in pipeline order."""
    limits = limits or resolve_limits(model)
    specs = []
    for build in SPEC_BUILDERS:
        if all(hasattr(model, n) for n in getattr(build, "needs", ())):
            made = build(model, limits)
            specs += made if isinstance(made, list) else [made]
    return specs
