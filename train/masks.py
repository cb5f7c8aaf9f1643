"""Attention masks, built in one place for training and export alike.

Every mask here is *additive*: 0.0 where attention is allowed and the dtype's
most negative finite value where it is not, shaped [B, 1, Tq, Tk] so it
broadcasts over heads. Eager attention in transformers adds it to the scores
before the softmax (boolean 4-D masks are not accepted there).

    >>> import torch
    >>> from train.masks import causal_lm_mask
    >>> m = causal_lm_mask(torch.tensor([[0, 1, 1]]), query_len=3, dtype=torch.float32)
    >>> m.shape
    torch.Size([1, 1, 3, 3])
"""
import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean 'may attend' tensor into an additive float mask."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def causal_lm_mask(attention_mask: torch.Tensor, query_len: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
    """Causal decoder mask with padding, for a KV-cached step.

    attention_mask: [B, S] 1 for real tokens, 0 for padding, over past + current tokens (S = past + T).
    query_len: T, the number of tokens fed in this step; they are the last T of the S positions.
    Returns [B, 1, T, S]: query i (absolute position S - T + i) sees key j iff j <= S - T + i and key j is not padding.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    q_pos = torch.arange(query_len, device=device) + (total - query_len)  # [T]
    k_pos = torch.arange(total, device=device)  # [S]
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    not_pad = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    return additive(causal[None, None] & not_pad, dtype)  # [B, 1, T, S]
