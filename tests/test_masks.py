"""The causal decoder mask: shape, causality, padding, KV-cache offset."""
import torch

from train.blip2.masks import causal_lm_mask


def allowed(mask):
    return (mask == 0).squeeze(1)  # [B, T, S] bool


def test_prefill_mask_is_causal_and_hides_padding():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = causal_lm_mask(am, 5, torch.float32)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.float32
    a = allowed(m)
    expected_row1 = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    assert torch.equal(a[1], expected_row1)
    assert not a[0, :, :2].any(), "padding keys must never be visible"
    assert torch.equal(a[0, 2:, 2:], torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_decode_step_sees_all_real_past():
    am = torch.tensor([[0, 1, 1, 1]])  # 3 past positions (1 padded) + 1 new token
    a = allowed(causal_lm_mask(am, 1, torch.float32))
    assert a.tolist() == [[[False, True, True, True]]]


def test_mask_is_additive_with_dtype_minimum():
    m = causal_lm_mask(torch.ones(1, 3, dtype=torch.long), 3, torch.float16)
    assert m.dtype == torch.float16
    assert m[0, 0, 0, 1].item() == torch.finfo(torch.float16).min
    assert m[0, 0, 2, 0].item() == 0.0
