"""Tests for runtime/search.py: processors vs transformers' classes, greedy/beam search
token-for-token vs transformers' `generate` on tiny random OPT models, sampling behaviour,
and GenerationConfig.validate(). torch / transformers are used only here, never by runtime/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import PromptError
from runtime.search import (
    GenerationConfig,
    apply_min_new_tokens,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    log_softmax,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, OPTConfig, OPTForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

VOCAB, BOS, EOS, PAD = 100, 2, 2, 1
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- torch-backed StepModel


class TorchStepModel:
    """StepModel over a transformers causal LM, fed exactly what HF `generate` feeds OPT:
    a DynamicCache, the 2D attention mask (dropped when it is all ones, as generate does) and
    position ids = cumsum(mask) - 1 with pads at 0, then +1 per new token."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.mask = None if bool((attention_mask == 1).all()) else attention_mask.long()
        self.last_pos = position_ids[:, -1:]
        self.steps = 0
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                attention_mask=self.mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.first_logits = out.logits[:, -1].float().numpy()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.ndim == 1 and len(tokens) == self.last_pos.shape[0]
        self.steps += 1
        self.last_pos = self.last_pos + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(tokens.copy())[:, None],
                attention_mask=self.mask,
                position_ids=self.last_pos,
                past_key_values=self.cache,
                use_cache=True,
            )
        return out.logits[:, -1].float().numpy()

    def reorder(self, index: np.ndarray) -> None:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        self.last_pos = self.last_pos.index_select(0, idx)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, idx)


def _make_model(eos_prone: bool) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, tie_word_embeddings=False, dropout=0.0, attention_dropout=0.0,
    )
    model = OPTForCausalLM(cfg).eval()
    if eos_prone:
        # Bias the lm_head toward EOS: EOS's row becomes a slightly stronger copy of a token the
        # random model likes, so rows and beams finish at different steps.
        with torch.no_grad():
            model.lm_head.weight[EOS] = model.lm_head.weight[37] * 1.02
    return model


MODELS = {"plain": _make_model(False), "eos": _make_model(True)}


def _prompts(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths 7, 4 and 2 (BOS first)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((7, 4, 2)):
        ids[row, : 7 - length] = PAD
        mask[row, : 7 - length] = 0
        ids[row, 7 - length] = BOS
    return ids[:batch], mask[:batch]


def _hf_new_tokens(out: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    rows = []
    for row in out[:, prompt_len:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def _run_both(model_name: str, batch: int, prompt_seed: int = 1,
              **kw) -> tuple[list[list[int]], list[list[int]], TorchStepModel]:
    model = MODELS[model_name]
    ids, mask = _prompts(batch, prompt_seed)
    hf_kw = dict(kw)
    if hf_kw.get("num_beams", 1) == 1:  # beam-only flags: HF only warns about them; keep the logs clean
        hf_kw.pop("length_penalty", None)
        hf_kw.pop("early_stopping", None)
    with torch.no_grad():
        hf_out = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **hf_kw)
    expected = _hf_new_tokens(hf_out, ids.shape[1], EOS)
    step_model = TorchStepModel(model, ids, mask)
    got = generate(step_model, step_model.first_logits, ids.numpy(),
                   GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, **kw))
    return got, expected, step_model


# --------------------------------------------------------------------------- HF parity: greedy and beam search


@pytest.mark.parametrize("model_name", ["plain", "eos"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7},
        {"min_new_tokens": 6},
        {"repetition_penalty": 1.5, "min_new_tokens": 4},
    ],
    ids=["plain", "rep1.3", "rep0.7", "min6", "rep1.5+min4"],
)
def test_greedy_matches_hf(model_name, batch, opts):
    got, expected, step_model = _run_both(model_name, batch, max_new_tokens=20, **opts)
    assert got == expected
    assert step_model.steps == max(len(r) for r in got) - 1  # one step per generated position
    if "min_new_tokens" in opts:
        assert all(len(r) >= opts["min_new_tokens"] for r in got)


@pytest.mark.parametrize("model_name", ["plain", "eos"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_matches_hf(model_name, batch, num_beams, length_penalty, early_stopping):
    got, expected, _ = _run_both(
        model_name, batch, max_new_tokens=16, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=early_stopping,
    )
    assert got == expected


@pytest.mark.parametrize(
    "opts",
    [
        {"num_beams": 3, "repetition_penalty": 1.3},
        {"num_beams": 4, "min_new_tokens": 5, "length_penalty": 0.5},
        {"num_beams": 2, "repetition_penalty": 1.2, "min_new_tokens": 3, "early_stopping": True},
        {"num_beams": 3, "early_stopping": "never", "length_penalty": 1.0},
        {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
        {"num_beams": 4, "length_penalty": -1.0},
        {"num_beams": 4, "length_penalty": 2.0, "max_new_tokens": 25},
    ],
)
@pytest.mark.parametrize("model_name", ["plain", "eos"])
def test_beam_with_processors_matches_hf(model_name, opts):
    opts = {"max_new_tokens": 16, **opts}
    got, expected, _ = _run_both(model_name, 3, **opts)
    assert got == expected


@pytest.mark.parametrize(
    "prompt_seed,num_beams,length_penalty,max_new_tokens",
    [(5, 2, 1.0, 25), (5, 2, 2.0, 25), (2, 3, 1.0, 16), (1, 2, 2.0, 25)],
)
@pytest.mark.parametrize("early_stopping", [False, "never"])
def test_beam_stopping_heuristics_match_hf(prompt_seed, num_beams, length_penalty, max_new_tokens, early_stopping):
    """Cases (found by mutation testing) where the outcome depends on the fine print of HF's beam
    search: the early-stop heuristic (best running score / current new-token count ** length_penalty
    vs the worst finished score), freezing a batch item's finished set once that heuristic says it
    cannot improve while other items keep running, keeping 2 * num_beams candidates, and
    early_stopping="never" using max_new_tokens as the best reachable length."""
    got, expected, _ = _run_both(
        "eos", 3, prompt_seed=prompt_seed, max_new_tokens=max_new_tokens, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=early_stopping,
    )
    assert got == expected


def test_beam_eos_model_finishes_rows_at_different_steps():
    """Guard that the parity tests above do exercise early finishing (not only max length)."""
    got, expected, _ = _run_both("eos", 3, max_new_tokens=16, num_beams=4, length_penalty=0.5)
    assert got == expected
    lengths = sorted(len(r) for r in got)
    assert lengths[0] < 16 and len(set(lengths)) > 1 and all(r[-1] == EOS for r in got if len(r) < 16)


def test_max_new_tokens_one_and_prompt_mask_argument():
    model = MODELS["eos"]
    ids, mask = _prompts(3)
    for num_beams in (1, 3):
        sm = TorchStepModel(model, ids, mask)
        cfg = GenerationConfig(max_new_tokens=1, num_beams=num_beams, repetition_penalty=1.4)
        a = generate(sm, sm.first_logits, ids.numpy(), cfg)
        b = generate(sm, sm.first_logits, ids.numpy(), cfg, prompt_mask=mask.numpy())
        assert a == b and all(len(r) == 1 for r in a) and sm.steps == 0
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=mask, do_sample=False, num_beams=num_beams, max_new_tokens=1,
                                repetition_penalty=1.4, eos_token_id=EOS, pad_token_id=PAD)
        assert a == _hf_new_tokens(hf, ids.shape[1], EOS)


# --------------------------------------------------------------------------- processors vs HF classes


def _rand_logits(n=6, v=VOCAB, seed=0):
    return np.random.default_rng(seed).normal(0, 3, size=(n, v)).astype(np.float32)


@pytest.mark.parametrize("penalty", [1.3, 0.6, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    scores = _rand_logits()
    ids = np.random.default_rng(1).integers(0, VOCAB + 5, size=(6, 12))  # includes ids >= vocab
    ignore = np.array([0, 3, 12, 1, 5, 0])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(apply_repetition_penalty(scores, ids, penalty), ref)
    ref = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.from_numpy(ignore))(
        torch.from_numpy(ids), torch.from_numpy(scores)
    ).numpy()
    np.testing.assert_array_equal(apply_repetition_penalty(scores, ids, penalty, ignore), ref)
    # on log-probs, as beam search uses it
    lp = log_softmax(scores)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(lp)).numpy()
    np.testing.assert_array_equal(apply_repetition_penalty(lp, ids, penalty), ref)


@pytest.mark.parametrize("n_generated", [0, 2, 3, 7])
def test_min_new_tokens_matches_hf(n_generated):
    scores = _rand_logits()
    prompt_len, min_new = 5, 3
    ids = torch.zeros((6, prompt_len + n_generated), dtype=torch.long)
    ref = MinNewTokensLengthLogitsProcessor(prompt_len, min_new, EOS)(ids, torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(apply_min_new_tokens(scores, n_generated, min_new, EOS), ref)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.7])
def test_temperature_matches_hf(temperature):
    scores = _rand_logits()
    ref = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(apply_temperature(scores, temperature), ref)


@pytest.mark.parametrize("top_k,min_keep", [(1, 1), (5, 1), (40, 1), (200, 1), (1, 3)])
def test_top_k_matches_hf(top_k, min_keep):
    scores = _rand_logits()
    scores[0, :10] = scores[0, 50]  # ties at the threshold are kept by both
    ref = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(apply_top_k(scores, top_k, min_keep), ref)


@pytest.mark.parametrize("top_p,min_keep", [(0.05, 1), (0.3, 1), (0.9, 1), (0.999, 1), (1.0, 1), (0.05, 4)])
def test_top_p_matches_hf(top_p, min_keep):
    for seed in range(5):
        scores = _rand_logits(seed=seed)
        ref = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, torch.from_numpy(scores)).numpy()
        np.testing.assert_array_equal(apply_top_p(scores, top_p, min_keep), ref)


def test_log_softmax_close_to_torch():
    scores = _rand_logits()
    ref = torch.log_softmax(torch.from_numpy(scores), -1).numpy()
    np.testing.assert_allclose(log_softmax(scores), ref, rtol=0, atol=1e-5)


def test_processors_do_not_modify_inputs():
    scores = _rand_logits()
    keep = scores.copy()
    ids = np.arange(12).reshape(6, 2)
    apply_repetition_penalty(scores, ids, 1.5)
    apply_min_new_tokens(scores, 0, 2, EOS)
    apply_temperature(scores, 0.5)
    apply_top_k(scores, 3)
    apply_top_p(scores, 0.5)
    np.testing.assert_array_equal(scores, keep)


# --------------------------------------------------------------------------- sampling


class FixedLogitsModel:
    """Fake StepModel: the same logits for every row and step; counts calls."""

    def __init__(self, logits_row: np.ndarray, rows: int):
        self.row = np.asarray(logits_row, dtype=np.float32)
        self.n = rows
        self.steps = 0
        self.reorders: list[np.ndarray] = []

    def step(self, tokens):
        assert len(tokens) == self.n
        self.steps += 1
        return np.tile(self.row, (self.n, 1))

    def reorder(self, index):
        self.reorders.append(np.asarray(index))
        self.n = len(index)

    def first(self):
        return np.tile(self.row, (self.n, 1))


def _fixed_logits(v=12, seed=3):
    row = np.random.default_rng(seed).normal(0, 1.5, size=v).astype(np.float32)
    row[EOS] = -30.0  # effectively never finishes
    return row


# A toy language model whose next-token probabilities depend on every token generated so far (its "KV cache" is
# each row's history), so a search must feed each row its own token and follow beams with `reorder` to get the
# tokens worked out by hand below. Tokens: A = 3, B = 4, C = 5; every other id (EOS included) has probability 1e-6.
A, B, C = 3, 4, 5
HAND_PROBS = {  # history of generated tokens -> P(A), P(B), P(C)
    (): (0.5, 0.4, 0.1),
    (A,): (0.4, 0.3, 0.3),
    (B,): (0.05, 0.05, 0.9),
    (A, A): (0.2, 0.5, 0.3),
    (B, C): (0.9, 0.05, 0.05),
}
OTHER_PROBS = (0.2, 0.3, 0.5)  # any other history
SWAP = {A: C, B: A, C: B}  # row 1 of a batch: the same model with the three tokens renamed
UNSWAP = {v: k for k, v in SWAP.items()}


class HistoryModel:
    """StepModel over HAND_PROBS; a row with `renamed` true uses the table with its tokens renamed by SWAP."""

    def __init__(self, renamed):
        self.rows = [(r, []) for r in renamed]  # (renamed, history) per cache row
        self.reorders = []

    def _logits(self):
        out = np.full((len(self.rows), 8), 1e-6)
        for i, (renamed, history) in enumerate(self.rows):
            name, unname = (SWAP, UNSWAP) if renamed else ({}, {})
            probs = HAND_PROBS.get(tuple(unname.get(t, t) for t in history), OTHER_PROBS)
            for t, p in zip((A, B, C), probs):
                out[i, name.get(t, t)] = p
        return np.log(out).astype(np.float32)

    def first(self):
        return self._logits()

    def step(self, tokens):
        assert tokens.shape == (len(self.rows),)
        for (_, history), t in zip(self.rows, tokens):
            history.append(int(t))
        return self._logits()

    def reorder(self, index):
        self.reorders.append(np.asarray(index).tolist())
        self.rows = [(self.rows[i][0], list(self.rows[i][1])) for i in index]


def test_searches_drive_a_step_model_to_the_hand_computed_tokens():
    """Greedy: A (0.5), then A (0.4 after A), then B (0.5 after A A). Beam search, 2 beams: after one token the
    beams are A (0.5) and B (0.4); after two, B C (0.4 * 0.9 = 0.36) and A A (0.5 * 0.4 = 0.2), beating A B and
    A C (0.15); after three, B C A (0.36 * 0.9 = 0.324) beats A A B (0.2 * 0.5 = 0.1): the best sequence, which
    greedy misses. Row 1 is the same model with A, B, C renamed C, A, B, so it must get the renamed tokens."""
    rename = lambda tokens: [SWAP[t] for t in tokens]  # noqa: E731
    model = HistoryModel([False, True])
    got = generate(model, model.first(), np.full((2, 1), BOS), GenerationConfig(max_new_tokens=3))
    assert got == [[A, A, B], rename([A, A, B])]
    # each row was fed its own first two tokens (the third ends the search), with no reordering
    assert [h for _, h in model.rows] == [[A, A], rename([A, A])] and model.reorders == []

    model = HistoryModel([False, True])
    got = generate(model, model.first(), np.full((2, 1), BOS), GenerationConfig(max_new_tokens=3, num_beams=2))
    assert got == [[B, C, A], rename([B, C, A])]
    assert model.reorders[0] == [0, 0, 1, 1]  # each prompt's row copied to its two beams
    # the cache rows followed the beams: after two tokens they hold B C and A A, best first
    assert [h for _, h in model.rows] == [[B, C], [A, A], rename([B, C]), rename([A, A])]


def test_sampling_same_seed_same_tokens():
    ids, mask = _prompts(3)
    cfg = GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=123)
    runs = []
    for _ in range(2):
        sm = TorchStepModel(MODELS["plain"], ids, mask)
        runs.append(generate(sm, sm.first_logits, ids.numpy(), cfg))
    assert runs[0] == runs[1]
    sm = TorchStepModel(MODELS["plain"], ids, mask)
    other = generate(sm, sm.first_logits, ids.numpy(), GenerationConfig(**{**cfg.__dict__, "seed": 124}))
    assert other != runs[0]


@pytest.mark.parametrize("model_name", ["plain", "eos"])
def test_sampling_top_k_1_is_greedy(model_name):
    ids, mask = _prompts(3)
    sm = TorchStepModel(MODELS[model_name], ids, mask)
    greedy = generate(sm, sm.first_logits, ids.numpy(), GenerationConfig(max_new_tokens=15, repetition_penalty=1.2))
    sm = TorchStepModel(MODELS[model_name], ids, mask)
    sampled = generate(sm, sm.first_logits, ids.numpy(),
                       GenerationConfig(max_new_tokens=15, repetition_penalty=1.2, do_sample=True, top_k=1,
                                        temperature=3.0, seed=7))
    assert sampled == greedy


@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.0])
def test_sampling_frequencies_follow_softmax(temperature):
    row = _fixed_logits()
    n, t = 4000, 5
    tokens = _requests(row, n, max_new_tokens=t, temperature=temperature).ravel()  # (a seed per request)
    assert tokens.size == n * t
    freq = np.bincount(tokens, minlength=len(row)) / tokens.size
    p = np.exp((row - row.max()) / temperature)
    p /= p.sum()
    sigma = np.sqrt(p * (1 - p) / tokens.size)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-4), (freq, p)


def _requests(row, n: int, **cfg) -> np.ndarray:
    """n single-row sampling requests with seeds 0..n-1 over fixed logits: their tokens [n, max_new_tokens]."""
    out = []
    for seed in range(n):
        fake = FixedLogitsModel(row, 1)
        out += generate(fake, fake.first(), np.full((1, 1), BOS), GenerationConfig(do_sample=True, seed=seed, **cfg))
    return np.array(out)


def test_a_seeded_row_draws_what_it_draws_alone():
    """A generator per row: rows of one batch with the request's seed each draw what the request draws alone."""
    row = _fixed_logits()
    alone = _requests(row, 1, max_new_tokens=6)[0].tolist()
    fake = FixedLogitsModel(row, 5)
    batch = generate(fake, fake.first(), np.full((5, 1), BOS),
                     GenerationConfig(max_new_tokens=6, do_sample=True, seed=0))
    assert batch == [alone] * 5


def test_sampling_respects_top_k_and_top_p():
    row = _fixed_logits()
    n = 3000
    order = np.argsort(-row)
    out = _requests(row, n, max_new_tokens=2, top_k=3)
    assert set(np.unique(out)) == set(order[:3].tolist())
    p = np.exp(row - row.max())
    p /= p.sum()
    out = _requests(row, n, max_new_tokens=2, top_p=0.6)
    kept = apply_top_p(row[None], 0.6)[0] > -np.inf
    assert set(np.unique(out)) == set(np.flatnonzero(kept).tolist())
    freq = np.bincount(out.ravel(), minlength=len(row)) / out.size
    q = np.where(kept, p, 0)
    q /= q.sum()
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / out.size) + 1e-4)


def test_sampling_finished_rows_stop_and_are_not_padded():
    row = np.zeros(8, dtype=np.float32)  # uniform: EOS drawn often
    fake = FixedLogitsModel(row, 200)
    out = generate(fake, fake.first(), np.full((200, 1), BOS),
                   GenerationConfig(max_new_tokens=30, do_sample=True, seed=5, min_new_tokens=2))
    assert all(len(r) >= 2 for r in out)
    for r in out:
        assert EOS not in r[:-1] and (r[-1] == EOS or len(r) == 30)
    assert fake.steps == max(len(r) for r in out) - 1


def test_greedy_feeds_pad_to_finished_rows():
    row = np.zeros(8, dtype=np.float32)
    row[EOS] = 5.0  # row 0 finishes at once; row 1 only after step 3 (see Recorder)

    class Recorder(FixedLogitsModel):
        def __init__(self):
            super().__init__(row, 2)
            self.fed = []

        def step(self, tokens):
            self.fed.append(tokens.copy())
            out = super().step(tokens)
            out[1, EOS] = -10.0 if self.steps < 3 else 10.0
            return out

    rec = Recorder()
    first = rec.first()
    first[1, EOS] = -10.0
    out = generate(rec, first, np.full((2, 1), BOS), GenerationConfig(max_new_tokens=10))
    assert out[0] == [EOS] and len(out[1]) == 4 and out[1][-1] == EOS
    # like HF: the EOS itself goes in at the next step, then pad ids while the other row runs
    assert rec.steps == 3 and [int(f[0]) for f in rec.fed] == [EOS, PAD, PAD]


def test_beam_search_reorders_and_expands_cache():
    row = _fixed_logits()
    fake = FixedLogitsModel(row, 2)
    out = generate(fake, fake.first(), np.full((2, 3), BOS), GenerationConfig(max_new_tokens=4, num_beams=3))
    assert len(out) == 2 and all(len(r) == 4 for r in out)
    assert fake.steps == 3 and len(fake.reorders) == 3
    assert len(fake.reorders[0]) == 6 and set(fake.reorders[0] // 1) <= {0, 1}  # B rows -> B*num_beams rows
    assert all(r[0] == int(np.argmax(row)) for r in out)


# --------------------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "do_sample": True}, "num_beams"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -2.0}, "repetition_penalty"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"seed": -3}, "seed"),
        ({"eos_token_id": -1}, "eos_token_id"),
        ({"num_beams": "three"}, "num_beams"),
        ({"temperature": None}, "temperature"),
    ],
)
def test_validate_rejects_bad_settings(kw, key):
    with pytest.raises(PromptError, match=rf"\b{key}=") as info:
        GenerationConfig(**kw).validate()
    msg = str(info.value)
    assert ("out of range" in msg or "not supported" in msg or "not valid" in msg) and "must" in msg
    number = isinstance(kw[key], (int, float))
    assert ("not valid" in msg) != number or "not supported" in msg  # a wrong type is not called out of range
    assert isinstance(info.value, ValueError)


def test_validate_messages_name_range():
    with pytest.raises(PromptError, match="not supported"):
        GenerationConfig(num_beams=3, do_sample=True).validate()
    with pytest.raises(PromptError, match=r"top_p=0\.0 .*\(0, 1\]"):
        GenerationConfig(top_p=0.0).validate()
    with pytest.raises(PromptError, match=r"max_new_tokens=40 .*<= 32"):
        GenerationConfig(max_new_tokens=40).validate(max_total_new=32)
    GenerationConfig(max_new_tokens=32).validate(max_total_new=32)
    GenerationConfig(temperature=0.0).validate()  # only checked when sampling, as in HF
    with pytest.raises(PromptError, match="num_beams"):  # generate() validates too
        generate(FixedLogitsModel(_fixed_logits(), 1), _fixed_logits()[None], np.array([[BOS]]),
                 GenerationConfig(num_beams=0))


def test_runtime_search_does_not_import_torch():
    code = ("import sys, runtime.search; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
