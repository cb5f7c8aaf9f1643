"""The tensors of one training step from texts: the Q-Former's tokens (stage 1) and the LLM's inputs and labels laid
out as at inference (stage 2), shared by the ShapesCaps recipe and training on users' data."""
import torch

from train.blip2.checkpoint import prompt_affixes, prompt_layout
from train.blip2.families import family


def qformer_batch(qtok, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = qtok(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def lm_batch(model, tok, examples: list[tuple[str | None, str]]) -> dict:
    """(prompt or None, target) pairs -> the tensors of stage 2's loss, laid out as at inference (runtime.prompt)
    by the LLM family (train.blip2.families): the loss is on the target (and EOS) only."""
    return family(model.config).stage2_batch(prompt_layout(model.config, *prompt_affixes(tok)), tok, examples)
