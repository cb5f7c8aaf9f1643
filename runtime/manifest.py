"""Read and validate an engine folder's `manifest.json` (the format is described in DESIGN.md).

    from runtime.manifest import load_manifest
    m = load_manifest("engines/demo/onnx")      # raises EngineFolderError with the fix on any problem
    m.graph_path("vision")
"""
import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import EngineFolderError

FORMAT = "blip2-edge/engine"
FORMAT_VERSION = 1
REQUIRED_GRAPHS = ("vision", "qformer_query")


@dataclass
class Manifest:
    folder: Path
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise EngineFolderError(
                f"the engine folder {self.folder} has no '{name}' graph (it has: {', '.join(self.graphs)}); "
                f"rebuild it with `python -m export.build` from a checkpoint that contains this part"
            )
        return self.folder / self.graphs[name]["file"]


def load_manifest(folder) -> Manifest:
    """Load `folder/manifest.json` and check format, version and that every file it names exists."""
    folder = Path(folder)
    rebuild = f"build it with `python -m export.build --model CHECKPOINT --target onnx --out {folder.parent.parent}`"
    if not folder.is_dir():
        raise EngineFolderError(f"engine folder not found: {folder}; {rebuild}")
    path = folder / "manifest.json"
    if not path.is_file():
        raise EngineFolderError(
            f"{folder} is not an engine folder: manifest.json is missing (an interrupted build leaves no folder; "
            f"this one may be a checkpoint or a partial copy); {rebuild}"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFolderError(f"{path} is not valid JSON ({e}); the folder is corrupt, {rebuild}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineFolderError(f"{path} is not a blip2-edge manifest (no \"format\": \"{FORMAT}\"); {rebuild}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineFolderError(
            f"{path} has format_version {version}, this runtime reads version {FORMAT_VERSION}; "
            f"rebuild the engines with this version of blip2-edge (or install the blip2-edge version that built them)"
        )
    manifest = Manifest(folder, data)
    for name in REQUIRED_GRAPHS:
        manifest.graph_path(name)
    missing = [g["file"] for g in data["graphs"].values() if not (folder / g["file"]).is_file()]
    missing += [f for f in data.get("tokenizers", {}).values() if not (folder / f).is_file()]
    if missing:
        raise EngineFolderError(f"{folder} is incomplete: missing {', '.join(missing)}; {rebuild}")
    return manifest
