"""Small tokenizers trained here because none can be downloaded: OPT-style and T5-style byte-level BPE for the
LLM, a BERT-style WordPiece for the Q-Former.

They follow their models' conventions so that real checkpoints and ours share one path. OPT: <s>=0, <pad>=1,
</s>=2 (BOS and EOS, prepended to every prompt), <unk>=3; T5: <pad>=0, </s>=1 (appended to every text),
<unk>=2; both end with an `<image>` placeholder token whose id is the model's `image_token_index`.

    python -c "from train.blip2.tokenizers import build_tokenizer; print(build_tokenizer(512))"
"""
import itertools
from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "cyan"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ellipse", "rectangle", "hexagon", "ring"]
PLACES = ["top", "bottom", "left", "right", "center", "middle", "corner", "upper", "lower"]
SIZES = ["small", "large", "big", "tiny", "medium", "huge"]
TEMPLATES = [
    "a {s} {c} {h} in the {p}", "a photo of a {c} {h}", "there is a {s} {c} {h} on the {p}",
    "Question: what color is the {h}? Answer: {c}", "Question: what shape is {c}? Answer: {h}",
    "Question: where is the {h}? Answer: {p}", "an image showing a {c} {h} and a {s} shape",
]


def default_corpus() -> list[str]:
    """Caption-like sentences covering the words of the synthetic shapes data set."""
    rows = []
    for t, (c, h, p, s) in itertools.product(TEMPLATES, zip(COLOURS * 3, SHAPES * 4, PLACES * 4, SIZES * 6)):
        rows.append(t.format(c=c, h=h, p=p, s=s))
    rows += COLOURS + SHAPES + PLACES + SIZES
    return rows


def _bpe(vocab_size: int, corpus: list[str] | None, specials: list[str]) -> Tokenizer:
    """A byte-level BPE of `vocab_size - 1` ids (the specials first), trained on `corpus`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer)
    return tok


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train an OPT-style byte-level BPE tokenizer of at most `vocab_size` ids (the last id is `<image>`). With
    add_bos=False it puts nothing before a text (like many LLM tokenizers other than OPT's)."""
    tok = _bpe(vocab_size, corpus, SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                           special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's SentencePiece vocabulary


def build_t5_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a T5-style tokenizer (byte-level BPE here, SentencePiece in T5) of at most `vocab_size` ids: <pad>=0,
    </s>=1 appended to every text, <unk>=2, right padding (an encoder's input), `<image>` last."""
    tok = _bpe(vocab_size, corpus, T5_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def llm_tokenizer(llm: str, vocab_size: int, corpus: list[str] | None = None, **options) -> PreTrainedTokenizerFast:
    """The tokenizer of an LLM family ("opt" or "t5", as train.blip2.presets.Preset.llm)."""
    return {"opt": build_tokenizer, "t5": build_t5_tokenizer}[llm](vocab_size, corpus, **options)


QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # ids 0..5


def wordpiece_vocab(corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary that is a pure function of the corpus: the specials, every character alone and
    as a '##' continuation (so any word can be spelled), then whole words, most frequent first (ties in
    alphabetical order), up to `vocab_size`. The tokenizers library's WordPieceTrainer breaks ties between
    equally frequent merges differently in every process, so the same corpus gave different vocabularies
    and the demo recipe could not reproduce its own model."""
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = QFORMER_SPECIALS + chars + ["##" + c for c in chars]
    if vocab_size < len(vocab):
        raise ValueError(f"Q-Former vocab_size {vocab_size} is too small for this corpus: its {len(chars)} characters "
                         f"and their '##' forms need {len(vocab)} ids with the specials; raise qformer_vocab_size")
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[: vocab_size - len(vocab)]
    return {token: i for i, token in enumerate(vocab)}


def build_qformer_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece tokenizer for the Q-Former's text side, BERT-style like BLIP-2's own
    (bert-base-uncased plus [DEC]): `[CLS] text [SEP]` for ITC/ITM; ITG swaps [CLS] for [DEC].
    Its vocabulary is `wordpiece_vocab(corpus, vocab_size)`."""
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(corpus or default_corpus(), vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]", additional_special_tokens=["[DEC]"], padding_side="right",
    )
