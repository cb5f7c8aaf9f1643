"""Make a randomly initialised BLIP-2 checkpoint folder from a preset (the embedded demo model until
`train/` ships a trained one).

    python -m train.demo --out checkpoints/demo              # tiny preset, seed 0
    python -m train.demo --preset small --out checkpoints/small

The folder is a regular Hugging Face `save_pretrained` folder (config.json,
model.safetensors, tokenizer files, preprocessor_config.json), loadable with
`Blip2ForConditionalGeneration.from_pretrained`, and is written atomically.
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from train.presets import PRESETS, blip2_config
from train.text_tokenizer import IMAGE_TOKEN, build_tokenizer


def make_random_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Build tokenizer + model from `preset` (keyword overrides allowed) and save both to `out`."""
    out = Path(out)
    vocab = overrides.pop("vocab_size", PRESETS[preset].vocab_size)
    tokenizer = build_tokenizer(min(vocab, 512))
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = blip2_config(preset, vocab_size=max(vocab, len(tokenizer)), image_token_index=image_token, **overrides)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    size = config.vision_config.image_size
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        num_query_tokens=config.num_query_tokens,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/demo", help="folder to write (replaced if it exists)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_random_checkpoint(args.out, args.preset, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
