"""One declarative spec per exported graph, in the spirit of optimum's `OnnxConfig`.

A `GraphSpec` says everything the generic export loop, the parity gate, the
manifest and the TensorRT builder need to know about a graph: the wrapper
module, input and output tensors with symbolic axes, how to make dummy inputs
at any axis sizes, and the TensorRT optimization profiles, all derived from
the same `AxisRange` numbers.

    >>> from export.specs import graph_specs
    >>> [s.name for s in graph_specs(model)]          # model: train.model.Blip2Edge
    ['vision', 'qformer_query', 'qformer_text', 'qformer_itm', 'qformer_itg', 'llm_decoder']

A graph is exported when the weights it needs exist (`@needs`): a
stage-1 checkpoint has no `llm_decoder`, a plain HF stage-2 one no Q-Former
text graphs.

Axis names used across graphs: `batch`, `text` (tokens fed in this call),
`past` (tokens already in the KV cache), `queries` (soft-prompt rows) and the
derived `past+text`.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from runtime.manifest import Graph, Limits, Tensor, kv_names
from runtime.prompt import PromptLayout, pad_rows, position_ids
from export.wrappers import (
    LlmDecoderWrapper, QFormerItgWrapper, QFormerItmWrapper, QFormerQueryWrapper, QFormerTextWrapper, VisionWrapper,
    query_outputs,
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple  # ints for fixed axes, str for named dynamic axes


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis; the TensorRT profile and the export checks use the same numbers.
    `opt` (the size TensorRT tunes for) is kept within [min, max]."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        object.__setattr__(self, "opt", max(self.min, min(self.opt, self.max)))


class LimitError(ValueError):
    """A build limit out of the range the model allows; the message gives the range."""


def resolve_limits(model, max_batch: int = 8, max_prompt_tokens: int | None = None,
                   max_new_tokens: int | None = None, max_qformer_tokens: int | None = None) -> Limits:
    """The build's limits for `model`, checked before any export. None means "as much as the position table
    allows, at most 64" (the Q-Former: its text limit). Stage 2 must fit the LLM's position table:
    queries + prompt tokens (BOS included) + new tokens <= max_position_embeddings."""
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
    room = cfg.text_config.max_position_embeddings - cfg.num_query_tokens
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


@dataclass
class GraphSpec:
    name: str
    build: Callable  # model -> torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    make_inputs: Callable  # (sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]
    profiles: list[dict[str, AxisRange]]  # one dict per TensorRT optimization profile
    export_sizes: dict[str, int]  # axis sizes of the dummy inputs used for tracing
    check_sizes: list[dict[str, int]] = field(default_factory=list)  # other sizes for the parity gate

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: axis name}} for inputs and outputs."""
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs + self.outputs}

    def trt_profiles(self) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
        """Per profile, {input name: (min shape, opt shape, max shape)} for every input with a dynamic axis."""
        out = []
        for ranges in self.profiles:
            shapes = {}
            for t in self.inputs:
                if not any(isinstance(a, str) for a in t.shape):
                    continue
                shapes[t.name] = tuple(tuple(_axis_size(a, ranges, k) for a in t.shape) for k in ("min", "opt", "max"))
            out.append(shapes)
        return out

    def to_manifest(self, file: str) -> Graph:
        """The manifest's entry for this graph, stored in `file`."""
        return Graph(file=file,
                     inputs=[Tensor(t.name, t.dtype, list(t.shape)) for t in self.inputs],
                     outputs=[Tensor(t.name, t.dtype, list(t.shape)) for t in self.outputs],
                     profiles=[{k: [r.min, r.opt, r.max] for k, r in p.items()} for p in self.profiles])


def _axis_size(axis, ranges: dict[str, AxisRange], which: str) -> int:
    if isinstance(axis, int):
        return axis
    return sum(getattr(ranges[a], which) for a in axis.split("+"))


def needs(*attributes: str):
    """Declare the model attributes (weights) a graph needs; without them the graph is not exported."""
    def mark(builder):
        builder.needs = attributes
        return builder
    return mark


# ---------------------------------------------------------------- vision
def vision_spec(model, limits: Limits) -> GraphSpec:
    v = model.config.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1  # + class token

    def make_inputs(sizes, rng):
        return {"pixel_values": rng.standard_normal((sizes["batch"], 3, v.image_size, v.image_size), dtype=np.float32)}

    return GraphSpec(
        name="vision",
        build=VisionWrapper,
        inputs=[TensorSpec("pixel_values", "float32", ("batch", 3, v.image_size, v.image_size))],
        outputs=[TensorSpec("image_embeds", "float32", ("batch", patches, v.hidden_size))],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch)}],
        export_sizes={"batch": 2},
        check_sizes=[{"batch": 1}, {"batch": 3}],
    )


# ---------------------------------------------------------------- Q-Former
def _image_embeds(cfg) -> TensorSpec:
    v = cfg.vision_config
    return TensorSpec("image_embeds", "float32", ("batch", (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size))


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
        return {"image_embeds": _random_image_embeds(cfg, sizes["batch"], rng), "input_ids": ids, "attention_mask": mask}

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


# ---------------------------------------------------------------- LLM decoder with KV cache
def _llm_feeds(layout: PromptLayout, vocab: int, sizes: dict, rng) -> dict:
    """input_ids, attention_mask and position_ids as the runtime makes them (runtime.prompt): a prefill's rows
    are laid out around `queries` placeholders, the first row shorter (left padding); a decode step feeds any
    token, the placeholder id included (it is then embedded like any other id). The cache's first row is
    left-padded too."""
    b, text, past, q = sizes["batch"], sizes["text"], sizes["past"], sizes["queries"]
    if q:
        short = 2 if b > 1 and text - q - len(layout.prefix_ids) > 2 else 0
        rows = [layout.row(rng.integers(4, layout.image_token_id, size=text - q - len(layout.prefix_ids)
                                        - (short if i == 0 else 0)).tolist()) for i in range(b)]
        ids, text_mask = pad_rows(rows, layout.pad_token_id, left=True)
    else:
        ids = rng.integers(4, vocab, size=(b, text), dtype=np.int64)
        ids[-1, -1] = layout.image_token_id
        text_mask = np.ones((b, text), dtype=np.int64)
    past_mask = np.ones((b, past), dtype=np.int64)
    if b > 1 and past > 2:
        past_mask[0, :2] = 0
    mask = np.concatenate([past_mask, text_mask], axis=1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, text)}


@needs("language_model")
def llm_decoder_spec(model, limits: Limits) -> GraphSpec:
    cfg = model.config
    t = cfg.text_config
    nq, layers, heads = cfg.num_query_tokens, t.num_hidden_layers, t.num_attention_heads
    head_dim = t.hidden_size // heads
    max_total = nq + limits.max_prompt_tokens + limits.max_new_tokens
    layout = PromptLayout(nq, cfg.image_token_index, t.bos_token_id, (t.bos_token_id,), t.pad_token_id)

    def make_inputs(sizes, rng):
        b, past, q = sizes["batch"], sizes["past"], sizes["queries"]
        feeds = _llm_feeds(layout, t.vocab_size, sizes, rng)
        feeds["soft_prompt"] = rng.standard_normal((b, q, t.hidden_size), dtype=np.float32)
        for name in kv_names(layers, "past"):
            feeds[name] = rng.standard_normal((b, heads, past, head_dim), dtype=np.float32)
        return feeds

    kv_in = [TensorSpec(n, "float32", ("batch", heads, "past", head_dim)) for n in kv_names(layers, "past")]
    kv_out = [TensorSpec(n, "float32", ("batch", heads, "past+text", head_dim)) for n in kv_names(layers, "present")]
    batch = AxisRange(1, 1, limits.max_batch)
    return GraphSpec(
        name="llm_decoder",
        build=LlmDecoderWrapper,
        inputs=[
            TensorSpec("input_ids", "int64", ("batch", "text")),
            TensorSpec("soft_prompt", "float32", ("batch", "queries", t.hidden_size)),
            TensorSpec("attention_mask", "int64", ("batch", "past+text")),
            TensorSpec("position_ids", "int64", ("batch", "text")),
            *kv_in,
        ],
        outputs=[TensorSpec("logits", "float32", ("batch", t.vocab_size)), *kv_out],
        make_inputs=make_inputs,
        profiles=[
            # context (prefill): soft prompt + prompt tokens, empty cache
            {"batch": batch, "text": AxisRange(nq + 1, nq + 8, nq + limits.max_prompt_tokens),
             "past": AxisRange(0, 0, 0), "queries": AxisRange(nq, nq, nq)},
            # generation: one token per step against the cache
            {"batch": batch, "text": AxisRange(1, 1, 1), "past": AxisRange(1, nq + 16, max_total - 1),
             "queries": AxisRange(0, 0, 0)},
        ],
        export_sizes={"batch": 2, "text": nq + 3, "past": 3, "queries": nq},
        check_sizes=[
            {"batch": 3, "text": nq + 5, "past": 0, "queries": nq},  # prefill
            {"batch": 1, "text": 1, "past": nq + 6, "queries": 0},  # decode step
            {"batch": 4, "text": 1, "past": 9, "queries": 0},
        ],
    )


SPEC_BUILDERS = [vision_spec, qformer_query_spec, qformer_text_spec, qformer_itm_spec, qformer_itg_spec,
                 llm_decoder_spec]


def graph_specs(model, limits: Limits | None = None) -> list[GraphSpec]:
    """The specs of every graph this model exports (those whose weights exist), in pipeline order."""
    limits = limits or resolve_limits(model)
    return [build(model, limits) for build in SPEC_BUILDERS if all(hasattr(model, n) for n in getattr(build, "needs", ()))]


def torch_inputs(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> tuple:
    """The wrapper's positional arguments, in spec order, as torch tensors."""
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
