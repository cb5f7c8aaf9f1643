"""The engine folder's `manifest.json`, typed: written by `export/`, read by `runtime/` (docs/architecture.md).

    from runtime.manifest import load_manifest
    m = load_manifest("engines/demo/onnx")      # EngineFolderError naming the key and the fix on any problem
    m.llm.eos_token_id, m.limits.max_batch, m.graph_path("vision"), m.graphs["llm_decoder"].profiles

One dataclass per section; `Manifest.to_dict()` is what the exporter writes and `Manifest.from_dict()` checks
every key and type on the way back in, so the runtime never looks a string key up. Each fact is stored once
(the batch limit lives in `limits`, KV-cache names come from `kv_names`). A folder of another format version
is refused with the command that rebuilds it.
"""
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import EngineFolderError
from runtime.image import ImageProcessorConfig

FORMAT = "blip2-edge/engine"
FORMAT_VERSION = 2
REQUIRED_GRAPHS = ("vision", "qformer_query")


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """KV-cache tensor names of a decoder graph: past_key_0, past_value_0, past_key_1, ... (prefix 'past' for
    inputs, 'present' for outputs, 'query' for the Q-Former queries' keys/values)."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: list[int | str]  # ints for fixed axes, names for dynamic ones ("batch", "past+text", ...)


@dataclass(frozen=True)
class Graph:
    file: str  # the .onnx or .engine file, relative to the folder
    inputs: list[Tensor]
    outputs: list[Tensor]
    profiles: list[dict[str, list[int]]]  # per TensorRT optimization profile: axis name -> [min, opt, max]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: axis name}} of every input and output with a named axis."""
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
                for t in self.inputs + self.outputs if any(isinstance(a, str) for a in t.shape)}

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class Limits:
    """The build's limits: every graph's dynamic axes are bounded by them (`python -m export.build` options)."""
    max_batch: int  # --max-batch
    max_prompt_tokens: int | None = None  # --max-prompt-tokens: prompt tokens after the placeholders (BOS included)
    max_new_tokens: int | None = None  # --max-new-tokens
    max_qformer_tokens: int | None = None  # Q-Former texts, [CLS]/[DEC] and [SEP] included


@dataclass(frozen=True)
class Model:
    stage: int  # 1: Q-Former only (ITC/ITM/ITG); 2: connected to an LLM
    num_query_tokens: int
    image_size: int
    patch_size: int


FAMILIES = ("opt", "t5")


@dataclass(frozen=True)
class LanguageModel:
    """The LLM's shape, token ids and prompt layout (`runtime.prompt.PromptLayout`)."""
    family: str  # "opt": decoder-only, the soft prompt starts the decoder's input; "t5": encoder-decoder, it
    # starts the encoder's input and the decoder generates from decoder_start_token_id
    tokenizer: str  # tokenizer.json in the folder
    vocab_size: int
    num_layers: int  # the decoder's layers (its KV cache)
    num_heads: int
    head_dim: int
    hidden_size: int  # width of a soft-prompt row (the language projection's output)
    image_token_id: int  # placeholder id the soft prompt replaces
    bos_token_id: int  # a caption without a prompt is the placeholders and BOS (Hugging Face generate)
    eos_token_id: int
    pad_token_id: int
    prompt_prefix_ids: list[int]  # what the tokenizer puts before a prompt's text (OPT: BOS)
    prompt_suffix_ids: list[int] = field(default_factory=list)  # ... and after it (T5: </s>)
    max_positions: int | None = None  # OPT's position table: placeholders + prompt + new tokens must fit
    decoder_start_token_id: int | None = None  # T5: the decoder's first input

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise _Invalid("manifest.llm.family", f"is {self.family!r}; this runtime knows {', '.join(FAMILIES)}")
        if self.family == "t5" and self.decoder_start_token_id is None:
            raise _Invalid("manifest.llm.decoder_start_token_id", "is missing (a T5 decoder starts from it)")


@dataclass(frozen=True)
class QFormer:
    """The Q-Former's text side: token ids, shape and ITC settings."""
    tokenizer: str  # qformer_tokenizer.json in the folder
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    itc_dim: int
    itc_temperature: float
    cls_token_id: int  # [CLS] text [SEP] for ITC / ITM
    sep_token_id: int  # ... and it ends ITG generation
    dec_token_id: int  # [DEC] starts ITG generation
    pad_token_id: int


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | fp16 | int8 | int4 (weight-only, the LLM's graphs)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # per graph: what was kept in fp32, ...
    calibration: dict[str, Any] | None = None  # int8: images, count, seed, held-out images


@dataclass(frozen=True)
class Build:
    created: str  # UTC, ISO 8601
    source: str  # the checkpoint folder
    source_sha256: str  # over config.json and the weight files
    versions: dict[str, str]  # torch, transformers, onnx, onnxruntime, python
    tensorrt: dict[str, Any] | None = None  # TensorRT version, GPU, compute capability, engines (trt-* only)


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    name: str
    target: str  # onnx | onnx-fp16 | onnx-int8 | onnx-int4 | trt-fp16 | trt-int8 | trt-int4
    precision: Precision
    model: Model
    limits: Limits
    image: ImageProcessorConfig
    graphs: dict[str, Graph]
    build: Build
    llm: LanguageModel | None = None  # stage 2
    qformer: QFormer | None = None  # checkpoints with the Q-Former's text side
    parity: dict[str, Any] | None = None  # summary of the build's parity gate (parity.json has every check)
    folder: Path = field(default=Path("."), compare=False, repr=False, metadata={"json": False})

    @property
    def is_tensorrt(self) -> bool:
        return self.target.startswith("trt")

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise EngineFolderError(
                f"the engine folder {self.folder} has no '{name}' graph (it has: {', '.join(self.graphs)}); "
                f"rebuild it with `python -m export.build` from a checkpoint that contains this part"
            )
        return self.folder / self.graphs[name].file

    def files(self) -> list[str]:
        """Every file the folder must hold: graphs and tokenizers."""
        return [g.file for g in self.graphs.values()] + [s.tokenizer for s in (self.llm, self.qformer) if s]

    def to_dict(self) -> dict:
        return _dump(self)

    def write(self, folder) -> None:
        (Path(folder) / "manifest.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict, folder=Path(".")) -> "Manifest":
        return dataclasses.replace(_parse(cls, data, "manifest"), folder=Path(folder))


# ---------------------------------------------------------------- (de)serialisation
def _dump(obj):
    if isinstance(obj, ImageProcessorConfig):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _dump(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get("json", True)}
    if isinstance(obj, dict):
        return {str(k): _dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_dump(v) for v in obj]
    return obj


class _Invalid(Exception):
    def __init__(self, key: str, problem: str):
        super().__init__(f"'{key}' {problem}")
        self.key = key


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _parse(tp, value, key: str):
    """`value` (from JSON) as type `tp`: dataclasses, str/int/float/bool, list[T], dict[str, T], unions, Any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: the errors of X, which name the nested key
            return _parse(options[0], value, key)
        for option in options:
            try:
                return _parse(option, value, key)
            except _Invalid:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
        raise _Invalid(key, f"is {value!r}, expected {names}")
    if tp is ImageProcessorConfig:
        if not isinstance(value, dict):
            raise _Invalid(key, "is not an object")
        return ImageProcessorConfig.from_dict(value)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(key, f"is {type(value).__name__}, expected a list")
        return [_parse(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(key, f"is {type(value).__name__}, expected an object")
        return {k: _parse(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if not _is(value, tp):
        raise _Invalid(key, f"is {value!r}, expected {tp.__name__}")
    return float(value) if tp is float else value


def _parse_dataclass(tp, value, key: str):
    if not isinstance(value, dict):
        raise _Invalid(key, f"is {type(value).__name__}, expected an object")
    hints = typing.get_type_hints(tp)
    out = {}
    for f in dataclasses.fields(tp):
        if not f.metadata.get("json", True):
            continue
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Invalid(f"{key}.{f.name}", "is missing")
            continue
        out[f.name] = _parse(hints[f.name], value[f.name], f"{key}.{f.name}")
    return tp(**out)


# ---------------------------------------------------------------- loading a folder
def rebuild_hint(folder: Path, target: str | None = None) -> str:
    """The command that writes this engine folder again (engines/<name>/<target>: --out is two levels up)."""
    folder = Path(folder)
    target = target or (folder.name if folder.name.startswith(("onnx", "trt")) else "onnx")
    out = folder.parent.parent if folder.name.startswith(("onnx", "trt")) else folder.parent
    return (f"python -m export.build --model CHECKPOINT --target {target} --out {out} "
            f"--name {folder.parent.name if folder.name.startswith(('onnx', 'trt')) else folder.name}")


def _engine_folders_inside(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "manifest.json").is_file())


def _check_is_engine_folder(folder: Path) -> None:
    if folder.is_file():
        raise EngineFolderError(f"{folder} is a file; --engines takes an engine folder (engines/<name>/<target>, "
                                f"the folder `python -m export.build` writes, holding manifest.json)")
    if not folder.is_dir():
        raise EngineFolderError(f"engine folder not found: {folder}; build it with `{rebuild_hint(folder)}`")
    if not (folder / "manifest.json").is_file():
        inside = _engine_folders_inside(folder)
        if inside:
            raise EngineFolderError(f"{folder} holds engine folders, not an engine itself: pass one of "
                                    f"{', '.join(str(p) for p in inside)}")
        if (folder / "config.json").is_file():
            raise EngineFolderError(f"{folder} is a checkpoint, not an engine folder; export it with "
                                    f"`python -m export.build --model {folder} --target onnx` and pass "
                                    f"engines/{folder.name}/onnx")
        raise EngineFolderError(f"{folder} is not an engine folder: manifest.json is missing (an interrupted build "
                                f"leaves no folder; this one may be a partial copy); build it with "
                                f"`{rebuild_hint(folder)}`")


def _outside_or_out_of_range(manifest: Manifest, folder: Path) -> str | None:
    """What makes a parsed manifest unsafe or impossible to run: a file outside the folder (an absolute path, `..`,
    a link out of it), a limit or a count below 1, a token id outside the vocabulary. None when there is nothing."""
    root = folder.resolve()
    for name in manifest.files():
        where = Path(name)
        if where.is_absolute() or ".." in where.parts or not (root / where).resolve().is_relative_to(root):
            return f"the file {name!r} is not inside the engine folder (graphs and tokenizers are named relative to it)"
    lim = manifest.limits
    for key in ("max_batch", "max_prompt_tokens", "max_new_tokens", "max_qformer_tokens"):
        value = getattr(lim, key)
        if value is not None and not 1 <= value <= 1 << 20:
            return f"limits.{key} is {value}, not in 1..{1 << 20}"
    for section, name in ((manifest.llm, "llm"), (manifest.qformer, "qformer")):
        if section is None:
            continue
        for key in ("vocab_size", "num_layers", "num_heads", "head_dim"):
            if not 1 <= getattr(section, key) <= 1 << 24:
                return f"{name}.{key} is {getattr(section, key)}, not in 1..{1 << 24}"
        ids = {k: v for k, v in vars(section).items() if k.endswith("_token_id") and v is not None}
        ids.update({f"{k}[{i}]": v for k in ("prompt_prefix_ids", "prompt_suffix_ids")
                    for i, v in enumerate(getattr(section, k, []))})
        for key, value in ids.items():
            if not 0 <= value < section.vocab_size:
                return f"{name}.{key} is {value}, outside the vocabulary of {section.vocab_size}"
    return None


def load_manifest(folder) -> Manifest:
    """Load and validate `folder/manifest.json`, and check that every file it names exists."""
    folder = Path(folder)
    _check_is_engine_folder(folder)
    path = folder / "manifest.json"
    rebuild = f"rebuild it with `{rebuild_hint(folder)}`"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFolderError(f"{path} is not valid JSON ({e}); the folder is corrupt, {rebuild}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineFolderError(f"{path} is not a blip2-edge manifest (no \"format\": \"{FORMAT}\"); {rebuild}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineFolderError(
            f"{path} has format_version {version}, this runtime reads version {FORMAT_VERSION}; {rebuild} using "
            f"this version of blip2-edge (or install the blip2-edge version that built it)")
    try:
        manifest = Manifest.from_dict(data, folder)
    except _Invalid as e:
        raise EngineFolderError(f"{path}: {e}; the manifest was written by another version of blip2-edge or "
                                f"edited by hand: {rebuild}") from None
    problem = _outside_or_out_of_range(manifest, folder)
    if problem:
        raise EngineFolderError(f"{path}: {problem}; a manifest written by `python -m export.build` never has this: "
                                f"{rebuild}")
    for name in REQUIRED_GRAPHS:
        manifest.graph_path(name)
    missing = [f for f in manifest.files() if not (folder / f).is_file()]
    if missing:
        raise EngineFolderError(f"{folder} is incomplete: missing {', '.join(missing)}; {rebuild}")
    return manifest
