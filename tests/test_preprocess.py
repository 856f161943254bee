"""The shared eval preprocessing equals timm's eval transform and round-trips its config."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kaedama import images
from kaedama.preprocess import Preprocess, PreprocessError


def _photo(w: int, h: int, seed: int = 0, grain: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // grain + 1, w // grain + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "crop_pct", "crop_mode", "interp", "shape"),
    [
        ((3, 224, 224), 0.875, "center", "bicubic", (500, 375)),
        ((3, 224, 224), 0.875, "center", "bilinear", (300, 640)),
        ((3, 160, 160), 1.0, "center", "bicubic", (333, 222)),
        ((3, 192, 256), 0.9, "center", "bilinear", (400, 300)),
        ((3, 224, 224), 0.95, "squash", "bicubic", (500, 260)),
    ],
)
def test_equals_timm_eval_transform(size, crop_pct, crop_mode, interp, shape):
    from timm.data import create_transform

    dc = {
        "input_size": size,
        "interpolation": interp,
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }
    img = _photo(*shape)
    ours = Preprocess.from_data_config(dc).image(img)
    theirs = create_transform(**dc, is_training=False)(img).numpy()
    assert ours.shape == theirs.shape == size
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_bytes_use_the_reduced_decode_and_config_round_trips():
    pre = Preprocess(input_size=(3, 64, 64), crop_pct=0.875, interpolation="bilinear")
    data = _jpeg(_photo(1200, 900, grain=100))
    full = pre.image(images.decode(data))
    reduced = pre(data)
    assert pre.draft_size == (73, 73)
    # Reduced DCT decoding changes pixels slightly, never the content.
    assert reduced.shape == full.shape
    assert np.abs(reduced - full).mean() < 0.1  # ~5/255 of a pixel after normalising
    assert Preprocess.from_data_config(pre.to_data_config()) == pre
    no_draft = Preprocess.from_data_config({**pre.to_data_config(), "decode": {"draft": False}})
    np.testing.assert_array_equal(no_draft(data), full)
    assert pre.batch([data, data]).shape == (2, 3, 64, 64)
    assert pre.batch([]).shape == (0, 3, 64, 64)


def test_bad_bytes_and_bad_configs_raise_clear_errors():
    pre = Preprocess(input_size=(3, 32, 32))
    with pytest.raises(images.ImageError) as err:
        pre(b"not an image", uri="x.jpg")
    assert err.value.reason == "not_an_image"
    with pytest.raises(PreprocessError, match="crop_mode"):
        Preprocess(crop_mode="border")
    with pytest.raises(PreprocessError, match="interpolation"):
        Preprocess(interpolation="sinc")
    with pytest.raises(PreprocessError, match="3-channel"):
        Preprocess(input_size=(1, 28, 28))


def test_imports_no_torch():
    # The serving process uses this module and must stay free of torch.
    code = "import sys, kaedama.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
