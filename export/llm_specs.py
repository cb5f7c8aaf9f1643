"""The LLM's graphs, one set per family (train.blip2.families): the decoder-only one (OPT) is one `llm_decoder`
graph for the prefill and every decode step; the encoder-decoder one (T5) is `llm_encoder` (soft prompt and
prompt in, every decoder layer's cross-attention keys and values out, once per image) and `llm_decoder` (one
graph for every step, self-attention cache in and out, cross keys/values fed back in).

    >>> [s.name for s in llm_specs(model, limits)]
    ['llm_decoder']                      # OPT
    ['llm_encoder', 'llm_decoder']       # T5
"""
import numpy as np

from export.graph_spec import AxisRange, GraphSpec, TensorSpec, needs
from export.wrappers import LlmDecoderWrapper, Seq2SeqDecoderWrapper, Seq2SeqEncoderWrapper
from runtime.manifest import Limits, kv_names
from runtime.prompt import PromptLayout, pad_rows, position_ids
from train.blip2.families import family


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


def decoder_only_spec(model, limits: Limits) -> GraphSpec:
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
        int4=True,
    )




# ---------------------------------------------------------------- encoder-decoder (T5)
# T5's activations outgrow fp16 (Hugging Face keeps its FFN output projection `wo` in fp32 for this reason):
# only the matrix products run in fp16, everything between them (the residual stream, the RMS norms) in fp32,
# and `wo` entirely in fp32; the fp16 gate probes the encoder with a soft prompt 1e5 times larger than usual.
T5_FP16 = {"only_ops": ("MatMul",), "fp32_scopes": ("DenseReluDense.wo",)}
# For int8 the same product stays in float: its input, the gated-GELU product, has outliers that one int8 scale
# per tensor cannot hold next to the bulk of its values. Measured with `wo` in int8 -> in float: the small-t5
# preset's encoder 0.107 of the range off (over the int8 bound of 0.1) -> 0.078; tiny T5's teacher-forced caption
# agreement with Hugging Face on held-out ShapesCaps images 0.72 -> 0.88 (tests/test_t5.py).
T5_INT8 = {"fp32_scopes": ("DenseReluDense.wo",)}


def _t5(model):
    cfg = model.config
    t = cfg.text_config
    layout = PromptLayout(cfg.num_query_tokens, cfg.image_token_index, t.bos_token_id, (), t.pad_token_id,
                          (t.eos_token_id,), "right")
    return cfg.num_query_tokens, t, layout


def seq2seq_encoder_spec(model, limits: Limits) -> GraphSpec:
    """Soft prompt + prompt through T5's encoder, and every decoder layer's cross-attention keys/values of it."""
    nq, t, layout = _t5(model)

    def make_inputs(sizes, rng):
        b, source = sizes["batch"], sizes["source"]
        text = source - nq - 1  # the prompt's ids between the placeholders and </s>
        short = 2 if b > 1 and text > 2 else 0  # one shorter row: right padding
        rows = [layout.row(rng.integers(3, layout.image_token_id, size=text - (short if i == 0 else 0)).tolist())
                for i in range(b)]
        ids, mask = layout.batch(rows)
        return {"input_ids": ids, "attention_mask": mask,
                "soft_prompt": rng.standard_normal((b, nq, t.d_model), dtype=np.float32)}

    cross = [TensorSpec(n, "float32", ("batch", t.num_heads, "source", t.d_kv))
             for n in kv_names(t.num_decoder_layers, "cross")]
    return GraphSpec(
        name="llm_encoder",
        build=Seq2SeqEncoderWrapper,
        inputs=[TensorSpec("input_ids", "int64", ("batch", "source")),
                TensorSpec("soft_prompt", "float32", ("batch", nq, t.d_model)),
                TensorSpec("attention_mask", "int64", ("batch", "source"))],
        outputs=cross,
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch),
                   "source": AxisRange(nq + 1, nq + 8, nq + limits.max_prompt_tokens)}],
        export_sizes={"batch": 2, "source": nq + 5},
        check_sizes=[{"batch": 1, "source": nq + 2}, {"batch": 3, "source": nq + 7}],
        fp16=T5_FP16, int8=T5_INT8, large_input=("soft_prompt", 1e5), int4=True,
    )


def seq2seq_decoder_spec(model, limits: Limits) -> GraphSpec:
    """One graph for every decoder step: new tokens, the encoder's mask and cross keys/values, the self-attention
    cache and its mask -> last-position logits and the grown cache."""
    nq, t, layout = _t5(model)
    layers, heads, d = t.num_decoder_layers, t.num_heads, t.d_kv

    def make_inputs(sizes, rng):
        b, text, past, source = sizes["batch"], sizes["text"], sizes["past"], sizes["source"]
        ids = rng.integers(3, t.vocab_size, size=(b, text), dtype=np.int64)
        if past == 0:
            ids[:, 0] = t.decoder_start_token_id
        mask = np.ones((b, source), dtype=np.int64)
        if b > 1 and source > nq + 2:
            mask[0, -2:] = 0  # a right-padded encoder row
        own = np.ones((b, past + text), dtype=np.int64)
        if b > 1 and past > 1:
            own[-1, :past - 1] = 0  # a shorter row, padded on the left (runtime.engine's merged batches)
        feeds = {"input_ids": ids, "encoder_attention_mask": mask, "attention_mask": own}
        for name in kv_names(layers, "cross"):
            feeds[name] = rng.standard_normal((b, heads, source, d), dtype=np.float32)
        for name in kv_names(layers, "past"):
            feeds[name] = rng.standard_normal((b, heads, past, d), dtype=np.float32)
        return feeds

    def kv(prefix, axis):
        return [TensorSpec(n, "float32", ("batch", heads, axis, d)) for n in kv_names(layers, prefix)]

    return GraphSpec(
        name="llm_decoder",
        build=Seq2SeqDecoderWrapper,
        inputs=[TensorSpec("input_ids", "int64", ("batch", "text")),
                TensorSpec("encoder_attention_mask", "int64", ("batch", "source")),
                TensorSpec("attention_mask", "int64", ("batch", "past+text")),
                *kv("cross", "source"), *kv("past", "past")],
        outputs=[TensorSpec("logits", "float32", ("batch", t.vocab_size)), *kv("present", "past+text")],
        make_inputs=make_inputs,
        profiles=[{"batch": AxisRange(1, 1, limits.max_batch), "text": AxisRange(1, 1, 1),
                   "past": AxisRange(0, 8, limits.max_new_tokens - 1),
                   "source": AxisRange(nq + 1, nq + 8, nq + limits.max_prompt_tokens)}],
        export_sizes={"batch": 2, "text": 2, "past": 3, "source": nq + 5},
        check_sizes=[{"batch": 3, "text": 1, "past": 0, "source": nq + 4},  # the first step: decoder_start
                     {"batch": 1, "text": 1, "past": 6, "source": nq + 2},
                     {"batch": 2, "text": 3, "past": 2, "source": nq + 6}],
        fp16=T5_FP16, int8=T5_INT8, int4=True,
    )


FAMILY_SPECS = {"opt": [decoder_only_spec], "t5": [seq2seq_encoder_spec, seq2seq_decoder_spec]}


@needs("language_model")
def llm_specs(model, limits: Limits) -> list[GraphSpec]:
    """The LLM family's graphs."""
    return [build(model, limits) for build in FAMILY_SPECS[family(model.config).name]]
