"""Prompt tokenization with the `tokenizers` library only (no transformers).

    from runtime.text import LlmTokenizer
    tok = LlmTokenizer.from_manifest(manifest)
    ids = tok.encode("Question: what colour is the square? Answer:")   # the text's ids (runtime.prompt adds BOS)
    tok.decode([12, 34, 2])                                              # special tokens dropped

    qtok = QFormerTokenizer.from_manifest(manifest)
    ids, mask = qtok.encode_texts(["a red circle", "a blue square"])    # [CLS] ... [SEP], right-padded
"""
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.errors import EngineFolderError, PromptError
from runtime.prompt import pad_rows

# Texts are measured in characters before they are tokenized, so that an 8 MB prompt is refused in microseconds
# rather than tokenized for seconds first. No token of BLIP-2's vocabularies spans this many characters (BERT's
# WordPiece reads words of at most 100), so a text over max_tokens x this cannot fit in max_tokens tokens
# (but for long runs of whitespace, which the tokenizers drop).
MAX_CHARS_PER_TOKEN = 128


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise EngineFolderError(
            f"could not read the tokenizer {path} ({str(e)[:200]}); copy tokenizer.json from the checkpoint "
            f"or rebuild the engine folder"
        ) from None


class LlmTokenizer:
    """The LLM's tokenizer (the checkpoint's tokenizer.json). Special tokens such as BOS are not added here:
    the prompt layout (`runtime.prompt.PromptLayout`) puts them where Hugging Face does."""

    def __init__(self, path: Path):
        self.tokenizer = _read_tokenizer(path)

    @classmethod
    def from_manifest(cls, manifest) -> "LlmTokenizer":
        return cls(manifest.folder / manifest.llm.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone, as the Hugging Face tokenizer gives them without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.decode_raw(ids).strip()

    def decode_raw(self, ids) -> str:
        """`decode` without stripping the ends (what a stream compares successive decodes with)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class TextStream:
    """Text pieces as token ids arrive, whose concatenation is `tokenizer.decode(all ids)`:

        stream = TextStream(tokenizer)
        for ids in growing_token_lists:       # each call: every id so far
            piece = stream.push(ids)          # "" while nothing new can be shown
        piece = stream.finish(ids)            # the rest

    A piece never ends inside a character: while the decode of the ids so far ends in U+FFFD (a multi-byte
    character whose bytes are split over tokens, as byte-level BPE splits emoji and CJK), nothing is shown.
    Whitespace at the end waits for what follows it, since the final text is stripped as `decode` strips it."""

    def __init__(self, tokenizer: LlmTokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def _piece(self, text: str) -> str:
        if not text.startswith(self.shown):  # (a later token changed how earlier ones read: wait for the end)
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def push(self, ids) -> str:
        text = self.tokenizer.decode_raw(ids).lstrip()
        if text.endswith("\ufffd"):
            return ""
        return self._piece(text.rstrip())

    def finish(self, ids) -> str:
        text = self.tokenizer.decode(ids)
        if not text.startswith(self.shown):
            raise RuntimeError(f"the stream showed {self.shown!r}, which the final text {text!r} does not start with")
        return self._piece(text)


class QFormerTokenizer:
    """The Q-Former's (BERT-style) tokenizer: `[CLS] text [SEP]` for ITC/ITM, `[DEC] prompt` for ITG.

    Texts longer than the engine's limit (manifest limits.max_qformer_tokens) are cut to the limit, keeping
    the final [SEP], with a warning: BLIP-2 itself truncates its texts the same way.
    """

    def __init__(self, path: Path, qformer, max_tokens: int):
        self.tokenizer = _read_tokenizer(path)
        self.cls_id, self.sep_id, self.dec_id = qformer.cls_token_id, qformer.sep_token_id, qformer.dec_token_id
        self.pad_id, self.max_tokens = qformer.pad_token_id, max_tokens

    @classmethod
    def from_manifest(cls, manifest) -> "QFormerTokenizer":
        return cls(manifest.folder / manifest.qformer.tokenizer, manifest.qformer, manifest.limits.max_qformer_tokens)

    def _words(self, text, what: str) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise PromptError(f"{what} is empty; pass a non-empty text")
        # (past this many characters the text is cut anyway: its first max_tokens tokens lie within them)
        return self.tokenizer.encode(text[: self.max_tokens * MAX_CHARS_PER_TOKEN], add_special_tokens=False).ids

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] text [SEP] per row, right-padded -> input_ids, attention_mask [N, T] int64."""
        rows = []
        for i, text in enumerate(texts):
            words = self._words(text, f"text {i}")
            if len(words) + 2 > self.max_tokens:
                warnings.warn(f"text {i} is {len(words) + 2} Q-Former tokens long; cut to the engine's limit of "
                              f"{self.max_tokens} (manifest limits.max_qformer_tokens)", stacklevel=3)
                words = words[: self.max_tokens - 2]
            rows.append([self.cls_id, *words, self.sep_id])
        return pad_rows(rows, self.pad_id, left=False)

    def encode_prompts(self, prompts: list) -> tuple[np.ndarray, np.ndarray]:
        """[DEC] (+ prompt words) per row, left-padded for generation -> input_ids, attention_mask."""
        rows = []
        for i, p in enumerate(prompts):
            words = [] if p is None else self._words(p, f"prompt {i}")
            if len(words) + 1 >= self.max_tokens:
                raise PromptError(f"prompt {i} is {len(words) + 1} Q-Former tokens long, the engine allows fewer "
                                  f"than {self.max_tokens} (manifest limits.max_qformer_tokens); shorten it")
            rows.append([self.dec_id, *words])
        return pad_rows(rows, self.pad_id, left=True)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()

