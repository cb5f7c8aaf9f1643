"""One declarative spec per exported graph, in the spirit of optimum's `OnnxConfig`.

A `GraphSpec` says everything the generic export loop, the parity gate, the
manifest and the TensorRT builder need to know about a graph: the wrapper
module, input and output tensors with symbolic axes, how to make dummy inputs
at any axis sizes, and the TensorRT optimization profiles, all derived from
the same `AxisRange` numbers.

    >>> from export.specs import graph_specs
    >>> [s.name for s in graph_specs(model.config)]
    ['vision', 'qformer_query', 'llm_decoder']

Axis names used across graphs: `batch`, `text` (tokens fed in this call),
`past` (tokens already in the KV cache), `queries` (soft-prompt rows) and the
derived `past+text`.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from export.wrappers import LlmDecoderWrapper, QFormerQueryWrapper, VisionWrapper


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple  # ints for fixed axes, str for named dynamic axes


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis; the TensorRT profile and the export checks use the same numbers."""
    min: int
    opt: int
    max: int


@dataclass
class Limits:
    """Build-time limits that bound the dynamic axes (also written to the manifest).

    None means "as much as the decoder's position table allows, at most 64".
    """
    max_batch: int = 8
    max_prompt_tokens: int | None = None  # text tokens after the image placeholders (BOS included) at prefill
    max_new_tokens: int | None = None

    def resolve(self, cfg) -> "Limits":
        budget = cfg.text_config.max_position_embeddings - cfg.num_query_tokens - 1
        new = self.max_new_tokens if self.max_new_tokens is not None else min(64, budget // 2)
        prompt = self.max_prompt_tokens if self.max_prompt_tokens is not None else min(64, budget - new)
        return Limits(self.max_batch, prompt, new)


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

    def to_manifest(self) -> dict:
        return {
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "dynamic_axes": self.dynamic_axes(),
            "profiles": [{k: [r.min, r.opt, r.max] for k, r in p.items()} for p in self.profiles],
        }


def _axis_size(axis, ranges: dict[str, AxisRange], which: str) -> int:
    if isinstance(axis, int):
        return axis
    return sum(getattr(ranges[a], which) for a in axis.split("+"))


# ---------------------------------------------------------------- vision
def vision_spec(cfg, limits: Limits) -> GraphSpec:
    v = cfg.vision_config
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


# ---------------------------------------------------------------- Q-Former, queries only
def qformer_query_spec(cfg, limits: Limits) -> GraphSpec:
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    nq, dq, dllm = cfg.num_query_tokens, cfg.qformer_config.hidden_size, cfg.text_config.hidden_size

    def make_inputs(sizes, rng):
        return {"image_embeds": rng.standard_normal((sizes["batch"], patches, v.hidden_size), dtype=np.float32)}

    return GraphSpec(
        name="qformer_query",
        build=QFormerQueryWrapper,
        inputs=[TensorSpec("image_embeds", "float32", ("batch", patches, v.hidden_size))],
        outputs=[
            TensorSpec("query_output", "float32", ("batch", nq, dq)),
            TensorSpec("llm_prompt", "float32", ("batch", nq, dllm)),
        ],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch)}],
        export_sizes={"batch": 2},
        check_sizes=[{"batch": 1}, {"batch": 3}],
    )


# ---------------------------------------------------------------- LLM decoder with KV cache
def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (prefix 'past' or 'present')."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def llm_decoder_spec(cfg, limits: Limits) -> GraphSpec:
    t = cfg.text_config
    nq, layers, heads = cfg.num_query_tokens, t.num_hidden_layers, t.num_attention_heads
    head_dim = t.hidden_size // heads
    image_id = cfg.image_token_index
    max_total = nq + 1 + limits.max_prompt_tokens + limits.max_new_tokens
    if max_total > t.max_position_embeddings:
        raise ValueError(
            f"queries ({nq}) + BOS + max_prompt_tokens ({limits.max_prompt_tokens}) + max_new_tokens "
            f"({limits.max_new_tokens}) = {max_total} exceeds the decoder's max_position_embeddings "
            f"({t.max_position_embeddings}); lower --max-prompt-tokens or --max-new-tokens"
        )

    def make_inputs(sizes, rng):
        b, text, past, q = sizes["batch"], sizes["text"], sizes["past"], sizes["queries"]
        ids = rng.integers(4, min(t.vocab_size, image_id), size=(b, text), dtype=np.int64)
        ids[:, :q] = image_id  # the soft prompt goes first, as the BLIP-2 processor lays it out
        total = past + text
        mask = np.ones((b, total), dtype=np.int64)
        if b > 1 and total > 2:
            mask[0, :2] = 0  # one left-padded row
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
        feeds = {
            "input_ids": ids,
            "soft_prompt": rng.standard_normal((b, q, t.hidden_size), dtype=np.float32),
            "attention_mask": mask,
            "position_ids": position_ids.astype(np.int64),
        }
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
            {"batch": batch, "text": AxisRange(nq + 1, nq + 8, nq + 1 + limits.max_prompt_tokens),
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


SPEC_BUILDERS = [vision_spec, qformer_query_spec, llm_decoder_spec]


def graph_specs(cfg, limits: Limits | None = None) -> list[GraphSpec]:
    """The specs of every graph this checkpoint exports, in pipeline order."""
    limits = (limits or Limits()).resolve(cfg)
    return [build(cfg, limits) for build in SPEC_BUILDERS]


def torch_inputs(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> tuple:
    """The wrapper's positional arguments, in spec order, as torch tensors."""
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
