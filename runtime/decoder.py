"""Stepping the exported LLM decoder graph: prefill, one-token steps, KV cache, beam reordering.

`LlmDecoder` implements the `StepModel` protocol of `runtime.search`, so the
search strategies never see graphs, caches or masks:

    dec = LlmDecoder(runner, manifest)
    logits = dec.prefill(input_ids, attention_mask, soft_prompt)   # [B, V], cache holds B rows
    logits = dec.step(next_tokens)                                  # [B, V], cache grew by one
    dec.reorder(np.array([0, 0, 1, 1]))                             # beam expansion / selection
"""
import numpy as np


class KVCache:
    """Past keys/values as numpy arrays in the graph's own layout [N, heads, past, head_dim]."""

    def __init__(self, past_names: list[str], present_names: list[str]):
        self.past_names, self.present_names = past_names, present_names
        self.arrays: list[np.ndarray] = []

    def reset(self, batch: int, heads: int, head_dim: int, dtype=np.float32) -> None:
        self.arrays = [np.zeros((batch, heads, 0, head_dim), dtype=dtype) for _ in self.past_names]

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self.arrays))

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        self.arrays = [outputs[n] for n in self.present_names]

    def reorder(self, index: np.ndarray) -> None:
        self.arrays = [a[index] for a in self.arrays]


class LlmDecoder:
    """Owns the decoder's attention mask and KV cache across calls."""

    def __init__(self, runner, manifest):
        self.runner = runner
        model = manifest["model"]
        self.heads, self.head_dim = model["num_heads"], model["head_dim"]
        self.prompt_width = model["llm_hidden_size"]
        names = runner.input_names
        past = [n for n in names if n.startswith("past_")]
        self.cache = KVCache(past, [n.replace("past_", "present_", 1) for n in past])
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)

    def _run(self, input_ids, soft_prompt) -> np.ndarray:
        mask = self.attention_mask
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -input_ids.shape[1]:]
        outputs = self.runner.run({
            "input_ids": input_ids, "soft_prompt": soft_prompt, "attention_mask": mask,
            "position_ids": position_ids, **self.cache.feeds(),
        })
        self.cache.update(outputs)
        return outputs["logits"]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, soft_prompt: np.ndarray) -> np.ndarray:
        """input_ids/attention_mask [B, T] (left-padded), soft_prompt [B, Nq, D] -> logits [B, V]."""
        self.cache.reset(input_ids.shape[0], self.heads, self.head_dim, soft_prompt.dtype)
        self.attention_mask = attention_mask.astype(np.int64)
        return self._run(input_ids.astype(np.int64), soft_prompt)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        n = tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((n, 1), np.int64)], axis=1)
        empty = np.zeros((n, 0, self.prompt_width), dtype=np.float32)
        return self._run(tokens.reshape(n, 1).astype(np.int64), empty)

    def reorder(self, index: np.ndarray) -> None:
        self.cache.reorder(index)
        self.attention_mask = self.attention_mask[index]
