"""Prompt tokenization with the `tokenizers` library only (no transformers).

    from runtime.text import PromptTokenizer
    tok = PromptTokenizer.from_manifest(manifest)
    ids = tok.encode("Question: what colour is the square? Answer:")   # prefix (BOS) + prompt ids
    tok.decode([12, 34, 2])                                              # special tokens dropped
"""
from pathlib import Path

from tokenizers import Tokenizer

from runtime.errors import EngineFolderError


class PromptTokenizer:
    def __init__(self, path: Path, prefix_ids: list[int]):
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise EngineFolderError(
                f"could not read the tokenizer {path} ({str(e)[:200]}); copy tokenizer.json from the checkpoint "
                f"or rebuild the engine folder"
            ) from None
        self.prefix_ids = list(prefix_ids)

    @classmethod
    def from_manifest(cls, manifest) -> "PromptTokenizer":
        gen = manifest["generation"]
        return cls(manifest.folder / manifest["tokenizers"]["llm"], gen["prompt_prefix_ids"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the Hugging Face tokenizer gives them (prefix such as BOS included)."""
        return self.prefix_ids + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()
