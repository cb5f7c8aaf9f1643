"""The synthetic backbones' pre-training targets and initialisation (train/shapescaps/backbones.py)."""
import numpy as np
import torch.nn.functional as F

from train.shapescaps.backbones import ATTRIBUTES, POSITION_STD, attribute_targets, sincos_positions
from train.shapescaps.synthetic import Shape


def test_sincos_positions_tell_every_patch_apart_and_keep_neighbours_close():
    table = sincos_positions(8, 64)  # [1 + 64, 64], class token first
    assert table.shape == (65, 64) and not table[0].any()
    patches = table[1:]
    assert abs(float(patches.std()) - POSITION_STD) < 1e-4
    assert len({tuple(np.round(r.numpy(), 5)) for r in patches}) == 64
    cos = F.cosine_similarity(patches[:, None], patches[None], dim=-1)  # row-major 8x8 grid
    assert cos[0, 1] > cos[0, 7] and cos[0, 8] > cos[0, 56] and cos[27, 28] > cos[27, 0]


def test_attribute_targets_bind_each_shape_to_its_place():
    pair = [Shape("red", "square", "small", "left"), Shape("blue", "circle", "large", "right")]
    mirrored = [Shape("red", "square", "small", "right"), Shape("blue", "circle", "large", "left")]
    on = {ATTRIBUTES[i] for i in np.flatnonzero(attribute_targets(pair))}
    assert {"red-square@left", "blue-circle@right", "small@left", "large@right", "n2"} <= on
    assert not {"red-square@right", "blue-circle@left"} & on
    assert not np.array_equal(attribute_targets(pair), attribute_targets(mirrored))


def test_llm_pretraining_scores_only_what_follows_the_context():
    """OPT's pre-training loss: the whole of a lone caption, only the continuation of a context pair or a copy."""
    from train.shapescaps.backbones import copy_rows, llm_batch, llm_rows
    from train.blip2.tokenizers import build_tokenizer

    tok = build_tokenizer(512)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    rows = llm_rows(tok, n_texts=5, seed=0)
    pairs = [r for r in rows if r[1] > 1 and r[0][0] != bos]
    lone = [r for r in rows if r[1] == 1]
    assert lone and pairs and all(r[0][0] == bos and r[0][-1] == eos for r in lone)
    ids, mask, labels = llm_batch([lone[0], pairs[0]] + copy_rows(tok, 1, seed=3), pad)
    assert labels.shape == (3, ids.shape[1] - 1)
    for i, (row, context) in enumerate([lone[0], pairs[0], copy_rows(tok, 1, seed=3)[0]]):
        scored = labels[i][labels[i] != -100].tolist()
        assert scored == row[context:] and scored[-1] == eos, i  # the continuation and its EOS, nothing else
        assert row[context - 1] == bos and mask[i].sum() == len(row)
        assert ids[i, len(row):].eq(pad).all()
    x, context = copy_rows(tok, 1, seed=3)[0]
    assert x[: context - 1] == x[context:-1]  # 'x BOS x EOS': the copy is scored, the random x is not
