"""Users' image-text data on disk, in the three formats `python -m train` reads (torch-free: numpy + pillow).

    from train.training.datasets import open_dataset
    data = open_dataset("annotations/captions_train2017.json", images="train2017/")   # COCO captions
    data = open_dataset("data/train.jsonl")                                          # JSONL rows
    data = open_dataset("shards/")               # WebDataset tar shards (a folder of *.tar, one .tar, or a list)
    len(data), data.examples[0], data.load(0)    # Example(image, captions, question, answers), a PIL RGB image

Formats, detected from the path:

* **COCO captions** (`*.json`, with `--images DIR`): `{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`; one example per image with all its captions.
* **JSONL** (`*.jsonl`): one object per line, image paths relative to the file. Caption rows
  `{"image": "a.jpg", "caption": "..."}` (or `"captions": [...]`; rows of the same image are merged);
  VQA rows `{"image": "a.jpg", "question": "...", "answers": ["...", ...]}` (one example per row).
* **WebDataset** (`*.tar`, a folder of them, or a text file listing them): members grouped by key
  (`dir/0001.jpg` + `dir/0001.txt` or `dir/0001.json`), the image in `jpg`/`jpeg`/`png`/`webp`, the text in
  `txt` (a caption) or `json` (the JSONL fields). The shards are indexed once (member offsets only: no
  image is read), then images are read at random by offset, so a data set's order is a pure function of
  the seed whatever its format and any step can be resumed.

Images are checked before training: missing files are skipped with a count and the first few paths,
or refused past `max_bad`; an image that cannot be decoded during training is skipped the same way
(train.training.streaming). Nothing keeps decoded images or features in memory: the index holds paths and texts.
"""
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError


# BLIP-2's VQA prompt (as its paper and Hugging Face's examples ask questions)
QA_PROMPT = "Question: {question} Answer:"  # the prompt format of the README's runtime example


def qa_prompt(question: str) -> str:
    """The LLM prompt for a question: 'Question: what colour is the square? Answer:'."""
    return QA_PROMPT.format(question=question)


# ----------------------------------------------------------------------------- COCO captions (one loader)


class DataError(ValueError):
    """A data set on disk is missing or malformed; the message names the problem and the fix."""


@dataclass(frozen=True)
class CaptionPair:
    path: Path
    caption: str


_COCO_FORMAT = '{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}'


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"COCO annotations file {path} not found; pass the path of captions_<split>.json "
                        f"(from annotations_trainval2017.zip)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"COCO annotations file {path} is not valid JSON ({e}); re-download or re-extract it") from e
    if not isinstance(doc, dict):
        raise DataError(f"COCO annotations file {path} holds a {type(doc).__name__}, not an object; "
                        f"expected the COCO captions format {_COCO_FORMAT}")
    return doc


def _entries(doc: dict, key: str, fields: tuple[str, str], path: Path) -> list[dict]:
    """doc[key], checking that it is a list of objects that all have `fields`."""
    if key not in doc:
        raise DataError(f"COCO annotations file {path} is missing the key {key!r}; "
                        f"expected the COCO captions format {_COCO_FORMAT}")
    entries = doc[key]
    if not isinstance(entries, list):
        raise DataError(f"{key!r} in {path} must be a list, not {type(entries).__name__}")
    for i, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise DataError(f"{key}[{i}] in {path} is missing {', '.join(map(repr, missing))}; "
                            f"expected the COCO captions format {_COCO_FORMAT}")
    return entries


def _coco_pairs(doc: dict, image_dir: Path, path: Path) -> list[CaptionPair]:
    """One CaptionPair per annotation, in file order; every image id must be known."""
    files = {img["id"]: img["file_name"] for img in _entries(doc, "images", ("id", "file_name"), path)}
    annotations = _entries(doc, "annotations", ("image_id", "caption"), path)
    if not annotations:
        raise DataError(f"COCO annotations file {path} has no annotations; use a captions_*.json file "
                        f"(instances_*.json and person_keypoints_*.json hold no captions)")
    unknown = [a["image_id"] for a in annotations if a["image_id"] not in files]
    if unknown:
        raise DataError(f"{len(unknown)} annotations in {path} point to image ids missing from 'images' "
                        f"(first: {unknown[:5]}); the file may be truncated or mixed from two splits: re-download it")
    return [CaptionPair(image_dir / files[a["image_id"]], " ".join(str(a["caption"]).split())) for a in annotations]


FORMATS = ("a COCO captions file (*.json, with --images DIR), a JSONL file (*.jsonl) of {\"image\", \"caption\"} or "
           "{\"image\", \"question\", \"answers\"} rows, or WebDataset shards (*.tar, a folder of *.tar, or a *.txt "
           "file listing them)")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class Example:
    image: str  # a file path, or "<shard>::<member>" inside a WebDataset tar
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "vqa" if self.question is not None else "caption"


@dataclass(frozen=True)
class _Member:  # where an image's bytes lie inside a tar
    shard: str
    offset: int
    size: int


class Dataset:
    """Examples of one data set and the images they name. `load(i)` reads example i's image as RGB."""

    def __init__(self, examples: list[Example], source: str, fmt: str, members: dict[str, _Member] | None = None,
                 skipped: list[str] | None = None):
        self.examples, self.source, self.format = examples, source, fmt
        self._members = members or {}
        self.skipped = skipped or []  # images named by the data but missing on disk

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        return f"{self.format} data set {self.source}: {len(self)} examples ({self.describe()})"

    def describe(self) -> str:
        vqa = sum(e.kind == "vqa" for e in self.examples)
        parts = [f"{len(self) - vqa} captioned images"] if vqa < len(self) else []
        return ", ".join(parts + ([f"{vqa} questions"] if vqa else []))

    def only(self, kind: str) -> "Dataset":
        """The examples of one kind ("caption" or "vqa")."""
        return Dataset([e for e in self.examples if e.kind == kind], self.source, self.format, self._members,
                       self.skipped)

    @property
    def kinds(self) -> set[str]:
        return {e.kind for e in self.examples}

    def read_bytes(self, index: int) -> bytes:
        name = self.examples[index].image
        member = self._members.get(name)
        if member is None:
            return Path(name).read_bytes()
        with open(member.shard, "rb") as f:
            f.seek(member.offset)
            return f.read(member.size)

    def load(self, index: int) -> Image.Image:
        """Example `index`'s image as RGB; DataError naming the file when it cannot be read."""
        name = self.examples[index].image
        try:
            with Image.open(io.BytesIO(self.read_bytes(index))) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {name} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- formats

def _texts(value, what: str, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: {what} must be a string or a list of strings, not {type(value).__name__}")
    texts = tuple(" ".join(v.split()) for v in values if v.strip())
    if not texts:
        raise DataError(f"{where}: {what} is empty; every row needs a non-empty {what}")
    return texts


def _example(row: dict, image: str, where: str) -> Example:
    """An Example from a JSONL object (or a WebDataset json member) whose image is `image`."""
    if "question" in row:
        question = _texts(row["question"], "question", where)[0]
        if "answers" not in row and "answer" not in row:
            raise DataError(f"{where}: a VQA row needs \"answers\" (a list of strings: VQAv2 has 10 per question) "
                            f"beside its \"question\"")
        return Example(image, question=question,
                       answers=_texts(row.get("answers", row.get("answer")), "answers", where))
    for key in ("caption", "captions", "text", "txt"):
        if key in row:
            return Example(image, captions=_texts(row[key], key, where))
    raise DataError(f"{where}: the row has neither \"caption\" (or \"captions\") nor \"question\" + \"answers\" "
                    f"(keys: {', '.join(sorted(row)) or 'none'})")


def _merge(examples: list[Example]) -> list[Example]:
    """Caption examples of the same image merged into one (first appearance keeps its place); VQA rows kept."""
    merged: dict[str, list] = {}
    out: list = []
    for e in examples:
        if e.kind == "vqa":
            out.append(e)
        elif e.image in merged:
            merged[e.image].extend(e.captions)
        else:
            merged[e.image] = list(e.captions)
            out.append(e.image)
    return [Example(e, captions=tuple(merged[e])) if isinstance(e, str) else e for e in out]


def read_coco(path: Path, images: Path | None) -> list[Example]:
    if images is None:
        raise DataError(f"{path} is a COCO captions file: pass the folder holding its images with --images DIR "
                        f"(e.g. --images train2017/ for captions_train2017.json)")
    if not images.is_dir():
        raise DataError(f"--images {images} is not a folder; pass the folder holding the images of {path.name}")
    pairs = _coco_pairs(_read_json(path), images, path)
    empty = sum(not p.caption for p in pairs)
    if empty:
        raise DataError(f"{empty} annotations in {path} have an empty caption; remove them or fill them in")
    return _merge([Example(str(p.path), captions=(p.caption,)) for p in pairs])


def read_jsonl(path: Path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise DataError(f"{where}: each row needs \"image\", the image's path relative to {path.parent}")
            examples.append(_example(row, str(path.parent / row["image"]), where))
    if not examples:
        raise DataError(f"{path} has no rows; expected one JSON object per line")
    return _merge(examples)


def _shard_list(path: Path) -> list[Path]:
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise DataError(f"{path} is a folder without *.tar shards; pass {FORMATS}")
        return shards
    if path.suffix == ".txt":
        shards = [path.parent / s.strip() for s in path.read_text().splitlines() if s.strip()]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"{len(missing)} shards listed in {path} are missing (first: {', '.join(missing[:3])})")
        return shards
    return [path]


def read_webdataset(path: Path) -> tuple[list[Example], dict[str, _Member]]:
    examples, members = [], {}
    for shard in _shard_list(path):
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                infos = [i for i in tar.getmembers() if i.isfile()]
                for info in infos:
                    stem, _, ext = info.name.rpartition("/")[2].partition(".")
                    key = info.name.rpartition("/")[0] + "/" + stem
                    groups.setdefault(key, {})[ext.lower()] = info
                texts = {key: (tar.extractfile(g["json"]).read() if "json" in g else
                               tar.extractfile(g["txt"]).read() if "txt" in g else None) for key, g in groups.items()}
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read WebDataset shard {shard} ({e}); it is truncated or not a tar file") from None
        for key, group in groups.items():
            where = f"{shard}, sample {key.lstrip('/')}"
            image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
            if image is None:
                raise DataError(f"{where} has no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
            if texts[key] is None:
                raise DataError(f"{where} has no text: add a .txt (the caption) or a .json member")
            text = texts[key].decode("utf-8")
            row = json.loads(text) if "json" in group else {"caption": text}
            name = f"{shard}::{image.name}"
            members[name] = _Member(str(shard), image.offset_data, image.size)
            examples.append(_example(row, name, where))
    return _merge(examples), members


def _existing(examples: list[Example], members: dict, max_bad: int, source: str) -> tuple[list[Example], list[str]]:
    missing = sorted({e.image for e in examples if e.image not in members and not Path(e.image).is_file()})
    if len(missing) > max_bad:
        are = "images named by {} are" if len(missing) != 1 else "image named by {} is"
        raise DataError(f"{len(missing)} {are.format(source)} missing (first: {', '.join(missing[:3])}); "
                        f"fix the paths (JSONL paths are relative to the file; COCO's to --images), or allow up to "
                        f"that many with --max-bad {len(missing)}")
    gone = set(missing)
    return [e for e in examples if e.image not in gone], missing


def open_dataset(path, images=None, max_bad: int = 0) -> Dataset:
    """The data set at `path` (format detected from it; see the module docstring). Images named but missing are
    skipped when there are at most `max_bad` of them (listed in `.skipped`), refused otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}; pass {FORMATS}")
    if path.suffix == ".json":
        examples, members, fmt = read_coco(path, Path(images) if images else None), {}, "COCO captions"
    elif path.suffix == ".jsonl":
        examples, members, fmt = read_jsonl(path), {}, "JSONL"
    elif path.is_dir() or path.suffix in (".tar", ".txt"):
        (examples, members), fmt = read_webdataset(path), "WebDataset"
    else:
        raise DataError(f"cannot tell the format of {path} from its name; pass {FORMATS}")
    if images is not None and fmt != "COCO captions":
        raise DataError(f"--images is for COCO captions files; {path} is {fmt}, whose image paths it holds itself")
    examples, skipped = _existing(examples, members, max_bad, str(path))
    return Dataset(examples, str(path), fmt, members, skipped)
