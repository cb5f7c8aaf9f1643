"""runtime.engine: continuous batching gives every request what Blip2Pipeline.generate gives it alone, whatever it
ran beside and whenever it arrived; rows are bounded, leave when done, and streams concatenate to the full text."""
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from runtime import Blip2Pipeline
from runtime.engine import GenerationEngine
from runtime.errors import PromptError
from runtime.text import LlmTokenizer, TextStream

# Mixed options: greedy, sampling with seeds, beam search, repetition penalty, min/max lengths, prompts of different
# lengths, captions.
REQUESTS = [
    {},
    {"prompt": "a photo of", "max_new_tokens": 7},
    {"num_beams": 3, "max_new_tokens": 12},
    {"prompt": "what is it", "do_sample": True, "seed": 3, "top_p": 0.9},
    {"max_new_tokens": 3},
    {"prompt": "x y z w", "num_beams": 2, "max_new_tokens": 9, "length_penalty": 0.5},
    {"repetition_penalty": 1.3, "min_new_tokens": 5},
    {"prompt": "hi", "do_sample": True, "seed": 1, "temperature": 0.7, "top_k": 20},
    {"prompt": "a b", "max_new_tokens": 1},
    {"do_sample": True, "seed": 3, "top_p": 0.9},
]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (30 + 7 * i, 41 + 5 * i, 3), dtype=np.uint8) for i in range(n)]


# A difference from the request alone is forgiven only at a step whose own two best logits lie within this fraction
# of the logit range. Its two sides, measured by test_the_near_tie_bound_sits_between_noise_and_a_real_error: a row
# in a left-padded batch against the row alone (rounding) differs by 0 (tiny OPT) and 2.1e-7 (tiny T5) of the range;
# another image's row in its place (a real error) by a median of 1.7e-4 (OPT) and 1.2e-3 (T5).
NEAR_TIE = 1e-5


def _near_tie(pipe, image, request, alone, got) -> bool:
    """Whether the first token where `got` leaves `alone` was a near-tie of the request's own logits (greedy)."""
    t = next(i for i, (a, b) in enumerate(zip(alone + [None], got + [None])) if a != b)
    if request.get("do_sample") or request.get("num_beams", 1) > 1 or t >= len(alone):
        return False
    logits = pipe.score([image], [alone[: t + 1]], prompt=request.get("prompt"))[0][t]
    top = np.sort(logits)[-2:]
    return bool(top[1] - top[0] <= NEAR_TIE * (logits.max() - logits.min()))


@pytest.mark.parametrize("variant", ["tiny", "t5"])
def test_the_near_tie_bound_sits_between_noise_and_a_real_error(make_engine, variant):
    pipe = Blip2Pipeline.from_dir(make_engine(variant)[1])
    images = _images(2, seed=3)
    tokens = [pipe.generate_ids([im], max_new_tokens=10, min_new_tokens=10)[0] for im in images]
    alone = pipe.score([images[0]], [tokens[0]], prompt="a photo of")[0]
    padded = pipe.score(images, tokens, prompt=["a photo of", "Question: what is in the picture here? Answer:"])[0]
    wrong_row = pipe.score([images[1]], [tokens[0]], prompt="a photo of")[0]
    span = alone.max(-1) - alone.min(-1)
    noise = float((np.abs(padded - alone).max(-1) / span).max())
    error = float(np.median(np.abs(wrong_row - alone).max(-1) / span))
    assert 5 * noise <= NEAR_TIE <= error / 5, (noise, error)


@pytest.mark.parametrize("variant", ["tiny", "t5"])
def test_interleaved_arrivals_get_what_each_gets_alone(make_engine, variant):
    pipe = Blip2Pipeline.from_dir(make_engine(variant)[1])
    images = _images(len(REQUESTS))
    alone = [pipe.generate_ids([im], **r)[0] for im, r in zip(images, REQUESTS)]
    engine = GenerationEngine(pipe)
    handles, arrivals, step, most_rows, joined = [], list(range(len(REQUESTS))), 0, 0, 0
    while True:
        # arrivals at uneven steps: 2 at once, then none, then one, ...: they join a batch mid-generation
        for _ in range(min(len(arrivals), {0: 2, 1: 0}.get(step % 3, 1))):
            i = arrivals.pop(0)
            joined += bool(engine.groups)  # (a batch was running when it came)
            handles.append((i, engine.submit(images[i], **REQUESTS[i])))
        busy = engine.step()
        step += 1
        most_rows = max(most_rows, engine.running_rows)
        assert len(engine.groups) <= 1  # (rows of every length share one decoder call)
        if not busy and not arrivals:
            break
    assert joined >= len(REQUESTS) // 2  # (the case is real: most requests joined a running batch)
    assert most_rows <= pipe.manifest.limits.max_batch
    differ = [i for i, h in handles if h.tokens != alone[i]]
    assert all(h.done and h.error is None for _, h in handles)
    ties = [i for i in differ if _near_tie(pipe, images[i], REQUESTS[i], alone[i], dict(handles)[i].tokens)]
    assert differ == ties, f"requests {differ} differ from their answers alone ({len(ties)} at a near-tie)"
    assert len(ties) <= 1
    for i, h in handles:
        assert h.text == pipe.llm.tokenizer.decode(h.tokens)


def test_question_aware_requests_and_captions_share_a_batch(make_engine):
    pipe = Blip2Pipeline.from_dir(make_engine("t5")[1])
    images = _images(4, seed=2)
    asks = [{"qformer_text": "what colour"}, {}, {"qformer_text": "how many", "prompt": "Question: how many?"}, {}]
    alone = [pipe.generate_ids([im], **a, max_new_tokens=8)[0] for im, a in zip(images, asks)]
    engine = GenerationEngine(pipe)
    handles = [engine.submit(im, **a, max_new_tokens=8) for im, a in zip(images, asks)]
    engine.run()
    assert [h.tokens for h in handles] == alone


def test_rows_are_bounded_and_leave_when_their_request_ends(pipeline):
    engine = GenerationEngine(pipeline)
    limit = pipeline.manifest.limits.max_batch
    images = _images(3)
    short = engine.submit(images[0], max_new_tokens=3)  # (1 token at admission, 1 a step)
    long = engine.submit(images[1], max_new_tokens=12, min_new_tokens=12)
    wide = engine.submit(images[2], num_beams=limit, max_new_tokens=4)  # needs every row: waits for them
    engine.step()
    assert engine.running_rows == 2 and engine.queue_depth == 1  # (first come, first served: the wide one waits)
    engine.step()
    assert short.done and engine.running_rows == 1  # the short request left at its last step
    while not long.done:
        assert not wide.tokens and engine.running_rows <= limit
        engine.step()
    engine.run()
    assert wide.done and len(wide.tokens) <= 4
    assert wide.tokens == pipeline.generate_ids([images[2]], num_beams=limit, max_new_tokens=4)[0]
    assert engine.running_rows == 0 and not engine.groups


def test_the_cache_is_as_long_as_its_longest_row(pipeline):
    """Rows that come and go: the running cache never holds more positions than its longest running row needs
    (finished rows' positions are dropped), however long the batch has run."""
    engine = GenerationEngine(pipeline)
    images = _images(12, seed=4)
    handles = []
    for i in range(40):
        if i % 3 == 0 and len(handles) < len(images):
            handles.append(engine.submit(images[len(handles)], max_new_tokens=4 + len(handles) % 5,
                                         min_new_tokens=4 + len(handles) % 5))
        engine.step()
        for group in engine.groups:
            longest = int(group.decoder.attention_mask.sum(1).max())
            assert group.decoder.attention_mask.shape[1] == longest
            assert group.decoder.cache.length == longest
    engine.run()
    assert all(h.done for h in handles)


def test_a_second_question_about_an_image_skips_the_vision_graph(pipeline):
    """The image cache: the soft prompt of an image seen before is reused (the vision graph and the Q-Former do not
    run again) and gives the answer it gives alone; the cache stays within its bytes, least recently used out."""
    one = pipeline.llm.soft_prompt(pipeline.encoder.pixels(_images(1)))[0].nbytes
    engine = GenerationEngine(pipeline, image_cache_bytes=2 * one)
    runs = []
    vision = pipeline.runners["vision"]
    real = vision.run
    vision.run = lambda feeds, keep=(): runs.append(len(feeds["pixel_values"])) or real(feeds, keep)
    try:
        a, b, c = _images(3, seed=6)
        prompts = [None, "Question: what is it? Answer:", "a photo of"]
        first = engine.submit(a, max_new_tokens=5)
        engine.run()
        again = [engine.submit(a, prompt=p, max_new_tokens=5) for p in prompts[1:]]
        engine.run()
        assert runs == [1] and (engine.cache.hits, engine.cache.misses) == (2, 1)
        for image in (b, c, a):  # a third image pushes out the least recently used one (a)
            engine.submit(image, max_new_tokens=2)
            engine.run()
        assert runs == [1, 1, 1, 1] and engine.cache.bytes <= 2 * one
    finally:
        vision.run = real
    for h, p in zip([first, *again], prompts):
        assert h.tokens == pipeline.generate_ids([a], prompt=p, max_new_tokens=5)[0]


def test_a_cancelled_request_frees_its_rows(pipeline):
    engine = GenerationEngine(pipeline)
    a, b = (engine.submit(im, max_new_tokens=20, min_new_tokens=20) for im in _images(2))
    engine.step()
    engine.step()
    a.cancel()
    engine.step()
    assert a.done and engine.running_rows == 1
    engine.run()
    assert len(b.tokens) == 20


def test_a_failing_step_ends_its_requests_with_the_error_and_the_engine_goes_on(pipeline, monkeypatch):
    import threading

    engine = GenerationEngine(pipeline)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        broken = RuntimeError("a graph failed")
        monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(broken))
        failed = engine.submit(_images(1)[0], max_new_tokens=3)
        assert failed.wait(30) and failed.error is broken
        monkeypatch.undo()
        fine = engine.submit(_images(1)[0], max_new_tokens=3, min_new_tokens=3)
        assert fine.wait(30) and fine.error is None and len(fine.tokens) == 3
    finally:
        engine.stop(stop)
        thread.join(10)
    assert not thread.is_alive()


def test_bad_requests_are_refused_at_submit(pipeline):
    engine = GenerationEngine(pipeline)
    limit = pipeline.manifest.limits
    for bad in ({"max_new_tokens": limit.max_new_tokens + 1}, {"num_beams": limit.max_batch + 1},
                {"temperature": -1, "do_sample": True}, {"colour": "red"}):
        with pytest.raises(PromptError):
            engine.submit(_images(1)[0], **bad)
    with pytest.raises(PromptError, match="empty"):
        engine.submit(_images(1)[0], prompt="  ")
    assert engine.queue_depth == 0 and not engine.step()


@pytest.mark.parametrize("options", [{}, {"prompt": "a photo of", "max_new_tokens": 9},
                                     {"do_sample": True, "seed": 5}, {"num_beams": 2}])
def test_a_stream_concatenates_to_the_generated_text(pipeline, options):
    image = _images(1, seed=9)[0]
    pieces = list(pipeline.stream(image, **options))
    assert "".join(pieces) == pipeline.generate([image], **options)[0]
    if options.get("num_beams", 1) == 1 and len(pipeline.generate_ids([image], **options)[0]) > 3:
        assert len(pieces) > 1  # (it streamed: more than the whole text at the end)


def _byte_level_tokenizer(tmp_path):
    """A byte-level BPE (OPT's kind) trained on text with multi-byte characters: its tokens split them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["a cat on a mat", "un café très noir", "日本語のテキスト", "emoji 🐈‍⬛ and 🎉 here"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                       .alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return LlmTokenizer(path)


def test_stream_pieces_never_split_a_character(tmp_path):
    """A piece never shows half a character: the pieces concatenate to the final text (a split character shown as
    U+FFFD would not), for natural text and for ids that end in stray bytes."""
    tokenizer = _byte_level_tokenizer(tmp_path)
    assert any(len(tokenizer.tokenizer.encode(c).ids) > 1 for c in "日🐈🎉")  # (the case is real)
    rng = np.random.default_rng(0)
    for text in ["  un café 日本語 🐈‍⬛ 🎉 ", "日本語のテキスト", "a cat 🎉", "🎉"]:
        natural = tokenizer.tokenizer.encode(text).ids
        for ids in (natural, natural + [int(i) for i in rng.integers(0, 300, 3)]):
            stream, pieces = TextStream(tokenizer), []
            for n in range(1, len(ids) + 1):
                pieces.append(stream.push(ids[:n]))
            pieces.append(stream.finish(ids))
            assert "".join(pieces) == tokenizer.decode(ids)
            if ids is natural:
                assert "".join(pieces) == text.strip() and not any("\ufffd" in p for p in pieces)
