"""Continuous batching: requests join the running decode batch at the next step and leave it the step they end.

    from runtime import Blip2Pipeline
    from runtime.engine import GenerationEngine
    engine = GenerationEngine(Blip2Pipeline.from_dir("engines/demo/onnx"))
    a = engine.submit("cat.jpg", max_new_tokens=20)                      # checked now, before any graph runs
    b = engine.submit("dog.png", prompt="Question: what is it? Answer:", num_beams=3)
    while engine.step():                                                 # one decode step of every running row
        print(a.tokens)                                                  # (what a stream shows so far)
    print(a.text, b.text)

Each `step` first admits waiting requests, first come first served, while the folder's max batch has rows free
(a request with `num_beams=B` holds B rows): their vision graph, Q-Former and prefill run together, each chooses its
first token, and their caches join the running batch (`runtime.decoder`'s `merge`: rows aligned on their last
token, the attention mask and position ids saying where each row's tokens are). Then every running row takes one
decode step together; each request's search (`runtime.search`'s GreedySearch or BeamSearch, with the request's
own options and seeded generator) picks its rows' next tokens, and the rows of requests that ended leave the batch.

A request's tokens are what `Blip2Pipeline.generate` gives it alone, whatever it ran beside: the same search, the
same logits up to the rounding of a differently padded batch (tests/test_engine.py drives interleaved arrivals
with mixed options and counts any difference against the request's own near-ties).

Rows of any length share one decoder call: OPT's and T5's decoder graphs take a mask of each row's own tokens. (T5
folders built before T5's decoder graph took that mask share a call only among rows that have made as many steps:
requests admitted together; each such group is one decoder call per step.)

With `image_cache_bytes`, each image's soft prompt (OPT: the decoder's image input; T5: the encoder's) is kept in an
LRU cache keyed by a hash of the preprocessed image (and the Q-Former text, for question-aware prompts): a second
question about the same image skips the vision graph and the Q-Former.

The engine is single-threaded: `submit` may be called from any thread, `step` from one. `serve_forever` runs steps
on a thread until stopped, for a server that submits from its request handlers.
"""
import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from runtime import search
from runtime.decoder import DECODERS
from runtime.errors import PromptError

log = logging.getLogger(__name__)


class SoftPromptCache:
    """Soft prompts by image key, least recently used first out, within `max_bytes` (0: nothing is kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.items: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

    @staticmethod
    def key(pixels: np.ndarray, question: str | None) -> tuple:
        return hashlib.blake2b(np.ascontiguousarray(pixels).view(np.uint8), digest_size=16).digest(), question

    def get(self, key) -> np.ndarray | None:
        found = self.items.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return found

    def put(self, key, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes or key in self.items:
            return
        self.items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self.items.popitem(last=False)[1].nbytes


@dataclass
class Handle:
    """One request's progress: `tokens` so far (greedy and sampling: one more per step; beam search: all at the
    end), `done`, and `error` (an exception) if its batch failed. `text` once done."""

    prompt: str | None
    num_beams: int
    submitted: float = field(default_factory=time.monotonic)
    tokens: list = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    text: str | None = None
    cancelled: bool = False
    prompt_tokens: int = 0  # the LLM's input ids (image placeholders included)
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave at the next step)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is done (on a thread other than the one stepping the engine)."""
        return self._event.wait(timeout)


@dataclass
class _Pending:
    handle: Handle
    pixels: np.ndarray  # [3, H, W]
    row: list[int]  # the LLM's input ids
    question: str | None
    cfg: search.GenerationConfig
    on_update: object = None
    key: tuple | None = None  # (the image cache's)


@dataclass
class _Active:
    pending: _Pending
    search: object  # GreedySearch | BeamSearch over one prompt


@dataclass
class _Group:
    """Rows that share one decoder call per step: a decoder (its cache) and the requests whose rows it holds, in
    row order."""

    decoder: object
    active: list


class GenerationEngine:
    def __init__(self, pipe, max_rows: int | None = None, image_cache_bytes: int = 0):
        if pipe.llm is None:
            pipe._need("llm_decoder", "GenerationEngine")
        self.pipe, self.llm = pipe, pipe.llm
        self.max_rows = max_rows or pipe.manifest.limits.max_batch
        self.waiting: collections.deque[_Pending] = collections.deque()
        self.groups: list[_Group] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.tokens_generated, self.peak_rows = 0, 0
        self.cache = SoftPromptCache(image_cache_bytes)

    # ------------------------------------------------------------ requests
    def submit(self, image, prompt: str | None = None, qformer_text: str | None = None, on_update=None,
               **generation) -> Handle:
        """Queue one image's generation (options as for Blip2Pipeline.generate). Everything is checked here, before
        any graph runs: the prompt, the options, the image (decoded and preprocessed now, on the caller's thread).
        `on_update(handle)`: called on the stepping thread after each step that changed the handle."""
        cfg = self.llm.config(generation)
        if cfg.num_beams > self.max_rows:
            raise PromptError(f"num_beams={cfg.num_beams} needs {cfg.num_beams} rows; this engine runs at most "
                              f"{self.max_rows}")
        row = self.llm.rows([prompt])[0]
        question = self.pipe._questions(qformer_text, 1, "llm")
        pixels = self.pipe.encoder.pixels([image])[0]
        handle = Handle(prompt, cfg.num_beams, prompt_tokens=len(row))
        question = question[0] if question else None
        key = self.cache.key(pixels, question) if self.cache.max_bytes else None
        with self._wake:
            self.waiting.append(_Pending(handle, pixels, row, question, cfg, on_update, key))
            self._wake.notify()
        return handle

    @property
    def running_rows(self) -> int:
        return sum(a.search.rows for g in self.groups for a in g.active)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------ stepping
    def step(self) -> bool:
        """Admit what fits, then one decode step of every running row. Returns whether work remains."""
        self._drop_cancelled()
        self._admit()
        self.peak_rows = max(self.peak_rows, self.running_rows)
        for group in list(self.groups):
            self._decode(group)
        self.groups = [g for g in self.groups if g.active]
        return bool(self.groups or self.waiting)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.step():
            pass

    def serve_forever(self, stop: threading.Event) -> None:
        """Step while there is work; sleep until a request arrives otherwise; return when `stop` is set."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception as e:  # noqa: BLE001 (a bug of ours: every request ends with it, the engine goes on)
                log.exception("engine step failed")
                self._fail_all(e)
                busy = False
            if not busy:
                with self._wake:
                    self._wake.wait_for(lambda: self.waiting or stop.is_set(), timeout=0.5)

    def stop(self, stop: threading.Event) -> None:
        with self._wake:
            stop.set()
            self._wake.notify_all()

    def _take(self) -> list[_Pending]:
        """Waiting requests that fit in the free rows, first come first served (a request that does not fit waits,
        and so do those behind it, so a large beam search is never starved by small requests)."""
        free, taken = self.max_rows - self.running_rows, []
        with self._lock:
            while self.waiting and self.waiting[0].cfg.num_beams <= free and len(taken) < self.max_rows:
                taken.append(self.waiting.popleft())
                free -= taken[-1].cfg.num_beams
        return taken

    def _admit(self) -> None:
        new = self._take()
        if not new:
            return
        try:
            decoder, logits, context, mask = self._prefill(new)
        except Exception as e:  # (the graphs failed: these requests end with the error, the engine goes on)
            log.exception("prefill failed")
            for p in new:
                self._finish(p, error=e)
            return
        active, index = [], []
        for i, p in enumerate(new):
            s = search.start_search(1, context[i:i + 1], p.cfg, logits.shape[-1], mask[i:i + 1])
            rows = s.advance(logits[i:i + 1])
            self._progress(p, s)
            if s.done:
                self._finish(p, s)
            else:
                active.append(_Active(p, s))
                index.append(i + (np.zeros(s.rows, np.int64) if rows is None else rows))
        if not active:
            return
        decoder.reorder(np.concatenate(index))
        for group in self.groups:
            if group.decoder.can_merge(decoder):
                group.decoder.merge(decoder)
                group.active += active
                return
        self.groups.append(_Group(decoder, active))

    def _prefill(self, new: list[_Pending]):
        """Soft prompts (vision + Q-Former, batched; question-aware where asked) and the LLM's prefill of `new` in
        a decoder of their own: (decoder, first logits [n, V], the ids and mask each search's penalty sees)."""
        soft = [None if p.key is None else self.cache.get(p.key) for p in new]
        plain = [i for i, p in enumerate(new) if soft[i] is None and p.question is None]
        asked = [i for i, p in enumerate(new) if soft[i] is None and p.question is not None]
        for part, questions in ((plain, None), (asked, [new[i].question for i in asked])):
            if part:
                pixels = np.stack([new[i].pixels for i in part])
                for i, sp in zip(part, self.llm.soft_prompt(pixels, questions)):
                    soft[i] = sp
                    if new[i].key is not None:
                        self.cache.put(new[i].key, sp.copy())  # (a copy: not a view of the batch)
        decoder = DECODERS[self.llm.llm.family](self.pipe.runners, self.llm.llm)
        input_ids, attention_mask = self.llm.layout.batch([p.row for p in new])
        logits = decoder.prefill(input_ids, attention_mask, np.stack(soft))
        context, mask = decoder.context(input_ids, attention_mask)
        return decoder, logits, context, mask

    def _decode(self, group: _Group) -> None:
        feed = np.concatenate([a.search.feed for a in group.active])
        try:
            logits = group.decoder.step(feed)
        except Exception as e:
            log.exception("decode step failed")
            for a in group.active:
                self._finish(a.pending, error=e)
            group.active = []
            return
        kept, offset, moved = [], 0, False
        for a in group.active:
            n = a.search.rows
            rows = a.search.advance(logits[offset:offset + n])
            self._progress(a.pending, a.search)
            if a.search.done:
                self._finish(a.pending, a.search)
            else:
                kept.append((a, offset + (np.arange(n) if rows is None else rows)))
                moved |= rows is not None
            offset += n
        if moved or len(kept) != len(group.active):
            self._keep(group, kept)

    @staticmethod
    def _keep(group: _Group, kept: list) -> None:
        """The group's batch becomes `kept`'s rows: (an active request, the rows of the current batch it now
        holds), in order; positions no row attends to any more are dropped."""
        group.decoder.reorder(np.concatenate([rows for _, rows in kept]) if kept else np.zeros(0, np.int64))
        group.decoder.trim()
        group.active = [a for a, _ in kept]

    def _drop_cancelled(self) -> None:
        with self._lock:
            for p in [p for p in self.waiting if p.handle.cancelled]:
                self.waiting.remove(p)
                self._finish(p)
        for group in self.groups:
            if any(a.pending.handle.cancelled for a in group.active):
                kept, offset = [], 0
                for a in group.active:
                    if a.pending.handle.cancelled:
                        self._finish(a.pending, a.search)
                    else:
                        kept.append((a, offset + np.arange(a.search.rows)))
                    offset += a.search.rows
                self._keep(group, kept)
        self.groups = [g for g in self.groups if g.active]

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self.waiting = list(self.waiting), collections.deque()
        for p in pending + [a.pending for g in self.groups for a in g.active]:
            self._finish(p, error=error)
        self.groups = []

    # ------------------------------------------------------------ results
    def _progress(self, p: _Pending, s) -> None:
        tokens = s.new_tokens()[0]
        if len(tokens) > len(p.handle.tokens):
            self.tokens_generated += len(tokens) - len(p.handle.tokens)
            p.handle.first_token_at = p.handle.first_token_at or time.monotonic()
            p.handle.tokens = tokens
            if p.on_update is not None and not s.done:
                p.on_update(p.handle)

    def _finish(self, p: _Pending, s=None, error: BaseException | None = None) -> None:
        h = p.handle
        if s is not None and error is None:
            h.tokens = s.result()[0]
            h.text = self.llm.tokenizer.decode(h.tokens)
        h.error, h.done, h.finished_at = error, True, time.monotonic()
        h._event.set()
        if p.on_update is not None:
            p.on_update(h)
