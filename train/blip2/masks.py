"""Attention masks, built in one place for training and export alike.

Every mask here is *additive*: 0.0 where attention is allowed and the dtype's
most negative finite value where it is not, shaped [B, 1, Tq, Tk] so it
broadcasts over heads. Eager attention in transformers adds it to the scores
before the softmax (boolean 4-D masks are not accepted there).

    >>> import torch
    >>> from train.blip2.masks import causal_lm_mask
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


# The three self-attention masks of BLIP-2's Q-Former, over [queries; text] (queries first).
QFORMER_MODES = ("unimodal", "bidirectional", "causal")


def qformer_mask(mode: str, text_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Self-attention mask of the Q-Former over Nq queries followed by T text tokens.

    mode:
      "unimodal"      (ITC)  queries see only queries, text sees only text;
      "bidirectional" (ITM)  everything sees everything;
      "causal"        (ITG)  queries see only queries, text sees every query and the text up to itself.
    text_mask: [B, T] 1 for real tokens, 0 for padding (padding keys are hidden from every row).
    Returns [B, 1, Nq+T, Nq+T] additive float.
    """
    if mode not in QFORMER_MODES:
        raise ValueError(f"unknown Q-Former mask mode {mode!r}; choose one of {QFORMER_MODES}")
    batch, device = text_mask.shape[0], text_mask.device
    key_valid = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], 1)
    total = key_valid.shape[1]
    pos = torch.arange(total, device=device)
    is_query = pos < num_queries  # [N]
    row_q, key_q = is_query[:, None], is_query[None, :]  # [N, 1], [1, N]
    if mode == "bidirectional":
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    elif mode == "unimodal":
        allowed = row_q == key_q
    else:  # causal
        allowed = (row_q & key_q) | (~row_q & (pos[None, :] <= pos[:, None]))
    return additive(allowed[None, None] & key_valid[:, None, None, :], dtype)  # [B, 1, N, N]
