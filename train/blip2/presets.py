"""Model size presets: Blip2Config objects built from a handful of numbers.

No pretrained weights can be downloaded in our environments, so tests, the
benchmark and the demo build models from these presets.

    >>> from train.blip2.presets import blip2_config
    >>> cfg = blip2_config("tiny", vocab_size=300)
    >>> cfg.num_query_tokens
    4

Any knob of the preset can be overridden by keyword (see `Preset`), so the
tests can cover configurations unlike the defaults: OPT with
`word_embed_proj_dim != hidden_size` (project_in/out, as OPT-350m),
post-layernorm OPT (`do_layer_norm_before=False`), an untied LM head, other
image and patch sizes and numbers of queries.

The LLM is OPT (`llm="opt"`, decoder-only) or T5 (`llm="t5"`, encoder-decoder): Flan-T5's layout by
default (gated-GELU FFN, untied LM head, as Salesforce/blip2-flan-t5-xl/-xxl), or the original T5's with
`t5_ffn="relu", tie_word_embeddings=True` (ReLU FFN, tied embeddings, LM head input scaled by d_model**-0.5).
"""
from dataclasses import dataclass, replace

from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

# Special token ids follow OPT's tokenizer: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3.
BOS_ID, PAD_ID, EOS_ID = 2, 1, 2
# ... and T5's: <pad>=0 (also the decoder's start), </s>=1 (EOS; BLIP-2's T5 configs set bos_token_id=1 too, so a
# caption's encoder input ends with it), <unk>=2.
T5_PAD_ID, T5_EOS_ID = 0, 1


@dataclass(frozen=True)
class Preset:
    # vision transformer
    vision_init_std: float = 0.02  # HF's BLIP-2 default (1e-10) makes a random ViT output ~1e-6: nothing to test
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int | None = None  # None: 4 * vision_width (ViT-g's is 6144 for width 1408)
    # Q-Former
    num_query_tokens: int = 4
    qformer_width: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_vocab_size: int = 128
    cross_attention_frequency: int = 1
    qformer_max_positions: int | None = None  # None: max_positions
    # the LLM: "opt" (decoder-only) or "t5" (encoder-decoder); the widths below serve both
    llm: str = "opt"
    vocab_size: int = 128
    llm_width: int = 32
    word_embed_proj_dim: int | None = None  # None: same as llm_width
    llm_layers: int = 2
    llm_heads: int = 4
    llm_ffn: int | None = None  # None: 4 * llm_width (Flan-T5-XL's is 5120 for width 2048)
    max_positions: int = 128
    do_layer_norm_before: bool = True
    tie_word_embeddings: bool = True
    image_token_index: int | None = None  # None: the last id of the vocabulary
    t5_ffn: str = "gated-gelu"  # T5's feed_forward_proj: "gated-gelu" (Flan-T5) or "relu" (original T5)
    d_kv: int | None = None  # T5's per-head width; None: llm_width // llm_heads
    itc_dim: int = 256  # width of the normalised ITC features (image_text_hidden_size)
    dropout: float = 0.1  # Q-Former and OPT dropout


PRESETS = {
    # a few hundred thousand parameters: unit and parity tests
    "tiny": Preset(),
    # the same with an encoder-decoder LLM: Flan-T5's layout, a head width other than width / heads
    "tiny-t5": Preset(llm="t5", d_kv=6, tie_word_embeddings=False),
    # Salesforce/blip2-opt-2.7b's published architecture (3.8B parameters): ViT-g/14 at 224 px (39 layers, width
    # 1408, MLP 6144, 16 heads), the Q-Former (12 layers of width 768, cross-attention every 2nd, 32 queries) and
    # OPT-2.7B (32 layers, width 2560, 32 heads, FFN 10240, vocabulary 50272, 2048 positions; tied embeddings).
    # With random weights (`python -m train.blip2.random_checkpoint --preset blip2-opt-2.7b --dtype float16`) it shows
    # that a build fits the size users deploy; `--vision-layers 2 --qformer-layers 2 --llm-layers 6` keeps the widths
    # (677M).
    "blip2-opt-2.7b": Preset(
        image_size=224, patch_size=14, vision_width=1408, vision_layers=39, vision_heads=16, vision_mlp=6144,
        num_query_tokens=32, qformer_width=768, qformer_layers=12, qformer_heads=12,
        qformer_vocab_size=30522, cross_attention_frequency=2, qformer_max_positions=512, itc_dim=256,
        vocab_size=50272, llm_width=2560, llm_layers=32, llm_heads=32, max_positions=2048, dropout=0.0,
    ),
    # Salesforce/blip2-opt-6.7b's (7.75B parameters): the same ViT-g and Q-Former, OPT-6.7B (32 layers, width 4096,
    # 32 heads, FFN 16384, vocabulary 50272, 2048 positions; tied embeddings), whose trained activations have the
    # outlier features of OPT from 6.7B on; `--vision-layers 2 --qformer-layers 2 --llm-layers 2` keeps the widths
    "blip2-opt-6.7b": Preset(
        image_size=224, patch_size=14, vision_width=1408, vision_layers=39, vision_heads=16, vision_mlp=6144,
        num_query_tokens=32, qformer_width=768, qformer_layers=12, qformer_heads=12,
        qformer_vocab_size=30522, cross_attention_frequency=2, qformer_max_positions=512, itc_dim=256,
        vocab_size=50272, llm_width=4096, llm_layers=32, llm_heads=32, max_positions=2048, dropout=0.0,
    ),
    # Salesforce/blip2-flan-t5-xl's (3.94B parameters): the same ViT-g and Q-Former, Flan-T5-XL (24 encoder and 24
    # decoder layers, d_model 2048, 32 heads of d_kv 64, gated-GELU FFN 5120, vocabulary 32128, untied head)
    "blip2-flan-t5-xl": Preset(
        image_size=224, patch_size=14, vision_width=1408, vision_layers=39, vision_heads=16, vision_mlp=6144,
        num_query_tokens=32, qformer_width=768, qformer_layers=12, qformer_heads=12,
        qformer_vocab_size=30522, cross_attention_frequency=2, qformer_max_positions=512, itc_dim=256,
        llm="t5", vocab_size=32128, llm_width=2048, llm_layers=24, llm_heads=32, d_kv=64, llm_ffn=5120,
        max_positions=512, tie_word_embeddings=False, dropout=0.0,
    ),
    # about 30M parameters: the benchmark's "small" model (ViT 224/16 4x256, Q-Former 4 layers 32 queries, OPT 6x512)
    "small": Preset(
        image_size=224, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
        num_query_tokens=32, qformer_width=256, qformer_layers=4, qformer_heads=4, qformer_vocab_size=1024,
        cross_attention_frequency=2,
        vocab_size=4096, llm_width=512, llm_layers=6, llm_heads=8, max_positions=512,
    ),
    # the same with a Flan-T5-style LLM of the same width: 6 encoder and 6 decoder layers
    "small-t5": Preset(
        image_size=224, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
        num_query_tokens=32, qformer_width=256, qformer_layers=4, qformer_heads=4, qformer_vocab_size=1024,
        cross_attention_frequency=2, llm="t5", tie_word_embeddings=False,
        vocab_size=4096, llm_width=512, llm_layers=6, llm_heads=8, max_positions=512,
    ),
    # the demo model trained on ShapesCaps by `python -m train demo` (about 2M parameters, 64x64 images)
    "demo": Preset(
        image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
        num_query_tokens=16, qformer_width=128, qformer_layers=2, qformer_heads=4, qformer_vocab_size=512,
        vocab_size=512, llm_width=128, llm_layers=3, llm_heads=4, max_positions=96, itc_dim=64, dropout=0.0,
        # 16 queries, not 8: with 8 the soft prompt carried which shape is where (the Q-Former's ITM told a
        # pair's caption from its mirror 0.99 of the time) but OPT read it back for 2-shape captions 0.62 right
        # tied, the input embeddings of interchangeable words (circle/square/triangle, small/large) collapsed
        # onto one vector (cosine 0.98-0.99) through the LM head's symmetric gradients: OPT could not tell
        # them apart in its context and re-said lone-shape captions 0.33 right (`python -m train.shapescaps.reading`)
        tie_word_embeddings=False,
    ),
    # the demo with a Flan-T5-style LLM (gated-GELU FFN, untied LM head, relative positions): same vision tower,
    # Q-Former and widths, 3 encoder and 3 decoder layers (`python -m train demo --preset demo-t5`)
    "demo-t5": Preset(
        image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
        num_query_tokens=16, qformer_width=128, qformer_layers=2, qformer_heads=4, qformer_vocab_size=512,
        llm="t5", vocab_size=512, llm_width=128, llm_layers=3, llm_heads=4, max_positions=96, itc_dim=64, dropout=0.0,
        tie_word_embeddings=False,
    ),
}


def image_tokens(vision_config) -> int:
    """Tokens the vision tower puts out per image (what the Q-Former's cross-attention reads): one per patch, plus
    the class token."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def blip2_config(preset: str | Preset = "tiny", **overrides) -> Blip2Config:
    """Build a Blip2Config from a preset name (or Preset) with keyword overrides."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    p = replace(preset, **overrides)
    vision = Blip2VisionConfig(
        hidden_size=p.vision_width, intermediate_size=p.vision_mlp or 4 * p.vision_width,
        num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads, image_size=p.image_size,
        patch_size=p.patch_size, initializer_range=p.vision_init_std,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=p.qformer_width, intermediate_size=4 * p.qformer_width, num_hidden_layers=p.qformer_layers,
        num_attention_heads=p.qformer_heads, encoder_hidden_size=p.vision_width, vocab_size=p.qformer_vocab_size,
        cross_attention_frequency=p.cross_attention_frequency,
        max_position_embeddings=p.qformer_max_positions or p.max_positions,
        hidden_dropout_prob=p.dropout, attention_probs_dropout_prob=p.dropout,
    )
    text = (t5_config if p.llm == "t5" else opt_config)(p)
    image_token = p.image_token_index if p.image_token_index is not None else p.vocab_size - 1
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=p.num_query_tokens, image_token_index=image_token, image_text_hidden_size=p.itc_dim,
    )


def opt_config(p: Preset) -> OPTConfig:
    return OPTConfig(
        vocab_size=p.vocab_size, hidden_size=p.llm_width, word_embed_proj_dim=p.word_embed_proj_dim or p.llm_width,
        num_hidden_layers=p.llm_layers, ffn_dim=p.llm_ffn or 4 * p.llm_width, num_attention_heads=p.llm_heads,
        max_position_embeddings=p.max_positions, do_layer_norm_before=p.do_layer_norm_before,
        tie_word_embeddings=p.tie_word_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        dropout=p.dropout, attention_dropout=p.dropout,
    )


def t5_config(p: Preset) -> T5Config:
    """T5 as BLIP-2's conversion writes it: BOS = EOS = </s> (a caption's encoder input ends with it), exact GELU
    in the gated FFN; untied (and unscaled) LM head unless tie_word_embeddings."""
    return T5Config(
        vocab_size=p.vocab_size, d_model=p.llm_width, d_kv=p.d_kv or p.llm_width // p.llm_heads,
        d_ff=p.llm_ffn or 4 * p.llm_width, num_layers=p.llm_layers, num_heads=p.llm_heads, feed_forward_proj=p.t5_ffn,
        dense_act_fn="gelu" if p.t5_ffn.endswith("gelu") else p.t5_ffn.split("-")[-1],
        tie_word_embeddings=p.tie_word_embeddings, dropout_rate=p.dropout, pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID, bos_token_id=T5_EOS_ID, decoder_start_token_id=T5_PAD_ID,
    )
