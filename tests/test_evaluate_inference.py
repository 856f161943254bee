"""Test-time augmentation views and the bounded reader: built on the checkpoint's preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kaedama.evaluate.inference import VIEWS, five_crops, iter_inputs, views
from kaedama.manifest import Row
from kaedama.preprocess import Preprocess

PP = Preprocess(input_size=(3, 32, 32), crop_pct=0.8, interpolation="bilinear")


def _image(w: int = 60, h: int = 45) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", list(VIEWS))
def test_views_per_mode(mode):
    out = views(PP, _image(), mode)
    assert out.shape == (VIEWS[mode], 3, 32, 32) and out.dtype == np.float32


def test_centre_crop_and_flip_are_the_plain_preprocessing():
    img = _image()
    plain = PP.image(img)
    crops = five_crops(PP, img)
    assert np.allclose(crops[-1], plain, atol=1e-6)  # the fifth crop is the centre crop
    assert not np.allclose(crops[0], plain)
    flipped = views(PP, img, "flip")
    assert np.array_equal(flipped[0], plain)
    assert np.array_equal(flipped[1], plain[:, :, ::-1])  # the mirrored model input


def test_reader_keeps_order_and_reports_unreadable_images(tmp_path):
    rows = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        if i == 3:
            path.write_bytes(b"not an image")
        else:
            buf = io.BytesIO()
            _image(40 + i, 40).save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
        rows.append(Row(uri=str(path), label="x"))
    rows.append(Row(uri=str(tmp_path / "missing.png"), label="x"))
    got = list(iter_inputs(rows, PP, workers=3, ahead=2))
    assert [i for i, _, _ in got] == list(range(8))
    assert [arr is None for _, arr, _ in got] == [False] * 3 + [True] + [False] * 3 + [True]
    assert "not_an_image" in got[3][2] and got[7][2]
