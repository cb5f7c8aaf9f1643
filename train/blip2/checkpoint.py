"""Load a Hugging Face BLIP-2 checkpoint folder (ours or a real one saved with `save_pretrained`).

    from train.blip2.checkpoint import load_checkpoint
    ck = load_checkpoint("models/demo")
    ck.model            # train.blip2.model.Blip2Edge: every Q-Former mode, the LLM when there is one
    ck.hf               # the Hugging Face model sharing its weights (reference for generate / retrieval)
    ck.tokenizer, ck.qformer_tokenizer, ck.image_processor, ck.prompt_layout

Two kinds of folder load: stage 2 (`Blip2ForConditionalGeneration`: vision,
Q-Former, projection, OPT) and stage 1 (`Blip2ForImageTextRetrieval`: vision,
Q-Former with text side, ITC/ITM heads), each optionally with our extra heads
(blip2_edge.json + blip2_edge_heads.safetensors: the ITG head, the Q-Former's
text side kept for stage 2). The Q-Former tokenizer is the folder's tokenizer
for stage 1 and `qformer_tokenizer/` for stage 2 (InstructBLIP's layout).
The model is loaded in float32 with eager attention (the dynamo exporter cannot
trace SDPA's `is_causal` flag in the KV-cached decoder step).
"""
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.memory import return_freed_memory
from runtime.prompt import PromptLayout
from train.blip2.families import family


class CheckpointError(Exception):
    """The folder is not a usable BLIP-2 checkpoint; the message says what to fix."""


@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module  # train.blip2.model.Blip2Edge
    hf: torch.nn.Module  # Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval, same weights
    tokenizer: object | None  # the LLM's tokenizer (transformers fast tokenizer); None for stage 1
    qformer_tokenizer: object | None  # the Q-Former's tokenizer; None without the Q-Former text side
    image_processor: dict  # Hugging Face image processor settings
    prompt_prefix_ids: list[int]  # what the LLM's tokenizer puts before a text (OPT: BOS)
    prompt_suffix_ids: list[int]  # ... and after it (T5: </s>)

    def __post_init__(self):
        # what the rest of a build reads while the weights are released
        self.config, self.edge = self.model.config, self.model.edge
        self.has_llm = hasattr(self.model, "language_model")
        self.itc_temperature = float(self.model.temp.detach())

    def release_weights(self) -> None:
        """Drop the PyTorch model (and the Hugging Face one sharing its weights): a build holds PyTorch's copy of
        the weights or ONNX Runtime's, never both. `reload_weights` brings them back."""
        self.model = self.hf = None
        return_freed_memory()

    def reload_weights(self) -> None:
        if self.model is None:
            self.model = _load_model(self.path, self.qformer_tokenizer)
            self.hf = self.model.hf_model()

    @property
    def prompt_layout(self) -> PromptLayout:
        """The LLM input layout (runtime.prompt), from this checkpoint's config and tokenizer."""
        return prompt_layout(self.config, self.prompt_prefix_ids, self.prompt_suffix_ids)


def prompt_layout(config, prefix_ids, suffix_ids=()) -> PromptLayout:
    """The LLM input layout of a stage-2 Blip2Config whose tokenizer puts `prefix_ids` before a text and
    `suffix_ids` after it."""
    t = config.text_config
    return PromptLayout(config.num_query_tokens, config.image_token_index, t.bos_token_id, tuple(prefix_ids),
                        t.pad_token_id, tuple(suffix_ids), family(config).padding)


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
        "'image_processor' entry); save the Blip2Processor beside the model with "
        f"processor.save_pretrained({str(path)!r})"
    )


def prompt_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(ids the Hugging Face tokenizer puts before a text, ids it puts after it): OPT's ([BOS], []), T5's
    ([], [</s>]), found by comparing its output with and without special tokens."""
    probe = "a photo of"
    full = tokenizer(probe).input_ids
    raw = tokenizer(probe, add_special_tokens=False).input_ids
    for start in range(len(full) - len(raw) + 1):
        if full[start:start + len(raw)] == raw:
            return list(full[:start]), list(full[start + len(raw):])
    raise CheckpointError(f"the tokenizer changes a text's own ids when it adds its special tokens ({full} vs {raw}); "
                          f"blip2-edge needs a tokenizer that only adds ids before or after a text")


def load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"could not load the {what} tokenizer from {path} ({str(e)[:200]}); save it there with "
                              f"tokenizer.save_pretrained({str(path)!r})") from None


def check_llm(path: Path, config) -> None:
    """Refuse, before any work, a stage-2 config that no BLIP-2 engine can reproduce."""
    try:
        llm = family(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.image_token_index is None:
        raise CheckpointError(
            f"{path}/config.json has no image_token_index: transformers 5 places the query outputs at these "
            f"placeholder ids; set \"image_token_index\" to the id of the tokenizer's <image> token"
        )
    if not 0 <= config.image_token_index < config.text_config.vocab_size:
        raise CheckpointError(f"image_token_index {config.image_token_index} is outside the LLM's vocabulary "
                              f"({config.text_config.vocab_size}); resize the embeddings or fix config.json")
    problem = llm.problem(config)
    if problem:
        raise CheckpointError(f"{path} cannot be deployed: {problem}")


def check_tokenizer(path: Path, config, tokenizer) -> None:
    """The LLM's tokenizer must fit its vocabulary and know the image placeholder where config.json puts it."""
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the LLM's vocabulary "
                              f"(text_config.vocab_size) has {vocab}: they do not belong together; save the "
                              f"checkpoint's own tokenizer beside it")
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    if config.image_token_index not in added:
        image = tokenizer.convert_ids_to_tokens(config.image_token_index)
        raise CheckpointError(f"{path}: image_token_index {config.image_token_index} is {image!r} in the tokenizer, an "
                              f"ordinary token, not an added placeholder such as <image>: the tokenizer does not "
                              f"match config.json; save the checkpoint's own tokenizer beside it, or set "
                              f"image_token_index to the id of its <image> token")


def _ids_from_tokenizer(edge, tokenizer) -> None:
    """A plain HF folder does not say its Q-Former's special ids: take them from its (BERT) tokenizer."""
    for field, token in (("cls_token_id", tokenizer.cls_token_id), ("sep_token_id", tokenizer.sep_token_id),
                         ("pad_token_id", tokenizer.pad_token_id)):
        if token is None:
            raise CheckpointError(f"the Q-Former tokenizer has no {field.replace('_id', '')}; BLIP-2 needs a "
                                  f"BERT-style tokenizer with [CLS], [SEP] and [PAD]")
        setattr(edge, field, token)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source) -> Path:
    """A checkpoint folder as given, or a Hugging Face hub id ('Salesforce/blip2-opt-2.7b') resolved through the
    hub's local cache (HF_HOME / HF_HUB_CACHE). With HF_HUB_OFFLINE=1 only the cache is read; otherwise a
    missing snapshot is downloaded. Raises CheckpointError saying what to fetch when neither works."""
    path = Path(source)
    if path.exists() or not HUB_ID.match(str(source)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    parent = Path(source).parent
    if parent.is_dir():  # models/nope with a models/ folder here: a mistyped path rather than a hub id
        raise CheckpointError(f"checkpoint folder not found: {source} ({parent} has no '{Path(source).name}'; it "
                              f"is not a Hugging Face model in the local cache either); check the path")
    missing = f"{source} is neither a folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    fetch = (f"fetch it on a machine with internet (`hf download {source}`) and copy the cache folder "
             f"({constants.HF_HUB_CACHE}) here, or pass --model a folder written by save_pretrained")
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{missing}, and HF_HUB_OFFLINE is set: {fetch}") from None
    try:
        return Path(snapshot_download(str(source)))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{missing} and could not be downloaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); {fetch}") from None


def load_checkpoint(path) -> Checkpoint:
    from transformers import Blip2Config

    from train.blip2.model import EdgeConfig

    path = resolve_source(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}; pass --model a folder written by save_pretrained "
                              f"(such as models/demo, or one written by `python -m train`)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face save_pretrained folder")
    config = Blip2Config.from_pretrained(path)
    check_weight_files(path)
    if config.model_type != "blip-2":
        raise CheckpointError(f"{path} holds a {config.model_type!r} model; "
                              "blip2-edge exports BLIP-2 (model_type 'blip-2')")
    edge = EdgeConfig.load(path, config)
    if edge.stage == 2:
        check_llm(path, config)
    elif not edge.qformer_text:
        raise CheckpointError(f"{path} is a stage-1 checkpoint without the Q-Former's text side; nothing to export")
    image_processor = _image_processor_dict(path)
    tokenizer = load_tokenizer(path, "LLM") if edge.stage == 2 else None
    if tokenizer is not None:
        check_tokenizer(path, config, tokenizer)
    qformer_tokenizer = None
    if edge.qformer_text:
        qdir = path if edge.stage == 1 else path / "qformer_tokenizer"
        if not qdir.is_dir():
            raise CheckpointError(f"{path} has the Q-Former's text side but no Q-Former tokenizer in {qdir}; save it "
                                  f"with qformer_tokenizer.save_pretrained({str(qdir)!r})")
        qformer_tokenizer = load_tokenizer(qdir, "Q-Former")
    model = _load_model(path, qformer_tokenizer)
    prefix, suffix = prompt_affixes(tokenizer) if tokenizer is not None else ([], [])
    return Checkpoint(path, model, model.hf_model(), tokenizer, qformer_tokenizer, image_processor, prefix, suffix)


def preprocessor(model):
    """The exact numpy preprocessing the runtime uses (bit-identical to HF's BlipImageProcessor)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from runtime.image import ImageProcessorConfig

    size = model.config.vision_config.image_size
    return ImageProcessorConfig.from_hf_dict(BlipImageProcessorPil(size={"height": size, "width": size}).to_dict())


def _load_model(path: Path, qformer_tokenizer):
    from train.blip2.model import Blip2Edge

    model = Blip2Edge.from_pretrained(path)
    if qformer_tokenizer is not None and not (path / "blip2_edge.json").is_file():
        _ids_from_tokenizer(model.edge, qformer_tokenizer)
    return model


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(bytes the file must have, {tensor name: {"dtype", "shape", "data_offsets"}}) from a safetensors file's
    JSON header alone; CheckpointError if there is no readable header."""
    import struct

    with open(file, "rb") as fh:
        head = fh.read(8)
        try:
            (size,) = struct.unpack("<Q", head)
            header = json.loads(fh.read(size)) if size < 1 << 30 else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file (its header cannot be read): the file is damaged or "
                              f"cut short; fetch or copy it again")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    return 8 + size + end, tensors


def safetensors_headers(folder) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} of every *.safetensors file in `folder`, read from the files' JSON
    headers alone (no tensor is loaded)."""
    headers = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        headers.update(_safetensors_header(file)[1])
    return headers


def check_weight_files(path: Path) -> None:
    """Refuse a folder whose weight files are incomplete, before any is loaded (Hugging Face would fill the
    weights of a missing shard with random values and warn, and a cut file fails deep inside the load): every
    shard that model.safetensors.index.json names is there, and every safetensors file is as long as its header
    says."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} of the {len(shards)} weight shards named by model.safetensors.index.json "
                f"are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the download or copy "
                f"is incomplete; fetch the missing files into {path} (for a hub model: `hf download <repo id>`)")
    for file in sorted(path.glob("*.safetensors")):
        want, _ = _safetensors_header(file)
        have = file.stat().st_size
        if have < want:
            raise CheckpointError(f"{file} is truncated: {have:,} bytes where its header describes {want:,}; the "
                                  f"download or copy was cut short: fetch or copy the file again")


def parameter_count(folder) -> int:
    """Elements of every tensor stored in the folder's safetensors files."""
    return sum(math.prod(entry["shape"]) for entry in safetensors_headers(folder).values())


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
