"""The parity gate does not share the runtime's assumptions: a runtime that builds the wrong caption layout,
embeds a generated placeholder wrongly, or answers single images differently from a batch fails the build,
and no engine folder is written. (Each mistake is put into the runtime here, and only there.)"""
import numpy as np
import pytest

from export.build import BuildError, build
from export.parity import END_TO_END, fp32_agreement, token_agreement
from runtime.decoder import LlmDecoder, Seq2SeqDecoder
from runtime.manifest import load_manifest
from runtime.prompt import PromptLayout


def _build_fails(checkpoint, tmp_path, case: str) -> None:
    with pytest.raises(BuildError, match=case):
        build(checkpoint, "onnx", tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_gate_catches_a_caption_layout_without_bos(make_engine, monkeypatch, tmp_path):
    """The layout the runtime had: placeholders + tokenizer('') (empty for a tokenizer that adds no BOS)."""
    ck_dir, _ = make_engine("nobos")
    monkeypatch.setattr(PromptLayout, "row", lambda self, ids: [self.image_token_id] * self.num_queries
                        + list(self.prefix_ids) + list(ids or []))
    _build_fails(ck_dir, tmp_path, "'caption'")


@pytest.mark.parametrize("variant", ["tiny", "t5-trained"])
def test_gate_catches_a_wrongly_embedded_generated_placeholder(make_engine, monkeypatch, tmp_path, variant):
    """A decode step fed the placeholder id that embeds something else (the runtime put zeros there), also on a
    Flan-T5 with trained-like activations, whose fp32 bound is ~1e3x looser than a random tiny model's."""
    ck_dir, engine = make_engine(variant)
    image_id = load_manifest(engine).llm.image_token_id
    decoder = Seq2SeqDecoder if variant.startswith("t5") else LlmDecoder
    step = decoder.step

    def wrong_step(self, tokens):
        return step(self, np.where(tokens == image_id, 1, tokens))  # another id's embedding instead

    monkeypatch.setattr(decoder, "step", wrong_step)
    _build_fails(ck_dir, tmp_path, "placeholder_step")


def test_gate_runs_every_image_alone(make_engine, monkeypatch, tmp_path):
    """A runtime right on batches but wrong on a single image (here: its first step's logits reversed)."""
    ck_dir, _ = make_engine("tiny")
    prefill = LlmDecoder.prefill

    def single_images_wrong(self, input_ids, attention_mask, soft_prompt):
        logits = prefill(self, input_ids, attention_mask, soft_prompt)
        return -logits if input_ids.shape[0] == 1 else logits

    monkeypatch.setattr(LlmDecoder, "prefill", single_images_wrong)
    _build_fails(ck_dir, tmp_path, "'caption'")


def test_a_near_tie_counts_only_within_the_precisions_tie():
    """Teacher-forced agreement of a reduced precision: a different pick agrees only where the reference scored it
    within `logit_tie` standard deviations of its own pick; a clearly worse pick is a miss at every precision."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    ref = [int(row.argmax()) for row in logits]
    std = logits[0].std()
    near, far = 7, 8
    logits[0, near] = logits[0, ref[0]] - 0.05 * std  # a near-tie at position 0
    logits[0, far] = logits[0, ref[0]] - 2.0 * std
    got_near, got_far = [[near] + ref[1:]], [[far] + ref[1:]]
    assert token_agreement(got_near, [ref]) == pytest.approx(2 / 3)  # exact agreement: a miss
    assert token_agreement(got_near, [ref], [logits], END_TO_END["int8"].logit_tie) == 1.0
    assert token_agreement(got_near, [ref], [logits], END_TO_END["fp16"].logit_tie) == pytest.approx(2 / 3)
    for precision in ("fp16", "int8", "int4"):
        assert token_agreement(got_far, [ref], [logits], END_TO_END[precision].logit_tie) == pytest.approx(2 / 3)


def test_a_reduced_gate_still_catches_a_wrong_pipeline(make_engine, monkeypatch, tmp_path):
    """Near-ties forgive rounding, not mistakes: an int8 runtime whose decode steps are wrong on single images (their
    logits reversed; teacher-forced, the prefill's one position would not show) fails the int8 gate."""
    ck_dir, _ = make_engine("tiny")
    step = LlmDecoder.step

    def single_images_wrong(self, tokens):
        logits = step(self, tokens)
        return -logits if tokens.shape[0] == 1 else logits

    monkeypatch.setattr(LlmDecoder, "step", single_images_wrong)
    with pytest.raises(BuildError, match="'caption'"):
        build(ck_dir, "onnx-int8", tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_fp32_near_ties_are_those_of_the_float64_reference():
    """At fp32 a different token agrees only where the float64 logits of the two are within 10x Hugging Face's own
    float32 error at that position; a free-running row is compared up to there. A clearly worse pick is a miss."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    ref = [int(row.argmax()) for row in logits]
    noise = [np.full(3, 1e-3)]
    near, far = 7, 8
    logits[0, near] = logits[0, ref[0]] - 5e-3  # within 10 x 1e-3
    logits[0, far] = logits[0, ref[0]] - 5e-2
    assert fp32_agreement([[near, 0, 0]], [ref], [logits], noise, 10.0, True) == (1.0, 1, [0])
    assert fp32_agreement([[near] + ref[1:]], [ref], [logits], noise, 10.0, False) == (1.0, 1, [3])
    assert fp32_agreement([[far] + ref[1:]], [ref], [logits], noise, 10.0, True)[0] == pytest.approx(2 / 3)
    assert fp32_agreement([[near] + ref[1:]], [ref], [logits], [np.full(3, 1e-4)], 10.0, True)[0] == \
        pytest.approx(2 / 3)  # the same pick where the reference's float32 is 10x more precise: a miss
