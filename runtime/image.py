"""Image loading and BLIP-2 preprocessing without torch or transformers.

Turns what a user hands us (a file path, a PIL image or a numpy array) into the
``pixel_values`` tensor the vision encoder expects, giving the same numbers as
Hugging Face's ``BlipImageProcessorPil`` (bit-for-bit on every input HF itself
reads correctly). Needs only numpy and Pillow.

    from runtime.image import ImageProcessorConfig, load_image, preprocess

    # From a Hugging Face preprocessor_config.json (at export time; the manifest stores cfg.to_dict()) ...
    cfg = ImageProcessorConfig.from_hf_dict(json.load(open("preprocessor_config.json")))
    # ... and back from the engine manifest (at run time: runtime.manifest.load_manifest(folder).image).
    cfg = ImageProcessorConfig.from_dict(cfg.to_dict())
    pixel_values = cfg(["cat.jpg", pil_image, uint8_hwc_array])  # float32 [3, 3, H, W]

    # Or without a config:
    pixel_values = preprocess("cat.jpg", height=224, width=224,
                              mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

    rgb = load_image("scan.png")  # PIL RGB image; raises ImageInputError with a fix

What HF does, step by step, and what this module mirrors:

1. convert to RGB: images with an alpha band or a ``transparency`` entry are
   alpha-composited onto white, everything else goes through
   ``PIL.Image.convert("RGB")``;
2. resize the uint8 RGB image with ``PIL.Image.resize`` (bicubic by default);
3. rescale: ``(uint8 as float64 * rescale_factor)`` cast to float32;
4. normalise in float32: ``(x - mean) / std`` per channel; channel-first.

Steps 3-4 map each of the 256 possible byte values to one float32 per channel,
so they are done with a 3x256 lookup table computed exactly as HF computes
them: same numbers, no float64 image-sized temporaries.

Where this module deliberately differs from HF (HF gives unusable results):

* 16-bit images (uint16 arrays, ``I;16``/``I`` PIL images such as 16-bit
  grayscale PNGs) are scaled to 8 bit with ``round(v / 257)``; HF clips every
  value above 255 to white.
* float arrays are rejected; HF truncates 0..1 floats to uint8 and then
  rescales them twice.
* 2-D (grayscale) arrays are accepted; HF rejects them.
* arrays are always read as (H, W, C); HF guesses and reads e.g. (3, 30, 3)
  as channel-first.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import warnings
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EngineFolderError, ImageFormatError, ImageInputError, ImageTooLargeError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageInput",
    "ImageProcessorConfig",
    "decode_image",
    "load_image",
    "preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Images with more pixels than this are refused from their header, before they are decoded: a 17 KB PNG can
# declare 12000 x 12000 pixels, 432 MB once decoded to RGB (Pillow only warns below 179 Mpx). 40 Mpx is a 7300 x
# 5500 photo; the vision encoder sees 224 x 224 (or 364 x 364) of it. Raise it with `max_image_pixels`
# (Blip2Pipeline.from_dir, the CLI's --max-image-pixels); None turns the check off.
DEFAULT_MAX_PIXELS = 40_000_000
# What a service or a batch job reads from bytes it is sent: the formats people send (GIF: its first frame).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]

_ACCEPTED = (
    "a file path (str or pathlib.Path), a PIL.Image.Image, or a numpy uint8 array "
    "shaped (H, W, 3) RGB, (H, W) grayscale or (H, W, 4) RGBA (uint16 also accepted)"
)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What a broken file can make Pillow raise while decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_PIL_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


# --------------------------------------------------------------------------- loading


def base64_image(text: str, what: str) -> bytes:
    """The bytes of an image sent as base64 text, or as a data URL (data:image/png;base64,...); `what` names the
    field in the error."""
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{what} is not valid base64; send the file's bytes base64-encoded") from None


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 formats: Sequence[str] | None = UPLOAD_FORMATS) -> Image.Image:
    """An encoded image (the bytes of a file) as a new RGB PIL image: the format and the pixel count are checked
    from the header before any pixel is decoded. Raises ImageFormatError (a format outside `formats`),
    ImageTooLargeError (over `max_pixels`), or ImageInputError (not an image, truncated)."""
    import io

    try:
        with warnings.catch_warnings():  # (Pillow's warning about the size: checked below, and refused)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"the image is too large to decode safely ({e}); downscale it") from None
    except UnidentifiedImageError:
        try:
            other = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, *_DECODE_ERRORS):
            other = None
        if other:
            raise ImageFormatError(f"the image is a {other} file; send {', '.join(formats or ())} "
                                   f"(convert it, e.g. to PNG)") from None
        raise ImageInputError("the bytes are not an image Pillow can read; send the bytes of a PNG or JPEG "
                              "file") from None
    except _DECODE_ERRORS as e:
        raise ImageInputError(f"truncated or corrupt image ({type(e).__name__}); send the whole file") from None
    _check_pixels(image.size, max_pixels, "the image")
    return load_image(image)


def decode_resized(data: bytes, max_pixels: int | None, config: "ImageProcessorConfig",
                   formats: Sequence[str] | None = UPLOAD_FORMATS) -> np.ndarray:
    """decode_image, then resized to the model's input as `config` does (uint8 (height, width, 3)): what a
    service's image decoder process returns (150 KB, whatever the photo's size)."""
    return config.resized(decode_image(data, max_pixels, formats))


def _check_pixels(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(f"{what} is {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the limit "
                                 f"of {max_pixels:,} (max_image_pixels); downscale it (the model sees "
                                 f"a few hundred pixels a side)")


def load_image(x: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return `x` as a new RGB PIL image, converted exactly as Hugging Face does.

    Accepts a path (str / os.PathLike), a PIL image (any mode) or a numpy array
    (uint8 or uint16; (H, W, 3), (H, W), (H, W, 1) or (H, W, 4)). Transparent
    pixels are composited onto white; 16-bit data is scaled to 8 bit.
    Raises `ImageInputError` saying what is wrong and how to fix it.
    """
    if isinstance(x, (str, os.PathLike)):
        image = _read_file(os.fspath(x), max_pixels)
    elif isinstance(x, Image.Image):
        _check_pixels(x.size, max_pixels, getattr(x, "filename", "") or "the PIL image")
        image = _load_pil(x)
    elif isinstance(x, np.ndarray):
        image = _array_to_pil(x)
    else:
        raise ImageInputError(_unsupported_type_message(x))
    _check_not_empty(image.size, "image")
    return _to_rgb(image)


def _unsupported_type_message(x: object) -> str:
    name = f"{type(x).__module__}.{type(x).__qualname__}"
    message = f"unsupported image type {name}; pass {_ACCEPTED}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        message += ". For encoded bytes use PIL.Image.open(io.BytesIO(data))"
    elif hasattr(x, "numpy") and hasattr(x, "shape"):
        message += ". For a tensor, pass tensor.numpy() converted to uint8 (H, W, C)"
    return message


def _read_file(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode the file at `path` (a regular file: a FIFO or a device would block), leaving no file
    handle open."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            raise ImageInputError(f"not a regular file: {path} (a pipe, socket or device); pass an image file")
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _check_pixels(image.size, max_pixels, path)
            image.load()
    except FileNotFoundError:
        hint = " (URLs are not fetched: download the file first)" if "://" in path else ""
        where = "" if os.path.isabs(path) else f" (relative paths are resolved against {os.getcwd()})"
        raise ImageInputError(f"no such file: {path}{hint}; check the path{where}") from None
    except IsADirectoryError:
        raise ImageInputError(f"is a directory, not an image file: {path}; pass the path of one image") from None
    except PermissionError:
        raise ImageInputError(f"permission denied reading {path}; make the file readable (chmod +r)") from None
    except UnidentifiedImageError:
        raise ImageInputError(_not_an_image_message(path)) from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"image too large to decode safely: {path} ({e}); downscale it before passing it in"
        ) from None
    except _DECODE_ERRORS as e:
        raise ImageInputError(
            f"truncated or corrupt image: {path} ({type(e).__name__}: {e}); "
            "re-download or re-export the file"
        ) from e
    return image


def _not_an_image_message(path: str) -> str:
    if os.path.getsize(path) == 0:
        return f"empty file (0 bytes), not an image: {path}; re-download or re-export it"
    return (
        f"not an image PIL can read: {path}; the file is not in an image format Pillow "
        "understands: convert it to PNG/JPEG"
    )


def _load_pil(image: Image.Image) -> Image.Image:
    """Make sure a caller's (possibly lazily opened) PIL image decodes."""
    try:
        image.load()
    except _DECODE_ERRORS as e:
        name = getattr(image, "filename", "") or "PIL image"
        raise ImageInputError(
            f"truncated or corrupt image: {name} ({type(e).__name__}: {e}); "
            "re-download or re-export the file"
        ) from e
    return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """Check a numpy image array and wrap it as an 'L', 'RGB' or 'RGBA' PIL image."""
    array = _to_uint8(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    _check_array_shape(array.shape)
    _check_not_empty((array.shape[1], array.shape[0]), "array")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        raise ImageInputError(
            f"float image arrays ({array.dtype}) are not accepted because their range (0..1 or 0..255) "
            "is ambiguous; pass a uint8 (H, W, 3) array, e.g. "
            "np.clip(np.rint(a * 255), 0, 255).astype(np.uint8) for data in 0..1"
        )
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return _sixteen_to_eight_bit(array)
    if array.dtype != np.uint8:
        raise ImageInputError(
            f"image arrays must have dtype uint8 (or uint16), got {array.dtype}; "
            "convert with a.astype(np.uint8) if the values are already 0..255"
        )
    return array


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255: round(v / 257), in exact integer arithmetic."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _check_array_shape(shape: tuple[int, ...]) -> None:
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4)):
        return
    message = f"image array has shape {shape}; expected (H, W, 3) RGB, (H, W) grayscale or (H, W, 4) RGBA"
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        message += ". It looks channel-first: pass a.transpose(1, 2, 0)"
    elif len(shape) == 4:
        message += ". For a batch, pass a list of arrays: list(batch)"
    raise ImageInputError(message)


def _check_not_empty(size: tuple[int, int], what: str) -> None:
    width, height = size
    if width == 0 or height == 0:
        raise ImageInputError(f"zero-size {what} ({width}x{height} pixels); pass an image with pixels in it")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion of transformers.image_transforms.convert_to_rgb (v5), plus 16-bit scaling."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode == "F":
        raise ImageInputError(
            "floating-point PIL images (mode 'F') are not accepted because their range is ambiguous; "
            "convert to 8 bit first (e.g. save as an 8-bit PNG, or pass a uint8 array)"
        )
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageInputError(
            f"32-bit integer image with values {values.min()}..{values.max()} outside 0..65535; "
            "convert it to an 8-bit or 16-bit PNG first"
        )
    return Image.fromarray(_sixteen_to_eight_bit(values), mode="L")


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing settings of one model, as stored in an engine manifest.

    Mirrors the fields of Hugging Face's BLIP image processor. `do_convert_rgb`
    is kept for the record only: `load_image` always converts to RGB, since the
    vision encoder needs three channels (for RGB inputs HF's result is the same
    either way). Calling the config preprocesses images: ``cfg(images)``.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain 0, got {self.std}")
        if isinstance(self.resample, bool) or self.resample not in _PIL_RESAMPLE_NAMES:
            raise ValueError(f"resample must be a PIL filter number {_PIL_RESAMPLE_NAMES}, got {self.resample!r}")
        object.__setattr__(self, "resample", int(self.resample))
        if not float(self.rescale_factor) > 0:
            raise ValueError(f"rescale_factor must be > 0, got {self.rescale_factor!r}")
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read a Hugging Face ``preprocessor_config.json`` of a BLIP/BLIP-2 model.

        Missing keys take ``BlipImageProcessorPil``'s defaults (note: 384x384).
        ``size`` may be ``{"height": H, "width": W}`` or an int (square).
        ``{"shortest_edge": N}`` is refused: HF then keeps the aspect ratio, so
        images come out in varying, non-square shapes that a fixed-size BLIP-2
        vision encoder cannot take.
        """
        for flag in ("do_center_crop", "do_pad"):
            if d.get(flag):
                raise ValueError(f"{flag}=true is not supported (BLIP processors do not use it); set it to false")
        height, width = _hf_size(d.get("size", {"height": 384, "width": 384}))
        # HF resizes with BILINEAR when resample is explicitly null.
        resample = d.get("resample", 3)
        return cls(
            height=height,
            width=width,
            mean=_hf_channels(d.get("image_mean", OPENAI_CLIP_MEAN)),
            std=_hf_channels(d.get("image_std", OPENAI_CLIP_STD)),
            resample=2 if resample is None else resample,
            rescale_factor=d.get("rescale_factor", 1 / 255),
            do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the engine manifest (`from_dict` reads it back)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read the dict `to_dict` wrote; raises EngineFolderError if it is not one."""
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(d), set(d) - names
        if missing or unknown:
            raise EngineFolderError(
                f"image preprocessing settings in the manifest do not match this runtime "
                f"(missing: {sorted(missing)}, unknown: {sorted(unknown)}); "
                "re-export the engine with the same blip2-edge version as the runtime"
            )
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise EngineFolderError(
                f"invalid image preprocessing settings in the manifest: {e}; re-export the engine"
            ) from e

    def __call__(self, images: ImageInput | Sequence[ImageInput],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Preprocess one image or a list of them into float32 [B, 3, height, width] (files and PIL images of
        over `max_pixels` pixels are refused before they are decoded)."""
        items = _as_list(images)
        table = _value_table(self.mean, self.std, self.rescale_factor, self.do_rescale, self.do_normalize)
        out = np.empty((len(items), 3, self.height, self.width), dtype=np.float32)
        for i, item in enumerate(items):
            pixels = self._resized_pixels(_load_item(item, i, len(items), max_pixels))
            for c in range(3):
                np.take(table[c], pixels[..., c], out=out[i, c])
        return out

    def resized(self, image: ImageInput) -> np.ndarray:
        """uint8 (height, width, 3): `image` converted and resized as __call__ does before normalising. Passing the
        result to __call__ gives the same pixel values as passing `image` (a resize to its own size is a copy)."""
        return self._resized_pixels(load_image(image, None))

    def _resized_pixels(self, rgb: Image.Image) -> np.ndarray:
        """uint8 (height, width, 3) pixels of `rgb`, resized as HF does."""
        target = (self.width, self.height)
        if self.do_resize:
            rgb = rgb.resize(target, resample=self.resample)
        elif rgb.size != target:
            raise ImageInputError(
                f"image is {rgb.width}x{rgb.height} but do_resize=False needs exactly "
                f"{self.width}x{self.height}; resize it first or use do_resize=True"
            )
        return np.asarray(rgb)


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    *,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: int = 3,
    rescale_factor: float = 1 / 255,
    do_resize: bool = True,
    do_rescale: bool = True,
    do_normalize: bool = True,
) -> np.ndarray:
    """Preprocess images like ``BlipImageProcessorPil``: float32 [B, 3, height, width].

    `images` is one image or a list of anything `load_image` accepts.
    `resample` is a PIL filter number (3 = BICUBIC, BLIP's default).
    """
    config = ImageProcessorConfig(
        height=height,
        width=width,
        mean=mean,
        std=std,
        resample=resample,
        rescale_factor=rescale_factor,
        do_resize=do_resize,
        do_rescale=do_rescale,
        do_normalize=do_normalize,
    )
    return config(images)


@functools.lru_cache(maxsize=16)
def _value_table(
    mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float, do_rescale: bool, do_normalize: bool
) -> np.ndarray:
    """float32 [3, 256]: the value HF's rescale + normalise gives each byte, per channel.

    Same dtype steps as transformers.image_transforms.rescale / normalize:
    uint8 -> float64 * factor -> float32, then float32 (x - mean) / std.
    """
    values = np.arange(256, dtype=np.uint8)
    if do_rescale:
        values = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if do_normalize:
        mean32 = np.asarray(mean, dtype=np.float32)[:, None]
        std32 = np.asarray(std, dtype=np.float32)[:, None]
        values = (values - mean32) / std32
    table = np.ascontiguousarray(values, dtype=np.float32)
    table.flags.writeable = False
    return table


def _load_item(item: ImageInput, index: int, count: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """load_image, naming the failing item when there are several."""
    try:
        return load_image(item, max_pixels)
    except ImageInputError as e:
        if count == 1:
            raise
        raise ImageInputError(f"image {index} of the list of {count}: {e}") from e


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ImageInputError("no images given; pass one image or a non-empty list of images")
    return items


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}") from None
    if len(numbers) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}")
    return numbers  # type: ignore[return-value]


def _hf_channels(value: Any) -> Any:
    """HF allows a single float for image_mean / image_std."""
    return [value] * 3 if isinstance(value, (int, float)) else value


def _hf_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    given = {k: v for k, v in size.items() if v is not None} if isinstance(size, dict) else None
    if given is not None and set(given) == {"height", "width"}:
        return given["height"], given["width"]
    if given is not None and "shortest_edge" in given:
        edge = given["shortest_edge"]
        raise ValueError(
            f"size={size} makes Hugging Face resize keeping the aspect ratio, so images come out in "
            "varying, non-square shapes that a fixed-size BLIP-2 vision encoder cannot take; set "
            f'"size": {{"height": {edge}, "width": {edge}}} in preprocessor_config.json, as the '
            "BLIP-2 checkpoints do"
        )
    raise ValueError(f'unsupported "size" {size!r}; expected {{"height": H, "width": W}} or an int')
