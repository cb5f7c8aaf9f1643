"""Does a checkpoint's frozen LLM read its context back? The check behind the demo's LLM pre-training.

    python -m train.shapescaps.reading --model models/demo            # n=200 held-out scenes
    python -m train.shapescaps.reading --model checkpoints/demo --n 50

Stage 2 only works if the frozen LLM re-says what comes before it: the soft prompt takes the place of
that context. Here the context is plain text, laid out as stage 2 lays out the soft prompt (OPT: caption,
BOS, "a picture of" ...; T5: the caption in the encoder, the decoder generating): for every held-out
caption the LLM continues greedily and the continuation is scored with `caption_correct`, per number of
shapes. Also printed: the cosine between the input
embeddings of interchangeable words (shapes, sizes, sides); near 1 means the LLM cannot tell them apart
(what tied embeddings did to the demo's OPT before they were untied).
"""
import argparse
import itertools
from collections import Counter

import torch
import torch.nn.functional as F

from train.shapescaps.synthetic import SHAPES, SIZES, ShapesCaps, caption_correct

GROUPS = {"shapes": list(SHAPES), "sizes": list(SIZES), "sides": ["left", "right"]}
LEAD = "a picture of"  # the continuation starts as a caption, not as a question


def _continue_opt(language_model, tokenizer, caption: str) -> str:
    """OPT: caption, BOS, the lead; what it generates after them."""
    ids = tokenizer(caption, add_special_tokens=False).input_ids + [tokenizer.bos_token_id]
    ids += tokenizer(LEAD, add_special_tokens=False).input_ids
    out = language_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LEAD + tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _continue_t5(language_model, tokenizer, caption: str) -> str:
    """T5: the caption in the encoder; what the decoder generates."""
    out = language_model.generate(input_ids=torch.tensor([tokenizer(caption).input_ids]), max_new_tokens=20,
                                  do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


CONTINUE = {"opt": _continue_opt, "t5": _continue_t5}  # per LLM family (text_config.model_type)


@torch.no_grad()
def paraphrase_accuracy(language_model, tokenizer, n: int = 200, image_size: int = 64) -> dict:
    """{number of shapes: fraction of continuations that describe the scene} over every caption of n val scenes."""
    continue_ = CONTINUE[language_model.config.model_type]
    ok, total = Counter(), Counter()
    for sample in ShapesCaps("val", n=n, image_size=image_size, seed=0):
        for caption in sample.captions:
            total[len(sample.shapes)] += 1
            ok[len(sample.shapes)] += caption_correct(continue_(language_model, tokenizer, caption), sample)
    return {k: ok[k] / total[k] for k in sorted(total)}


def embedding_cosines(language_model, tokenizer) -> dict:
    """{group: largest cosine between the input embeddings of two of its words}."""
    weight = language_model.get_input_embeddings().weight.detach()
    out = {}
    for name, words in GROUPS.items():
        vectors = [weight[tokenizer(" " + w, add_special_tokens=False).input_ids[0]] for w in words]
        out[name] = max(float(F.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2))
    return out


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from train.blip2.model import Blip2Edge

    ap = argparse.ArgumentParser(prog="python -m train.shapescaps.reading", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="stage-2 checkpoint folder (with an LLM)")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes (default 200)")
    args = ap.parse_args(argv)
    model = Blip2Edge.from_pretrained(args.model).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for shapes, acc in paraphrase_accuracy(model.language_model, tokenizer, args.n,
                                           model.config.vision_config.image_size).items():
        print(f"re-said from a text context, {shapes}-shape scenes: {acc:.3f}")
    for group, cos in embedding_cosines(model.language_model, tokenizer).items():
        print(f"largest input-embedding cosine among {group}: {cos:.3f}")


if __name__ == "__main__":
    main()
