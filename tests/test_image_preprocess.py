"""Tests for image_preprocess: parameters, letterbox geometry, decoding paths, resize, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import broken_corpus as bc
from image_preprocess import PreprocessParams, _resize_uint8, load_image, normalize_images


def test_preprocess_params_roundtrip_and_validation() -> None:
    """to_dict/from_dict round-trip; invalid values raise ValueError."""
    p = PreprocessParams(64, pad_color=[0, 0, 0], mean=[0.4, 0.5, 0.6], std=(0.2, 0.3, 0.4))
    assert PreprocessParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert PreprocessParams.from_dict({"image_size": 32}) == PreprocessParams(32)
    for bad in (
        {"image_size": 0},
        {"image_size": 8, "pad_color": (0, 0, 300)},
        {"image_size": 8, "std": (1, 0, 1)},
        {"image_size": 8, "colour": 1},
        {},
    ):
        with pytest.raises(ValueError):
            PreprocessParams.from_dict(bad)


def test_letterbox_geometry_and_upscale_filter(tmp_path: Path) -> None:
    """Content is centred with pad colour around it; upscaling uses bicubic."""
    src = bc.noise_image(10, 5, seed=3)
    src.save(tmp_path / "small.png")
    params = PreprocessParams(32, pad_color=(10, 20, 30))
    out = load_image(tmp_path / "small.png", params)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # content 32x16 centred vertically: rows 0-7 and 24-31 are pad
    assert (out[:8] == (10, 20, 30)).all() and (out[24:] == (10, 20, 30)).all()
    reference = np.asarray(src.resize((32, 16), Image.Resampling.BICUBIC))
    # torch's antialiased uint8 bicubic computes PIL's filter, rounding to within one grey level
    assert np.abs(out[8:24].astype(int) - reference.astype(int)).max() <= 1
    assert (out[8:24] == reference).mean() > 0.95
    # tall image: pad left and right
    bc.write_image(tmp_path / "tall.png", 6, 24, color=(200, 0, 0))
    tall = load_image(tmp_path / "tall.png", params)
    assert (tall[:, :12] == (10, 20, 30)).all() and (tall[:, 20:] == (10, 20, 30)).all()
    assert (tall[:, 12:20] == (200, 0, 0)).all()


def test_jpeg_draft_downscale_close_to_full_decode(tmp_path: Path) -> None:
    # smooth gradient so the draft (DCT-scaled) decode and the full decode agree closely
    """The draft-mode decode stays close to a full decode + LANCZOS resize."""
    y, x = np.mgrid[0:480, 0:640]
    arr = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    params = PreprocessParams(64)
    out = load_image(tmp_path / "big.jpg", params)
    with Image.open(tmp_path / "big.jpg") as full:
        reference = np.asarray(full.convert("RGB").resize((64, 48), Image.Resampling.LANCZOS))
    assert np.abs(out[8:56].astype(int) - reference.astype(int)).mean() < 3.0


def test_exif_orientation_applied(tmp_path: Path) -> None:
    """EXIF orientation 6 rotates the picture before letterboxing."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 10, 40, 20))  # stored: top red, bottom blue
    exif = Image.Exif()
    exif[bc.EXIF_ORIENTATION] = 6  # display = stored rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg", PreprocessParams(40)).astype(int)
    # displayed 20x40 portrait: pad at x<10 and x>=30; stored top (red) is now on the right
    assert (out[:, :10] == 255).all() and (out[:, 30:] == 255).all()
    assert np.abs(out[20, 25] - (255, 0, 0)).max() < 10
    assert np.abs(out[20, 14] - (0, 0, 255)).max() < 10


def test_alpha_composited_onto_pad(tmp_path: Path) -> None:
    """RGBA, LA and palette transparency are composited onto the pad colour."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255  # right half opaque red, left half transparent
    rgba[:4, :4, 3] = 128  # top-left quarter half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pad = (0, 100, 50)
    out = load_image(tmp_path / "a.png", PreprocessParams(8, pad_color=pad)).astype(int)
    assert (out[:, 4:] == (200, 0, 0)).all()
    assert (out[4:, :4] == pad).all()
    alpha = 128 / 255
    expected = np.rint(np.array([200, 0, 0]) * alpha + np.array(pad) * (1 - alpha))
    assert np.abs(out[1, 1] - expected).max() <= 1
    # LA and palette-with-transparency go through the same path
    la = Image.fromarray(np.stack([np.full((4, 4), 90, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png", PreprocessParams(4, pad_color=pad)) == pad).all()
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.paste(0, (0, 0, 2, 4))
    pal.save(tmp_path / "p.png", transparency=0)
    out_p = load_image(tmp_path / "p.png", PreprocessParams(4, pad_color=pad))
    assert (out_p[:, :2] == pad).all() and (out_p[:, 2:] == (10, 200, 10)).all()


def test_other_modes_converted(tmp_path: Path) -> None:
    """Grayscale, 16-bit, 32-bit int, CMYK and palette images become RGB correctly."""
    params = PreprocessParams(3)
    Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    gray = load_image(tmp_path / "l.png", params)[1]
    assert (gray == np.array([[0, 0, 0], [128] * 3, [255] * 3])).all()
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    g16 = load_image(tmp_path / "g16.png", params)[1]
    assert (g16[:, 0] == np.array([0, 32896 // 257, 255])).all()
    # mode "I" (32-bit int) holding 16-bit data; PNG cannot store it, TIFF can
    Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I").save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as check:
        assert check.mode == "I"
    i32 = load_image(tmp_path / "i32.tif", params)[1]
    assert (i32[:, 0] == np.array([0, 1000 // 257, 255])).all()
    Image.new("CMYK", (3, 3), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    cmyk = load_image(tmp_path / "c.jpg", params).astype(int)
    assert np.abs(cmyk[1, 1] - (255, 0, 255)).max() < 8  # no magenta ink -> magenta
    pal = Image.new("P", (3, 3), 2)
    pal.putpalette([0, 0, 0, 0, 0, 0, 1, 2, 3] + [0] * 759)
    pal.save(tmp_path / "p.bmp")
    assert (load_image(tmp_path / "p.bmp", params) == (1, 2, 3)).all()


def test_gif_first_frame(tmp_path: Path) -> None:
    """Animated GIFs use their first frame."""
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(tmp_path / "anim.gif", PreprocessParams(4)).astype(int)
    assert np.abs(out - (255, 0, 0)).max() < 8


def test_truncated_image_raises_on_load(tmp_path: Path) -> None:
    """A truncated JPEG raises OSError when decoded."""
    bc.write_truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(OSError):
        load_image(tmp_path / "t.jpg", PreprocessParams(16))


def test_normalize_images_formula() -> None:
    """normalize_images equals (x/255 - mean)/std."""
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize_images(x, mean, std)
    ref = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    assert torch.allclose(out.double(), ref, atol=1e-6)


@pytest.mark.parametrize("mode, pil", [("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)])
@pytest.mark.parametrize("size", [(448, 336), (120, 90), (900, 700)])
def test_fast_resize_matches_pillow(mode: str, pil: int, size: tuple[int, int]) -> None:
    """The torch resize used for letterboxing reproduces Pillow's antialiased filters."""
    src = bc.noise_image(707, 531, seed=5).filter(ImageFilter.GaussianBlur(2))
    ours = _resize_uint8(np.array(src), size[1], size[0], mode).astype(int)
    reference = np.asarray(src.resize(size, pil)).astype(int)
    assert ours.shape == reference.shape
    diff = np.abs(ours - reference)
    # rounding differs in rare pixels: measured max 2, mean 0.005 grey levels
    assert diff.max() <= 2 and diff.mean() < 0.02


def test_huge_image_is_reduced_right_after_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above HUGE_IMAGE_PIXELS a PNG is box-reduced before conversion; the result stays within
    a few grey levels of the plain path (same letterbox, same content box)."""
    import image_preprocess as ip

    path = tmp_path / "big.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))).convert("RGB").save(path)
    params = PreprocessParams(image_size=32)
    plain, plain_box = ip.load_letterboxed(path, params)
    calls = []
    original = Image.Image.reduce
    monkeypatch.setattr(Image.Image, "reduce", lambda self, f, *a: calls.append(f) or original(self, f, *a))
    monkeypatch.setattr(ip, "HUGE_IMAGE_PIXELS", 100_000)
    reduced, box = ip.load_letterboxed(path, params)
    assert calls == [10]  # 640 // (2 * 32)
    assert box == plain_box
    assert np.abs(reduced.astype(int) - plain.astype(int)).max() <= 3


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@pytest.mark.parametrize("mode", ["I;16", "P", "LA", "CMYK", "badexif"])
def test_odd_modes_and_broken_exif_load(tmp_path: Path, mode: str) -> None:
    """Unusual modes and a garbage EXIF block give a normal (S, S, 3) uint8 image."""
    path = bc.write_odd_mode(tmp_path / ("x.jpg" if mode in ("CMYK", "badexif") else "x.png"), mode)
    out = load_image(path, PreprocessParams(image_size=16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
