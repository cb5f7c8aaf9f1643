"""Stepping the exported decoder graphs: prefill, one-token steps, KV cache, beam reordering.

Three decoders generate text with a KV cache: a decoder-only LLM (`llm_decoder`), an encoder-decoder one
(`llm_encoder` once, then `llm_decoder` every step) and the Q-Former in its multimodal causal mode
(`qformer_itg`). The first and the last take input_ids, an attention mask over cache + new tokens, position
ids and the cache, so one `CachedDecoder` drives both and the subclasses only say how the cache starts;
`Seq2SeqDecoder` also carries the encoder's cross-attention keys/values. All implement the `StepModel`
protocol of `runtime.search`, so the search strategies never see graphs, caches or masks:

    dec = DECODERS[manifest.llm.family](runners, manifest.llm)     # LlmDecoder (OPT) or Seq2SeqDecoder (T5)
    logits = dec.prefill(input_ids, attention_mask, soft_prompt)   # [B, V], cache holds B rows
    logits = dec.step(next_tokens)                                  # [B, V], cache grew by one
    dec.reorder(np.array([0, 0, 1, 1]))                             # beam expansion / selection

    itg = QFormerDecoder(runner, manifest.qformer, num_queries)
    logits = itg.prefill(dec_ids, text_mask, query_outputs)        # cache starts as the queries' keys/values
"""
import numpy as np

from runtime.manifest import kv_names
from runtime.prompt import position_ids


class KVCache:
    """Past keys/values in the graph's own layout [N, heads, past, head_dim]: numpy arrays, or the
    backend's device tensors (TensorRT), which support `.shape` and indexing by an index array."""

    def __init__(self, num_layers: int):
        self.past_names, self.present_names = kv_names(num_layers, "past"), kv_names(num_layers, "present")
        self.arrays: list[np.ndarray] = []

    def reset(self, batch: int, heads: int, head_dim: int, dtype=np.float32) -> None:
        self.arrays = [np.zeros((batch, heads, 0, head_dim), dtype=dtype) for _ in self.past_names]

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self.arrays))

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        self.arrays = [outputs[n] for n in self.present_names]

    def reorder(self, index: np.ndarray) -> None:
        self.arrays = [a[index] for a in self.arrays]

    @property
    def length(self) -> int:
        """Cached positions per row (the third axis)."""
        return self.arrays[0].shape[2] if self.arrays else 0

    def merge(self, other: "KVCache", width: int) -> None:
        """`other`'s rows after these, both padded on the left (zeros) to `width` positions. Host arrays result: a
        TensorRT cache crosses to the host here, once per merge, not per step."""
        self.arrays = [np.concatenate([pad_positions(a, width, 2, left=True), pad_positions(b, width, 2, left=True)])
                       for a, b in zip(self.arrays, other.arrays)]

    def drop_oldest(self, n: int) -> None:
        """Forget the first `n` positions of every row (padding that no row attends to any more)."""
        self.arrays = [np.ascontiguousarray(np.asarray(a)[:, :, n:]) for a in self.arrays]


def leading_unused(mask: np.ndarray) -> int:
    """How many leading positions of an attention mask [N, W] no row attends to (all of them for no rows)."""
    return int(np.argmax(mask.any(axis=0))) if mask.any() else mask.shape[1]


def pad_positions(a, width: int, axis: int, left: bool) -> np.ndarray:
    """`a` padded with zeros along `axis` to `width` entries, on the left or the right."""
    a = np.asarray(a)
    missing = width - a.shape[axis]
    if missing <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (missing, 0) if left else (0, missing)
    return np.pad(a, pad)


class OwnTokens:
    """Continuous batching (runtime.engine) of a decoder's own tokens: its `attention_mask` [N, W] and `cache` of W
    positions. Rows are aligned on their last token: the shorter side of a merge is padded on the left with masked,
    zero positions, so every row's tokens keep their positions (OPT's come from the mask) and their distances to the
    next token (T5's relative position bias); left padding is what a batch of prompts already has."""

    def _merge_own(self, other) -> None:
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        self.attention_mask = np.concatenate([pad_positions(self.attention_mask, width, 1, left=True),
                                              pad_positions(other.attention_mask, width, 1, left=True)])
        self.cache.merge(other.cache, width)

    def _trim_own(self) -> None:
        """Drop leading positions that no row attends to (left by rows that finished), so the cache is as long as
        its longest row, not as long as the batch has run."""
        unused = leading_unused(self.attention_mask)
        if unused:
            self.attention_mask = self.attention_mask[:, unused:]
            self.cache.drop_oldest(unused)


class CachedDecoder:
    """Owns a decoder graph's attention mask and KV cache across calls.

    The first `prefix` cache entries of every row may be something other than text (the Q-Former's
    queries); position ids count text tokens only.
    """

    prefix = 0

    def __init__(self, runner, num_layers: int):
        self.runner = runner
        self.cache = KVCache(num_layers)
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)

    def _step_feeds(self, n: int) -> dict:
        """Graph inputs of a one-token step beyond ids / mask / positions / cache (hook)."""
        return {}

    def _run(self, input_ids: np.ndarray, extra: dict) -> np.ndarray:
        positions = position_ids(self.attention_mask[:, self.prefix:], new=input_ids.shape[1])
        outputs = self.runner.run({
            "input_ids": input_ids, "attention_mask": self.attention_mask, "position_ids": positions,
            **extra, **self.cache.feeds(),
        }, keep=self.cache.present_names)
        self.cache.update(outputs)
        return outputs["logits"]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        n = tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((n, 1), np.int64)], axis=1)
        return self._run(tokens.reshape(n, 1).astype(np.int64), self._step_feeds(n))

    def reorder(self, index: np.ndarray) -> None:
        self.cache.reorder(index)
        self.attention_mask = self.attention_mask[index]


class LlmDecoder(CachedDecoder, OwnTokens):
    """The decoder-only LLM: the prefill takes the soft prompt, which fills the first `num_queries` image
    placeholders of each row; later steps feed an empty soft prompt, so a generated token equal to the
    placeholder id is embedded like any other token (as Hugging Face's generate does)."""

    padding = "left"  # prompts of a batch: left-padded, the new tokens follow every row's last one

    def __init__(self, runners: dict, llm):
        super().__init__(runners["llm_decoder"], llm.num_layers)
        self.heads, self.head_dim, self.prompt_width = llm.num_heads, llm.head_dim, llm.hidden_size

    @staticmethod
    def context(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What Hugging Face's repetition penalty sees: the decoder's whole input (left padding excluded)."""
        return input_ids, attention_mask

    def _step_feeds(self, n: int) -> dict:
        return {"soft_prompt": np.zeros((n, 0, self.prompt_width), dtype=np.float32)}

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, soft_prompt: np.ndarray) -> np.ndarray:
        """input_ids/attention_mask [B, T] (left-padded), soft_prompt [B, Nq, D] -> logits [B, V]."""
        self.cache.reset(input_ids.shape[0], self.heads, self.head_dim, soft_prompt.dtype)
        self.attention_mask = attention_mask.astype(np.int64)
        return self._run(input_ids.astype(np.int64), {"soft_prompt": soft_prompt})

    # ------------------------------------------------------------ continuous batching (runtime.engine)
    def can_merge(self, other) -> bool:
        return True  # rows of any length: the attention mask and position ids say where each row's tokens are

    def merge(self, other: "LlmDecoder") -> None:
        """Take `other`'s rows (another prefill) into this batch (OwnTokens)."""
        self._merge_own(other)

    def trim(self) -> None:
        self._trim_own()


class QFormerDecoder(CachedDecoder):
    """The Q-Former's ITG mode: the cache starts as the queries' self-attention keys/values
    (qformer_query's query_key_i / query_value_i), computed once per image; text follows."""

    def __init__(self, runner, qformer, num_queries: int):
        super().__init__(runner, qformer.num_layers)
        self.query_names = kv_names(qformer.num_layers, "query")
        self.prefix = num_queries

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, query_outputs: dict) -> np.ndarray:
        """input_ids/attention_mask [B, T] (left-padded, each row starting with [DEC]); query_outputs: the
        qformer_query graph's outputs (query_key_i / query_value_i [B, H, Nq, d] among them)."""
        self.cache.arrays = [query_outputs[n] for n in self.query_names]
        queries = np.ones((input_ids.shape[0], self.prefix), dtype=np.int64)
        self.attention_mask = np.concatenate([queries, attention_mask.astype(np.int64)], axis=1)
        return self._run(input_ids.astype(np.int64), {})


class Seq2SeqDecoder(OwnTokens):
    """The encoder-decoder LLM (T5): the prefill runs the encoder graph on the soft prompt and the prompt once,
    which gives every decoder layer's cross-attention keys/values; every decoder step (the first one fed
    decoder_start_token_id) takes them back with the encoder's mask and the self-attention cache. Beam search
    reorders the self-attention cache and the cross keys/values alike. The decoder's own tokens have a mask too
    (`attention_mask`, in folders built since the engine could merge T5 rows; older folders' graphs take none and
    their rows merge only with rows as long)."""

    padding = "right"  # encoder rows: no padding between the image and the prompt (T5's positions are relative)

    def __init__(self, runners: dict, llm):
        self.encoder, self.runner = runners["llm_encoder"], runners["llm_decoder"]
        self.cache = KVCache(llm.num_layers)
        self.cross_names = kv_names(llm.num_layers, "cross")
        self.heads, self.head_dim, self.start = llm.num_heads, llm.head_dim, llm.decoder_start_token_id
        self.cross, self.encoder_mask = [], np.zeros((0, 0), dtype=np.int64)
        self.masked = "attention_mask" in self.runner.input_names
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)  # the decoder's tokens so far (cache + the next)

    def context(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What Hugging Face's repetition penalty sees: the decoder's input (decoder_start), not the encoder's."""
        start = np.full((input_ids.shape[0], 1), self.start, dtype=np.int64)
        return start, np.ones_like(start)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, soft_prompt: np.ndarray) -> np.ndarray:
        """Encoder rows [B, S] (right-padded) and soft_prompt [B, Nq, D] -> the first step's logits [B, V]."""
        outputs = self.encoder.run({"input_ids": input_ids.astype(np.int64), "soft_prompt": soft_prompt,
                                    "attention_mask": attention_mask.astype(np.int64)}, keep=self.cross_names)
        self.cross = [outputs[n] for n in self.cross_names]
        self.encoder_mask = attention_mask.astype(np.int64)
        self.cache.reset(input_ids.shape[0], self.heads, self.head_dim, soft_prompt.dtype)
        self.attention_mask = np.zeros((input_ids.shape[0], 0), dtype=np.int64)
        return self.step(np.full(input_ids.shape[0], self.start, dtype=np.int64))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        n = tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((n, 1), np.int64)], axis=1)
        own = {"attention_mask": self.attention_mask} if self.masked else {}
        outputs = self.runner.run({
            "input_ids": tokens.reshape(-1, 1).astype(np.int64), "encoder_attention_mask": self.encoder_mask,
            **own, **dict(zip(self.cross_names, self.cross)), **self.cache.feeds(),
        }, keep=self.cache.present_names)
        self.cache.update(outputs)
        return outputs["logits"]

    def reorder(self, index: np.ndarray) -> None:
        self.cache.reorder(index)
        self.cross = [c[index] for c in self.cross]
        self.encoder_mask = self.encoder_mask[index]
        self.attention_mask = self.attention_mask[index]

    # ------------------------------------------------------------ continuous batching (runtime.engine)
    def can_merge(self, other) -> bool:
        """With the decoder's mask, rows of any length; without it (older folders), rows as long only."""
        return self.masked or self.cache.length == other.cache.length

    def merge(self, other: "Seq2SeqDecoder") -> None:
        """Take `other`'s rows into this batch: encoder positions (cross keys/values, mask) padded on the right,
        the decoder's own (cache, mask) on the left (OwnTokens)."""
        width = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])
        self.cross = [np.concatenate([pad_positions(a, width, 2, left=False), pad_positions(b, width, 2, left=False)])
                      for a, b in zip(self.cross, other.cross)]
        self.encoder_mask = np.concatenate([pad_positions(self.encoder_mask, width, 1, left=False),
                                            pad_positions(other.encoder_mask, width, 1, left=False)])
        self._merge_own(other)

    def trim(self) -> None:
        """Drop encoder positions no row reads any more (on the right) and decoder positions no row attends to (on
        the left)."""
        used = int(self.encoder_mask.any(axis=0).nonzero()[0].max()) + 1 if self.encoder_mask.any() else 0
        if used < self.encoder_mask.shape[1]:
            self.encoder_mask = self.encoder_mask[:, :used]
            self.cross = [np.ascontiguousarray(np.asarray(c)[:, :, :used]) for c in self.cross]
        self._trim_own()


DECODERS = {"opt": LlmDecoder, "t5": Seq2SeqDecoder}  # the manifest's llm.family -> how its graphs are stepped
