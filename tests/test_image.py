"""Tests of runtime/image.py: parity with Hugging Face, error messages, no torch import.

Parity tests import transformers (skipped where it is not installed, e.g. on the
Jetson); runtime.image itself must never import it.
"""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import EngineFolderError, ImageInputError
from runtime.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorConfig,
    load_image,
    preprocess,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6  # measured difference is exactly 0: same PIL resize, same float32 arithmetic

# What Salesforce/blip2-* checkpoints ship as preprocessor_config.json.
BLIP2_HF_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_processor_type": "BlipImageProcessor",
    "image_std": list(OPENAI_CLIP_STD),
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}


# --------------------------------------------------------------------------- helpers


def photo(h, w, channels=3, seed=0):
    """uint8 test image with smooth gradients plus noise, so resampling filters matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = [(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 7) % 256, (x * y) % 256]
    smooth = np.stack(base[:channels], axis=-1)
    noisy = smooth + rng.normal(0, 20, smooth.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def to_u8(values16):
    return np.rint(values16 / 257).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_processor():
    """Factory for transformers.BlipImageProcessorPil with our keyword names."""
    transformers = pytest.importorskip("transformers")

    def make(height, width, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, **kw):
        return transformers.BlipImageProcessorPil(
            size={"height": height, "width": width}, image_mean=list(mean), image_std=list(std), **kw
        )

    return make


def hf_pixels(processor, images):
    return processor(images, return_tensors="np")["pixel_values"]


def assert_close(ours, theirs):
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs.astype(np.float32)).max() <= TOLERANCE


# --------------------------------------------------------------------------- parity with HF

SIZES = [
    pytest.param((480, 640), (224, 224), id="downscale-640x480-to-224"),
    pytest.param((17, 23), (32, 48), id="upscale-odd-to-32x48"),
    pytest.param((101, 77), (224, 224), id="upscale-odd-portrait"),
    pytest.param((333, 501), (32, 48), id="downscale-odd-to-32x48"),
    pytest.param((224, 224), (224, 224), id="same-size"),
]


def pil_images(h, w):
    """PIL images in the modes users hand in, keyed by name."""
    rgb = photo(h, w)
    rgba = photo(h, w, 4, seed=1)
    palette = Image.fromarray(rgb).quantize(64)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 5
    return {
        "RGB": Image.fromarray(rgb),
        "L": Image.fromarray(rgb[..., 0]),
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(rgba).convert("LA"),
        "P": palette,
        "P-transparency": palette_t,
        "1": Image.fromarray(rgb[..., 0]).convert("1"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }


@pytest.mark.parametrize("src, dst", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "P-transparency", "1", "CMYK"])
def test_pil_modes_match_hf(hf_processor, src, dst, mode):
    image = pil_images(*src)[mode]
    ours = preprocess(image, height=dst[0], width=dst[1], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert_close(ours, hf_pixels(hf_processor(*dst), image))


@pytest.mark.parametrize("src, dst", SIZES)
def test_uint8_arrays_match_hf(hf_processor, src, dst):
    processor = hf_processor(*dst)
    kw = dict(height=dst[0], width=dst[1], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    hwc, rgba, gray = photo(*src), photo(*src, 4, seed=2), photo(*src, seed=3)[..., 0]
    assert_close(preprocess(hwc, **kw), hf_pixels(processor, hwc))
    assert_close(preprocess(rgba, **kw), hf_pixels(processor, rgba))
    # HF rejects 2-D arrays; compare with the same pixels as a PIL 'L' image.
    assert_close(preprocess(gray, **kw), hf_pixels(processor, Image.fromarray(gray)))
    assert_close(preprocess(gray[..., None], **kw), hf_pixels(processor, Image.fromarray(gray)))


@pytest.mark.parametrize("src, dst", SIZES[:3])
def test_files_match_hf(hf_processor, tmp_path, src, dst):
    processor = hf_processor(*dst)
    kw = dict(height=dst[0], width=dst[1], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    for name, image in [("a.png", pil_images(*src)["RGBA"]), ("b.jpg", pil_images(*src)["RGB"])]:
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reference:
            expected = hf_pixels(processor, reference)
        assert_close(preprocess(tmp_path / name, **kw), expected)
        assert_close(preprocess(str(tmp_path / name), **kw), expected)


@pytest.mark.parametrize("src, dst", SIZES[:3])
def test_16_bit_inputs_match_hf_on_8_bit_equivalent(hf_processor, tmp_path, src, dst):
    """HF clips 16-bit values above 255 to white; we scale by 1/257, then match HF on the result."""
    processor = hf_processor(*dst)
    kw = dict(height=dst[0], width=dst[1], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    gray16 = photo(*src)[..., 0].astype(np.uint16) * 257 + np.uint16(100)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as check:
        assert check.mode == "I;16"
    expected = hf_pixels(processor, Image.fromarray(to_u8(gray16)))
    assert_close(preprocess(tmp_path / "gray16.png", **kw), expected)
    assert_close(preprocess(Image.fromarray(gray16).convert("I"), **kw), expected)
    assert_close(preprocess(gray16, **kw), expected)

    rgb16 = photo(*src).astype(np.uint16) * 257 + np.uint16(77)
    assert_close(preprocess(rgb16, **kw), hf_pixels(processor, to_u8(rgb16)))


def test_16_bit_scaling_is_round_of_v_over_257():
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65406, 65407, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 1, 1, 2, 128, 254, 255, 255]
    assert np.asarray(load_image(values))[0, :, 0].tolist() == expected
    assert np.asarray(load_image(values.astype(">u2")))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(dict(resample=Image.Resampling.BILINEAR), id="bilinear"),
        pytest.param(dict(resample=Image.Resampling.NEAREST), id="nearest"),
        pytest.param(dict(resample=Image.Resampling.LANCZOS), id="lanczos"),
        pytest.param(dict(do_rescale=False), id="no-rescale"),
        pytest.param(dict(do_normalize=False), id="no-normalize"),
        pytest.param(dict(do_rescale=False, do_normalize=False), id="raw"),
        pytest.param(dict(rescale_factor=1 / 127.5, mean=(0.5,) * 3, std=(0.5,) * 3), id="other-stats"),
    ],
)
def test_settings_match_hf(hf_processor, settings):
    image = pil_images(61, 83)["RGB"]
    settings = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, **settings}
    ours = preprocess(image, height=40, width=30, **settings)
    mean, std = settings.pop("mean"), settings.pop("std")
    assert_close(ours, hf_pixels(hf_processor(40, 30, mean, std, **settings), image))


def test_no_resize_matches_hf_and_checks_size(hf_processor):
    image = pil_images(32, 48)["RGB"]
    ours = preprocess(image, height=32, width=48, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, do_resize=False)
    assert_close(ours, hf_pixels(hf_processor(32, 48, do_resize=False), image))
    with pytest.raises(ImageInputError, match=r"48x32 but do_resize=False needs exactly 40x30.*resize it first"):
        preprocess(image, height=30, width=40, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, do_resize=False)


def test_mixed_batch_matches_hf(hf_processor, tmp_path):
    images_ours, images_hf = [], []
    for i, (h, w) in enumerate([(50, 70), (224, 224), (13, 300)]):
        rgb = photo(h, w, seed=i)
        images_ours.append(rgb)
        images_hf.append(rgb)
    Image.fromarray(photo(90, 60, 4)).save(tmp_path / "x.png")
    images_ours.append(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        images_hf.append(im.copy())
    ours = preprocess(images_ours, height=224, width=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert ours.shape == (4, 3, 224, 224)
    assert_close(ours, hf_pixels(hf_processor(224, 224), images_hf))


def test_config_from_hf_dict_matches_hf_from_dict(hf_processor):
    transformers = pytest.importorskip("transformers")
    cfg = ImageProcessorConfig.from_hf_dict(BLIP2_HF_CONFIG)
    assert (cfg.height, cfg.width, cfg.resample) == (224, 224, 3)
    processor = transformers.BlipImageProcessorPil.from_dict(BLIP2_HF_CONFIG)
    images = [photo(300, 400), photo(100, 80, 4)]
    assert_close(cfg(images), hf_pixels(processor, images))


def test_transparent_pixels_become_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    assert np.asarray(load_image(rgba)).tolist() == [[[10, 20, 30], [255] * 3], [[255] * 3, [255] * 3]]


def test_load_image_returns_new_rgb_image():
    original = Image.fromarray(photo(5, 6))
    loaded = load_image(original)
    assert loaded.mode == "RGB" and loaded is not original


# --------------------------------------------------------------------------- config


def test_config_dict_round_trip_through_json():
    cfg = ImageProcessorConfig.from_hf_dict(BLIP2_HF_CONFIG)
    again = ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_config_from_hf_dict_defaults_and_variants():
    assert ImageProcessorConfig.from_hf_dict({}) == ImageProcessorConfig(
        height=384, width=384, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
    )
    assert ImageProcessorConfig.from_hf_dict({"size": 224}).height == 224
    assert ImageProcessorConfig.from_hf_dict({"resample": None}).resample == 2  # HF: None -> BILINEAR
    assert ImageProcessorConfig.from_hf_dict({"image_mean": 0.5}).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "hf_dict, match",
    [
        ({"size": {"shortest_edge": 224}}, r"keeping the aspect ratio.*\"height\": 224"),
        ({"size": {"longest_edge": 224}}, r"unsupported \"size\""),
        ({"do_center_crop": True}, "do_center_crop=true is not supported"),
        ({"image_std": [0.5, 0.0, 0.5]}, "std must not contain 0"),
        ({"image_mean": [0.5, 0.5]}, "mean must be 3 numbers"),
        ({"resample": 9}, "resample must be a PIL filter number"),
    ],
)
def test_config_from_hf_dict_rejects(hf_dict, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig.from_hf_dict(hf_dict)


def test_config_from_dict_rejects_foreign_manifest():
    good = ImageProcessorConfig.from_hf_dict(BLIP2_HF_CONFIG).to_dict()
    with pytest.raises(EngineFolderError, match=r"missing: \['height'\].*re-export"):
        ImageProcessorConfig.from_dict({k: v for k, v in good.items() if k != "height"})
    with pytest.raises(EngineFolderError, match=r"unknown: \['crop'\]"):
        ImageProcessorConfig.from_dict({**good, "crop": 1})
    with pytest.raises(EngineFolderError, match="height must be a positive int"):
        ImageProcessorConfig.from_dict({**good, "height": -1})


# --------------------------------------------------------------------------- errors


def write_truncated(path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {
        "text": text,
        "empty": empty,
        "png": write_truncated(tmp_path / "cut.png", "PNG"),
        "jpg": write_truncated(tmp_path / "cut.jpg", "JPEG"),
    }


def test_missing_file(tmp_path, monkeypatch):
    """The message names the path, and the folder a relative path was read from (only for a relative path)."""
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageInputError, match=f"no such file: {missing}; check the path$"):
        load_image(missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageInputError, match=f"no such file: sub/missing.png; .*resolved against {tmp_path}"):
        load_image("sub/missing.png")
    with pytest.raises(ImageInputError, match="URLs are not fetched"):
        load_image("https://example.com/cat.jpg")


def test_directory(tmp_path):
    with pytest.raises(ImageInputError, match="is a directory"):
        load_image(tmp_path)


def test_not_an_image(bad_files):
    with pytest.raises(ImageInputError, match=r"not an image PIL can read: .*notes\.txt.*convert it to PNG/JPEG"):
        load_image(bad_files["text"])
    with pytest.raises(ImageInputError, match=r"empty file \(0 bytes\)"):
        load_image(bad_files["empty"])


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_file(bad_files, kind):
    with pytest.raises(ImageInputError, match=r"truncated or corrupt image: .*cut\..*re-download"):
        load_image(bad_files[kind])
    lazy = Image.open(bad_files[kind])  # a caller's not-yet-decoded PIL image
    try:
        with pytest.raises(ImageInputError, match="truncated or corrupt image"):
            load_image(lazy)
    finally:
        lazy.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_handles_left_open(bad_files, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(photo(20, 20, 4)).save(good)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        load_image(good)
        for path in bad_files.values():
            with pytest.raises(ImageInputError):
                load_image(path)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 4, 3), np.float32), r"float image arrays \(float32\).*pass a uint8 \(H, W, 3\) array"),
        (np.zeros((4, 4, 3), np.float64), "float image arrays"),
        (np.zeros((4, 4, 3), np.int64), r"dtype uint8 \(or uint16\), got int64.*astype\(np.uint8\)"),
        (np.zeros((4, 4, 3), bool), "dtype uint8"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\); expected \(H, W, 3\)"),
        (np.zeros((3, 10, 20), np.uint8), r"channel-first: pass a.transpose\(1, 2, 0\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"For a batch, pass a list of arrays"),
        (np.zeros(12, np.uint8), r"shape \(12,\)"),
        (np.zeros((0, 5, 3), np.uint8), r"zero-size array \(5x0 pixels\)"),
        (np.zeros((5, 0), np.uint8), "zero-size array"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(ImageInputError, match=match):
        load_image(array)


def test_bad_pil_images():
    with pytest.raises(ImageInputError, match="zero-size image"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError, match=r"mode 'F'.*convert to 8 bit"):
        load_image(Image.new("F", (4, 4)))
    with pytest.raises(ImageInputError, match="outside 0..65535"):
        load_image(Image.new("I", (4, 4), 70000))


@pytest.mark.parametrize(
    "value, match",
    [
        (123, "unsupported image type builtins.int; pass a file path"),
        (b"\x89PNG", r"io.BytesIO"),
        ([[0, 1], [2, 3]], "unsupported image type builtins.list"),
        (None, "unsupported image type builtins.NoneType"),
    ],
)
def test_unsupported_types(value, match):
    with pytest.raises(ImageInputError, match=match):
        load_image(value)


def test_preprocess_rejects_empty_batch_and_nested_bad_item():
    kw = dict(height=8, width=8, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    with pytest.raises(ImageInputError, match="no images given"):
        preprocess([], **kw)
    with pytest.raises(ImageInputError, match="image 1 of the list of 2: unsupported image type builtins.float"):
        preprocess([photo(8, 8), 3.5], **kw)


# --------------------------------------------------------------------------- dependencies

IMPORT_CHECK = textwrap.dedent(
    """
    import sys

    class BlockHeavyImports:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"runtime must not import {name}")
            return None

    sys.meta_path.insert(0, BlockHeavyImports())

    import numpy as np
    from runtime.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessorConfig, preprocess

    out = preprocess(np.zeros((30, 40, 3), np.uint8), height=16, width=16,
                     mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert out.shape == (1, 3, 16, 16) and out.dtype == np.float32
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not heavy, heavy
    print("ok")
    """
)


def test_runtime_image_imports_no_torch_or_transformers():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
