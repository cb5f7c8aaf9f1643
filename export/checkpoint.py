"""Load a Hugging Face BLIP-2 checkpoint folder (ours or a real one saved with `save_pretrained`).

    from export.checkpoint import load_checkpoint
    ck = load_checkpoint("checkpoints/demo")
    ck.model, ck.tokenizer, ck.image_processor_config, ck.prompt_prefix_ids

The model is loaded in float32 with eager attention (the dynamo exporter cannot
trace SDPA's `is_causal` flag in the KV-cached decoder step).
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """The folder is not a usable BLIP-2 checkpoint; the message says what to fix."""


@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module
    tokenizer: object  # transformers tokenizer (fast)
    image_processor: dict  # Hugging Face image processor settings
    prompt_prefix_ids: list[int]

    @property
    def config(self):
        return self.model.config


def _image_processor_dict(path: Path) -> dict:
    """preprocessor_config.json (transformers 4.x) or the image_processor entry of processor_config.json (5.x)."""
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        return json.loads(pre.read_text())
    proc = path / "processor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text())
        if "image_processor" in data:
            return data["image_processor"]
    raise CheckpointError(
        f"{path} has no image processor settings (preprocessor_config.json, or processor_config.json with an "
        f"'image_processor' entry); save the Blip2Processor beside the model with processor.save_pretrained({str(path)!r})"
    )


def _prompt_prefix(tokenizer) -> list[int]:
    """Ids the Hugging Face tokenizer puts before every prompt (OPT: BOS), found by comparing with the raw tokenizer."""
    probe = "a photo of"
    full = tokenizer(probe).input_ids
    raw = tokenizer(probe, add_special_tokens=False).input_ids
    if full[len(full) - len(raw):] != raw:
        raise CheckpointError(f"the tokenizer adds special tokens after the prompt ({full} vs {raw}); not supported")
    return list(full[: len(full) - len(raw)])


def load_checkpoint(path) -> Checkpoint:
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}; pass --model a folder written by save_pretrained "
                              f"(make the demo one with `python -m train.demo --out {path}`)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face save_pretrained folder")
    config = Blip2Config.from_pretrained(path)
    if config.model_type != "blip-2":
        raise CheckpointError(f"{path} holds a {config.model_type!r} model; blip2-edge exports BLIP-2 (model_type 'blip-2')")
    if config.text_config.model_type != "opt":
        raise CheckpointError(
            f"{path} uses a {config.text_config.model_type!r} language model; blip2-edge exports OPT decoders "
            f"(BLIP-2 OPT checkpoints such as Salesforce/blip2-opt-2.7b)"
        )
    if config.image_token_index is None:
        raise CheckpointError(
            f"{path}/config.json has no image_token_index: transformers 5 places the query outputs at these "
            f"placeholder ids; set \"image_token_index\" to the id of the tokenizer's <image> token"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"could not load the tokenizer from {path} ({e}); save it with "
                              f"tokenizer.save_pretrained({str(path)!r})") from None
    image_processor = _image_processor_dict(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    if model.config.image_token_index >= model.config.text_config.vocab_size:
        raise CheckpointError(f"image_token_index {config.image_token_index} is outside the decoder's vocabulary "
                              f"({config.text_config.vocab_size}); resize the embeddings or fix config.json")
    if config.text_config.hidden_size != config.text_config.word_embed_proj_dim:
        log.warning(
            "language_projection outputs %d values per query but OPT's word embeddings are %d wide "
            "(word_embed_proj_dim): Hugging Face's masked_scatter streams the flattened projection into the "
            "narrower embeddings, mixing images across a batch; the export reproduces that exactly",
            config.text_config.hidden_size, config.text_config.word_embed_proj_dim,
        )
    return Checkpoint(path, model, tokenizer, image_processor, _prompt_prefix(tokenizer))


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json and every weights file, in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
