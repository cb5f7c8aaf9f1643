"""Text-generation strategies (greedy, sampling, beam search) in pure numpy.

The search is kept apart from the model, in the style of nanochat's engine and
onnxruntime-genai: the language model is reached only through the small
:class:`StepModel` protocol below (feed one token per live row, get logits
back; keep/duplicate KV-cache rows). Any backend -- onnxruntime, TensorRT, a
torch reference model in the tests -- can drive the same search code, and this
module imports nothing but numpy (it runs on the Jetson).

The logits processors and warpers, their order, and the beam search reproduce
Hugging Face transformers 5.23 ``GenerationMixin.generate`` (``_sample`` and
``_beam_search``); ``tests/test_search.py`` checks greedy and beam search
token-for-token against it.

Usage::

    import numpy as np
    from runtime.search import GenerationConfig, generate

    class MyDecoder:                      # anything with .step() and .reorder()
        def step(self, tokens):           # int64 [N] -> float32 logits [N, V]
            ...
        def reorder(self, index):         # new cache row i = old row index[i]
            ...

    decoder = MyDecoder()
    first_logits = decoder.prefill(input_ids, attention_mask)   # [B, V], caller's job
    cfg = GenerationConfig(max_new_tokens=30, num_beams=3, length_penalty=1.0)
    new_tokens = generate(decoder, first_logits, input_ids, cfg)
    # -> one list of new token ids per prompt row, ending with EOS if one was made
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

For BLIP-2, pass as ``context_ids`` the same (left-padded) ``input_ids`` that
transformers gives the language model (image placeholder tokens included), so
the repetition penalty sees what Hugging Face sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import PromptError

__all__ = [
    "StepModel",
    "GenerationConfig",
    "generate",
    "start_search",
    "GreedySearch",
    "BeamSearch",
    "config_from_options",
    "teacher_forced",
    "log_softmax",
    "apply_repetition_penalty",
    "apply_min_new_tokens",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
]

_NEG = np.float32(-1.0e9)  # the "very large negative" score transformers uses in beam search


@runtime_checkable
class StepModel(Protocol):
    """What the search needs from a decoder with a KV cache (prefill is done by the caller)."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens int64 [N]: one new token per live row; appends it to the KV cache and returns float32 logits [N, V]
        for the next position."""
        ...

    def reorder(self, index: np.ndarray) -> None:
        """Keep/duplicate cache rows: row i of the new cache is old row index[i] (len(index) becomes the new N). Used to
        expand a batch to B*num_beams and to follow beams."""
        ...


# --------------------------------------------------------------------------- config


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            and math.isfinite(v))


@dataclass
class GenerationConfig:
    """Decoding settings; names and meanings follow transformers' ``GenerationConfig``.

    ``num_beams == 1`` and ``do_sample == False`` is greedy search; ``do_sample`` turns on
    multinomial sampling (with temperature / top_k / top_p); ``num_beams > 1`` is beam
    search (``length_penalty`` and ``early_stopping`` only matter there; ``early_stopping``
    may be ``False``, ``True`` or ``"never"`` as in transformers).
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    eos_token_id: int = 2
    pad_token_id: int = 1

    def validate(self, max_total_new: int | None = None) -> "GenerationConfig":
        """Check every setting; raise :class:`PromptError` naming the bad key and its allowed range.

        ``max_total_new``: the most new tokens the engine can still hold (e.g. KV-cache
        capacity minus the prompt length); ``None`` means no such limit.
        Returns ``self`` so it can be chained.
        """

        def bad(key: str, allowed: str) -> PromptError:
            value = getattr(self, key)
            what = "out of range" if isinstance(value, (int, float, np.number, np.bool_)) else "not valid"
            return PromptError(f"generation setting {key}={value!r} is {what}: {allowed}.")

        limit = "" if max_total_new is None else f" and <= {max_total_new} (what the engine can hold for this prompt)"
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"it must be an integer >= 1{limit}")
        if max_total_new is not None and self.max_new_tokens > max_total_new:
            raise bad("max_new_tokens", f"it must be an integer >= 1{limit}; lower it or shorten the prompt")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"it must be an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "it must be an integer >= 1 (1 = greedy or sampling, > 1 = beam search)")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise bad("do_sample", "it must be True or False")
        if self.do_sample and self.num_beams > 1:
            raise PromptError(
                f"generation setting num_beams={self.num_beams} together with do_sample=True (beam sampling) is "
                "not supported: num_beams must be 1 when do_sample=True; for beam search set do_sample=False."
            )
        if not _is_real(self.temperature) or (self.do_sample and self.temperature <= 0):
            raise bad(
                "temperature",
                "it must be a finite number > 0 when do_sample=True (for greedy decoding set do_sample=False)",
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "it must be an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "it must be a number in (0, 1] (1 = off)")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "it must be a finite number > 0 (1 = off, > 1 discourages repeats)")
        if not _is_real(self.length_penalty):
            raise bad("length_penalty", "it must be a finite number (1 = neutral, > 1 favours longer beams)")
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            raise bad("early_stopping", 'it must be True, False or "never"')
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "it must be None or an integer >= 0")
        if not _is_int(self.eos_token_id) or self.eos_token_id < 0:
            raise bad("eos_token_id", "it must be a token id (integer >= 0)")
        if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise bad("pad_token_id", "it must be a token id (integer >= 0)")
        return self


DEFAULT_MAX_NEW_TOKENS = 30  # when a caller gives none: this, or the engine folder's limit where it is lower


def config_from_options(options: dict, eos_token_id: int, pad_token_id: int,
                        max_new_tokens_limit: int | None = None) -> GenerationConfig:
    """A validated GenerationConfig from a caller's keyword options; unknown options are named. Without
    max_new_tokens (or with None): DEFAULT_MAX_NEW_TOKENS, at most `max_new_tokens_limit`."""
    known = set(GenerationConfig.__dataclass_fields__) - {"eos_token_id", "pad_token_id"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PromptError(f"unknown generation option(s) {unknown}; valid options are {sorted(known)}")
    if options.get("max_new_tokens") is None:
        default = DEFAULT_MAX_NEW_TOKENS if max_new_tokens_limit is None else min(DEFAULT_MAX_NEW_TOKENS,
                                                                                   max(1, max_new_tokens_limit))
        options = {**options, "max_new_tokens": default}
    return GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **options).validate()


# --------------------------------------------------------------------------- processors / warpers
# Each takes float32 scores [N, V] and returns a new float32 array (inputs are never modified).


def check_beams(cfg: GenerationConfig, max_batch: int) -> None:
    """Every beam is a row of the graphs: more beams than the folder's max batch cannot run."""
    if cfg.num_beams > max_batch:
        raise PromptError(f"generation setting num_beams={cfg.num_beams} is out of range: each beam is a row of the "
                          f"engine folder's batch, which holds {max_batch} (manifest limits.max_batch); use at most "
                          f"{max_batch} beams, or rebuild with a larger --max-batch")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (what beam search scores are made of)."""
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))
    shifted = x - m
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(axis=-1, keepdims=True)


def _token_presence(ids: np.ndarray, vocab_size: int, prompt_ignore_length: np.ndarray | None = None) -> np.ndarray:
    """bool [N, V+1]: which ids occur in each row (column V collects ids outside the vocabulary and ignored
    positions)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = np.where((ids < 0) | (ids > vocab_size), vocab_size, ids)
    if prompt_ignore_length is not None:
        skip = np.arange(ids.shape[1])[None, :] < np.asarray(prompt_ignore_length)[:, None]
        ids = np.where(skip, vocab_size, ids)
    present = np.zeros((ids.shape[0], vocab_size + 1), dtype=bool)
    present[np.arange(ids.shape[0])[:, None], ids] = True
    return present


def _penalize(scores: np.ndarray, present: np.ndarray, penalty: float) -> np.ndarray:
    v = scores.shape[-1]
    p = np.float32(penalty)
    penalized = np.where(scores < 0, scores * p, scores / p)
    return np.where(present[:, :v], penalized, scores).astype(np.float32, copy=False)


def apply_repetition_penalty(
    scores: np.ndarray, ids: np.ndarray, penalty: float, prompt_ignore_length: np.ndarray | int | None = None
) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: every id seen in ``ids`` [N, T] gets its
    score multiplied by ``penalty`` if negative, divided by it otherwise (once per id).
    ``prompt_ignore_length`` (int or int [N]): leading positions to skip -- ``generate`` passes the
    left-padding length of each prompt, as transformers does from the attention mask."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if prompt_ignore_length is not None:
        prompt_ignore_length = np.broadcast_to(np.asarray(prompt_ignore_length, dtype=np.int64), (ids.shape[0],))
    return _penalize(scores, _token_presence(ids, scores.shape[-1], prompt_ignore_length), penalty)


def apply_min_new_tokens(scores: np.ndarray, n_generated: int, min_new_tokens: int, eos_token_id: int) -> np.ndarray:
    """transformers' ``MinNewTokensLengthLogitsProcessor``: EOS gets -inf while fewer than
    ``min_new_tokens`` tokens have been generated."""
    scores = np.array(scores, dtype=np.float32)  # copy
    if n_generated < min_new_tokens:
        scores[:, eos_token_id] = -np.inf
    return scores


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """transformers' ``TemperatureLogitsWarper``: scores / temperature."""
    return np.asarray(scores, dtype=np.float32) / np.float32(temperature)


def apply_top_k(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' ``TopKLogitsWarper``: -inf for every score below the k-th largest (ties kept)."""
    scores = np.asarray(scores, dtype=np.float32)
    v = scores.shape[-1]
    k = min(max(int(top_k), int(min_tokens_to_keep)), v)
    kth = np.partition(scores, v - k, axis=-1)[:, v - k : v - k + 1]
    return np.where(scores < kth, np.float32(-np.inf), scores)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' ``TopPLogitsWarper``: keep the smallest set of top tokens whose probability
    reaches ``top_p`` (sorted ascending, drop while the cumulative probability <= 1 - top_p)."""
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(scores, order, axis=-1)
    m = sorted_logits[:, -1:]
    e = np.exp(sorted_logits - np.where(np.isfinite(m), m, np.float32(0)))
    cum = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1, dtype=np.float32)
    remove_sorted = cum <= np.float32(1 - top_p)
    remove_sorted[:, scores.shape[-1] - min_tokens_to_keep :] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def _process(scores: np.ndarray, present: np.ndarray | None, n_generated: int, cfg: GenerationConfig) -> np.ndarray:
    """The logits processors, in transformers' order: repetition penalty, then min-new-tokens."""
    if present is not None:
        scores = _penalize(scores, present, cfg.repetition_penalty)
    if n_generated < cfg.min_new_tokens:
        scores = apply_min_new_tokens(scores, n_generated, cfg.min_new_tokens, cfg.eos_token_id)
    return scores


def _warp(scores: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """The sampling warpers, in transformers' order: temperature, top-k, top-p."""
    if cfg.temperature != 1.0:
        scores = apply_temperature(scores, cfg.temperature)
    if cfg.top_k != 0:
        scores = apply_top_k(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = apply_top_p(scores, cfg.top_p)
    return scores


# --------------------------------------------------------------------------- helpers


def _topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first; equal values: lower index first."""
    n = x.shape[-1]
    if k >= n:
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(x, part, axis=-1)
    kth = vals.min(axis=-1, keepdims=True)
    if ((x == kth).sum(axis=-1) > (vals == kth).sum(axis=-1)).any():  # a tie cut by the partition
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _multinomial(scores: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One draw per row from softmax(scores), row i from rngs[i]; -inf scores are never drawn."""
    probs = _softmax64(scores)
    cdf = np.cumsum(probs, axis=-1)
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]
    idx = (cdf <= u[:, None]).sum(axis=-1)
    last_possible = scores.shape[-1] - 1 - np.argmax((probs > 0)[:, ::-1], axis=-1)
    return np.minimum(idx, last_possible).astype(np.int64)


def _as_logits(x, n: int, v: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (n, v):
        raise ValueError(f"{what} must have shape [{n}, {v}] (rows x vocabulary), got {list(x.shape)}.")
    return x.astype(np.float32, copy=False)


def _leading_padding(context_ids: np.ndarray, prompt_mask: np.ndarray | None, pad_token_id: int) -> np.ndarray:
    """Per row, how many leading prompt positions are padding (transformers: ``(mask != 0).argmax(1)``)."""
    if prompt_mask is None:
        prompt_mask = context_ids != pad_token_id  # what transformers derives when no mask is given
    prompt_mask = np.asarray(prompt_mask)
    if prompt_mask.shape != context_ids.shape:
        raise ValueError(f"prompt_mask must have the shape of context_ids {list(context_ids.shape)}, "
                         f"got {list(prompt_mask.shape)}.")
    return np.argmax(prompt_mask != 0, axis=1)


# --------------------------------------------------------------------------- search


def generate(
    model: StepModel,
    first_logits: np.ndarray,
    context_ids: np.ndarray,
    cfg: GenerationConfig,
    *,
    prompt_mask: np.ndarray | None = None,
) -> list[list[int]]:
    """Generate new tokens for B prompts whose prefill is already done.

    ``first_logits`` float32 [B, V]: the logits after the prompt; ``model``'s cache holds B rows.
    ``context_ids`` int64 [B, L]: the prompt ids, left-padded with ``cfg.pad_token_id``; they feed
    the repetition penalty. Like transformers 5.23, leading padding is not penalised: it is taken
    from ``prompt_mask`` (the 0/1 attention mask, [B, L]) if given, else from the leading run of
    pad ids. Returns per row the new tokens, ending with EOS if one was produced (nothing after
    it); for beam search, the best beam. ``model.step`` is called once per generated position
    after the first; beam search calls ``model.reorder`` before each of those steps.
    """
    cfg.validate()
    ctx = np.asarray(context_ids)
    if ctx.ndim != 2 or not np.issubdtype(ctx.dtype, np.integer):
        raise ValueError(f"context_ids must be an integer array [B, L], got {ctx.dtype} {list(ctx.shape)}.")
    ctx = ctx.astype(np.int64, copy=False)
    first = np.asarray(first_logits)
    if first.ndim != 2 or first.shape[0] != ctx.shape[0]:
        raise ValueError(
            f"first_logits must be [B, V] with B = context_ids rows ({ctx.shape[0]}), got {list(first.shape)}."
        )
    b, v = first.shape
    if not cfg.eos_token_id < v:
        raise PromptError(f"generation setting eos_token_id={cfg.eos_token_id} is out of range: "
                          f"it must be < vocabulary size {v}.")
    if cfg.num_beams > 1 and 2 * cfg.num_beams > v:
        raise PromptError(f"generation setting num_beams={cfg.num_beams} is out of range: "
                          f"it must be <= vocabulary size / 2 ({v // 2}).")
    return _run(model, start_search(b, ctx, cfg, v, prompt_mask), first.astype(np.float32, copy=False))


class GreedySearch:
    """transformers' ``_sample`` (greedy, or multinomial sampling with ``cfg.do_sample``) over b rows, one step per
    `advance`: finished rows keep being fed the pad token (and output pad) while others run."""

    def __init__(self, b: int, present: np.ndarray | None, cfg: GenerationConfig):
        self.cfg, self.present, self.t = cfg, present, 0
        # A generator per row, each seeded with the request's seed: a row draws what it would draw alone, whatever
        # it is batched with (one generator across the batch made a seeded answer depend on its batch neighbours).
        self.rngs = [np.random.default_rng(cfg.seed) for _ in range(b)] if cfg.do_sample else None
        self.out = np.full((b, cfg.max_new_tokens), cfg.pad_token_id, dtype=np.int64)
        self.lengths = np.full(b, cfg.max_new_tokens, dtype=np.int64)
        self.alive = np.ones(b, dtype=bool)
        self.feed, self.done = None, False

    @property
    def rows(self) -> int:
        """Cache rows this search holds."""
        return len(self.alive)

    def advance(self, logits: np.ndarray) -> None:
        """Choose every row's next token from `logits` [b, V]; `feed` is then what the model's next step takes."""
        cfg, v = self.cfg, logits.shape[-1]
        scores = _process(logits, self.present, self.t, cfg)
        if cfg.do_sample:
            tokens = _multinomial(_warp(scores, cfg), self.rngs)
        else:
            tokens = np.argmax(scores, axis=-1).astype(np.int64)
        tokens = np.where(self.alive, tokens, cfg.pad_token_id)
        self.out[:, self.t] = tokens
        if self.present is not None:
            self.present[np.arange(len(tokens)), np.minimum(tokens, v)] = True
        just_finished = self.alive & (tokens == cfg.eos_token_id)
        self.lengths[just_finished] = self.t + 1
        self.alive &= ~just_finished
        self.t += 1
        self.feed, self.done = tokens, not self.alive.any() or self.t >= cfg.max_new_tokens
        return None  # (the cache rows stay as they are)

    def new_tokens(self) -> list[list[int]]:
        """Each row's tokens so far (what a stream may already show)."""
        return [self.out[i, : min(self.t, self.lengths[i])].tolist() for i in range(self.rows)]

    def result(self) -> list[list[int]]:
        return [self.out[i, : self.lengths[i]].tolist() for i in range(self.rows)]


def _run(model: StepModel, search, logits: np.ndarray) -> list[list[int]]:
    """Drive a step-wise search (GreedySearch, BeamSearch) with `model` from the prefill's `logits`."""
    v = logits.shape[-1]
    while True:
        index = search.advance(logits)
        if search.done:
            return search.result()
        if index is not None:
            model.reorder(index)
        logits = _as_logits(model.step(search.feed), search.rows, v, "model.step() output")


@dataclass
class _Beams:
    """_beam_search's state for a batch of b items: per item `num_beams` running beams (their tokens so far and
    accumulated log-probs) and `num_beams` finished hypotheses (tokens, length-normalised score, length)."""

    run_tok: np.ndarray  # [b, nb, max_new] int64
    run_score: np.ndarray  # [b, nb] float32
    fin_tok: np.ndarray  # [b, nb, max_new] int64
    fin_score: np.ndarray  # [b, nb] float32
    fin_len: np.ndarray  # [b, nb] int64
    is_fin: np.ndarray  # [b, nb] bool: the slot holds a real hypothesis
    improvable: np.ndarray  # [b] bool: transformers' is_early_stop_heuristic_unsatisfied

    @classmethod
    def start(cls, b: int, cfg: GenerationConfig) -> "_Beams":
        nb, shape = cfg.num_beams, (b, cfg.num_beams, cfg.max_new_tokens)
        run_score = np.zeros((b, nb), dtype=np.float32)
        run_score[:, 1:] = _NEG  # only beam 0 is live at the start: no duplicate candidates
        return cls(np.full(shape, cfg.pad_token_id, dtype=np.int64), run_score,
                   np.full(shape, cfg.pad_token_id, dtype=np.int64), np.full((b, nb), _NEG, dtype=np.float32),
                   np.zeros((b, nb), dtype=np.int64), np.zeros((b, nb), dtype=bool), np.ones(b, dtype=bool))

    def candidates(self, logp: np.ndarray, t: int, cfg: GenerationConfig):
        """The top 2 * num_beams continuations over all beams of each item (logp [b * nb, V], step t): their
        accumulated scores, token rows, source beams and whether each stops here (EOS or the length limit)."""
        b, nb = self.run_score.shape
        v = logp.shape[-1]
        acc = (logp.reshape(b, nb, v) + self.run_score[:, :, None]).reshape(b, nb * v)
        cand = _topk_indices(acc, 2 * nb)
        score = np.take_along_axis(acc, cand, axis=1)
        src, token = cand // v, cand % v
        tok = np.take_along_axis(self.run_tok, src[:, :, None], axis=1)
        tok[:, :, t] = token
        return score, tok, src, (token == cfg.eos_token_id) | (t + 1 >= cfg.max_new_tokens)

    def keep_running(self, score, tok, src, hits) -> np.ndarray:
        """The best num_beams continuations that did not stop become the running beams; -> their source beams."""
        keep_score = score + hits.astype(np.float32) * _NEG
        keep = _topk_indices(keep_score, self.run_score.shape[1])
        self.run_tok = np.take_along_axis(tok, keep[:, :, None], axis=1)
        self.run_score = np.take_along_axis(keep_score, keep, axis=1)
        return np.take_along_axis(src, keep, axis=1)

    def finish(self, score, tok, hits, t: int, cfg: GenerationConfig) -> None:
        """Stopped continuations among the top num_beams compete for the finished slots, scored
        sum_logprobs / n_new_tokens ** length_penalty."""
        b, nb = self.run_score.shape
        just_fin = hits & (np.arange(2 * nb) < nb)[None, :]
        new_score = score / np.float32((t + 1) ** cfg.length_penalty)
        if cfg.early_stopping is True:
            new_score = new_score + self.is_fin.all(axis=1, keepdims=True).astype(np.float32) * _NEG
        new_score = new_score + (~self.improvable)[:, None].astype(np.float32) * _NEG
        new_score = new_score + (~just_fin).astype(np.float32) * _NEG
        merged = np.concatenate([self.fin_score, new_score], axis=1)
        sel = _topk_indices(merged, nb)
        self.fin_score = np.take_along_axis(merged, sel, axis=1)
        self.fin_tok = np.take_along_axis(np.concatenate([self.fin_tok, tok], axis=1), sel[:, :, None], axis=1)
        lengths = np.concatenate([self.fin_len, np.full((b, 2 * nb), t + 1)], axis=1)
        self.fin_len = np.take_along_axis(lengths, sel, axis=1)
        self.is_fin = np.take_along_axis(np.concatenate([self.is_fin, just_fin], axis=1), sel, axis=1)

    def done(self, hits, t: int, cfg: GenerationConfig) -> bool:
        """Whether nothing can change any more: no running beam can beat a finished hypothesis of its item."""
        lp, es = cfg.length_penalty, cfg.early_stopping
        best_len = cfg.max_new_tokens if (es == "never" and lp > 0.0) else t + 1
        best_possible = self.run_score[:, :1] / np.float32(best_len**lp)
        worst_fin = np.where(self.is_fin, self.fin_score.min(axis=1, keepdims=True), _NEG)
        self.improvable &= (best_possible > worst_fin).any(axis=1)
        return not self.improvable.any() or (es is True and self.is_fin.all()) or bool(hits.all())

    def best(self) -> list[list[int]]:
        return [self.fin_tok[i, 0, : self.fin_len[i, 0]].tolist() for i in range(len(self.fin_tok))]


class BeamSearch:
    """transformers' ``_beam_search`` (vectorised, static-shape variant) over b prompts, one step per `advance`.

    Per prompt it keeps ``num_beams`` running beams and ``num_beams`` finished hypotheses (:class:`_Beams`).
    Each step takes the top ``2 * num_beams`` continuations of the accumulated log-probs; the
    best ``num_beams`` that did not just stop keep running; those among the top ``num_beams``
    that stopped (EOS, or max_new_tokens reached) compete for the finished slots with score
    ``sum_logprobs / n_new_tokens ** length_penalty``. The first `advance` takes the prefill's b rows; every
    later one b * num_beams rows, and each returns the cache rows to keep (`model.reorder`'s index).
    """

    def __init__(self, b: int, present: np.ndarray | None, cfg: GenerationConfig):
        nb = cfg.num_beams
        self.cfg, self.b, self.t = cfg, b, 0
        self.present = None if present is None else np.repeat(present, nb, axis=0)
        self.beams = _Beams.start(b, cfg)
        self.row_base, self.flat_rows = (np.arange(b) * nb)[:, None], np.arange(b * nb)
        self.feed, self.done = None, False

    @property
    def rows(self) -> int:
        """Cache rows this search holds (before the first `advance`: the prefill's b)."""
        return self.b * self.cfg.num_beams if self.t else self.b

    def advance(self, logits: np.ndarray) -> np.ndarray | None:
        cfg, nb, t, beams = self.cfg, self.cfg.num_beams, self.t, self.beams
        if t == 0:
            logits = np.repeat(logits, nb, axis=0)  # the cache is expanded by the returned index
        score, tok, src, hits = beams.candidates(_process(log_softmax(logits), self.present, t, cfg), t, cfg)
        run_src = beams.keep_running(score, tok, src, hits)
        beams.finish(score, tok, hits, t, cfg)
        self.t += 1
        self.done = beams.done(hits, t, cfg)
        if self.done:
            return None
        # follow the surviving beams: cache row i <- old row of its parent beam
        src_rows = (self.row_base + run_src).reshape(-1)
        if self.present is not None:
            self.present = self.present[src_rows]
            self.present[self.flat_rows, np.minimum(beams.run_tok[:, :, t].reshape(-1), logits.shape[-1])] = True
        self.feed = beams.run_tok[:, :, t].reshape(-1)
        return src_rows // nb if t == 0 else src_rows

    def new_tokens(self) -> list[list[int]]:
        """Nothing until the search ends: the best beam can change at every step."""
        return [[] for _ in range(self.b)] if not self.done else self.result()

    def result(self) -> list[list[int]]:
        return self.beams.best()


def start_search(first_logits_rows: int, context_ids: np.ndarray, cfg: GenerationConfig, vocab_size: int,
                 prompt_mask: np.ndarray | None = None):
    """A step-wise search (GreedySearch or BeamSearch) for `first_logits_rows` prompts whose prefill is done, for a
    caller that drives the model itself (runtime.engine): `advance(logits)` -> the cache rows to keep or None,
    then the model steps with `feed`, until `done`; `result()` is what `generate` returns."""
    present = None
    if cfg.repetition_penalty != 1.0:
        ctx = np.asarray(context_ids, dtype=np.int64)
        present = _token_presence(ctx, vocab_size, _leading_padding(ctx, prompt_mask, cfg.pad_token_id))
    return (GreedySearch if cfg.num_beams == 1 else BeamSearch)(first_logits_rows, present, cfg)


# --------------------------------------------------------------------------- teacher forcing


def teacher_forced(model: StepModel, first_logits: np.ndarray, tokens: list[list[int]],
                   pad_token_id: int) -> list[np.ndarray]:
    """Feed every row its given ``tokens`` one step at a time, whatever the model would choose, and return per row
    float32 [len(tokens[b]), V]: the logits that predicted each of those tokens (row 0 is ``first_logits[b]``).
    Rows shorter than the longest are fed ``pad_token_id`` after their end (their later logits are dropped)."""
    first = np.asarray(first_logits, dtype=np.float32)
    if first.ndim != 2 or first.shape[0] != len(tokens):
        raise ValueError(f"first_logits must be [B, V] with one row per token list ({len(tokens)}), "
                         f"got {list(first.shape)}.")
    width = max((len(row) for row in tokens), default=0)
    picked: list[list[np.ndarray]] = [[] for _ in tokens]
    logits = first
    for t in range(width):
        for b, row in enumerate(tokens):
            if t < len(row):
                picked[b].append(np.asarray(logits[b], dtype=np.float32))
        if t + 1 < width:
            fed = np.array([row[t] if t < len(row) else pad_token_id for row in tokens], dtype=np.int64)
            logits = model.step(fed)
    return [np.stack(rows) if rows else np.zeros((0, first.shape[1]), np.float32) for rows in picked]
