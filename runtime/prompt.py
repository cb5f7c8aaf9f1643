"""BLIP-2's LLM input layout, in one place (numpy only): the runtime, the trainer, the exporter's example
inputs and the benchmarks all build their token rows, padding and position ids here.

    from runtime.prompt import PromptLayout, pad_rows, position_ids
    layout = PromptLayout(num_queries=32, image_token_id=50265, bos_token_id=2, prefix_ids=(2,), pad_token_id=1)
    layout.row(None)                       # caption: [<image>] * 32 + [BOS]
    layout.row(tokenizer_ids("a photo of"))  # prompted: [<image>] * 32 + prefix (BOS) + the prompt's ids
    ids, mask = pad_rows([row_a, row_b], layout.pad_token_id, left=True)   # generation pads on the left
    positions = position_ids(mask, new=ids.shape[1])                       # [B, T]

The layout is the one Hugging Face uses, where the projected queries replace the `image_token_id`
placeholders of the LLM's input: the decoder's for a decoder-only LLM (OPT), the encoder's for an
encoder-decoder one (T5, whose decoder then starts from `decoder_start_token_id`):
  * a caption (no prompt) is the placeholders and `text_config.bos_token_id`, what
    `Blip2ForConditionalGeneration.generate(pixel_values=...)` builds when it is given no input ids;
  * a prompt is the placeholders followed by the tokenizer's ids of the prompt with what the tokenizer adds
    around them (OPT's puts BOS first, T5's appends </s>), what `Blip2Processor` builds;
  * rows of different lengths are padded on the `padding` side: OPT's on the left for generation (on the right
    for training), and a token's position counts the real tokens before it, as OPT derives positions from the
    attention mask (`Blip2Processor` puts the placeholders before the padding; padding first gives the same
    positions and attention, so the same logits); T5's encoder rows on the right, as its tokenizer pads, so no
    padding sits between the image and the text to shift T5's relative positions.
"""
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PromptLayout:
    num_queries: int
    image_token_id: int
    bos_token_id: int
    prefix_ids: tuple[int, ...]  # what the tokenizer puts before a text (OPT: BOS)
    pad_token_id: int
    suffix_ids: tuple[int, ...] = ()  # what the tokenizer puts after a text (T5: </s>)
    padding: str = "left"  # the side rows are padded on for generation

    def row(self, text_ids: Sequence[int] | None) -> list[int]:
        """One row of input ids: placeholders, then [BOS] for a caption (`text_ids` None) or the prompt's ids
        with the tokenizer's prefix and suffix around them."""
        placeholders = [self.image_token_id] * self.num_queries
        if text_ids is None:
            return placeholders + [self.bos_token_id]
        return placeholders + list(self.prefix_ids) + [int(i) for i in text_ids] + list(self.suffix_ids)

    def batch(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows padded on this layout's side: input_ids, attention_mask [N, longest] int64."""
        return pad_rows(rows, self.pad_token_id, left=self.padding == "left")

    def text_length(self, text_ids: Sequence[int] | None) -> int:
        """Tokens of the row after the placeholders (what --max-prompt-tokens bounds)."""
        return len(self.row(text_ids)) - self.num_queries


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths -> input_ids, attention_mask [N, longest] int64, padded left or right."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last `new` tokens of `attention_mask` [B, S]: how many real tokens come before each
    (padding positions are clipped to 0; they are masked anyway). Returns int64 [B, new]."""
    positions = np.cumsum(attention_mask, axis=1, dtype=np.int64) - 1
    return np.clip(positions, 0, None)[:, attention_mask.shape[1] - new:]
