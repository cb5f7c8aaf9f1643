"""Stepping the exported decoder graphs: prefill, one-token steps, KV cache, beam reordering.

Two graphs generate text with a KV cache: the LLM (`llm_decoder`) and the
Q-Former in its multimodal causal mode (`qformer_itg`). Both take input_ids,
an attention mask over cache + new tokens, position ids and the cache, and
return last-position logits and the grown cache, so one `CachedDecoder` drives
both; the subclasses only say how the cache starts. They implement the
`StepModel` protocol of `runtime.search`, so the search strategies never see
graphs, caches or masks:

    dec = LlmDecoder(runner, manifest.llm)
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


class LlmDecoder(CachedDecoder):
    """The decoder-only LLM: the prefill takes the soft prompt, which fills the first `num_queries` image
    placeholders of each row; later steps feed an empty soft prompt, so a generated token equal to the
    placeholder id is embedded like any other token (as Hugging Face's generate does)."""

    def __init__(self, runner, llm):
        super().__init__(runner, llm.num_layers)
        self.heads, self.head_dim, self.prompt_width = llm.num_heads, llm.head_dim, llm.hidden_size

    def _step_feeds(self, n: int) -> dict:
        return {"soft_prompt": np.zeros((n, 0, self.prompt_width), dtype=np.float32)}

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, soft_prompt: np.ndarray) -> np.ndarray:
        """input_ids/attention_mask [B, T] (left-padded), soft_prompt [B, Nq, D] -> logits [B, V]."""
        self.cache.reset(input_ids.shape[0], self.heads, self.head_dim, soft_prompt.dtype)
        self.attention_mask = attention_mask.astype(np.int64)
        return self._run(input_ids.astype(np.int64), {"soft_prompt": soft_prompt})


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
