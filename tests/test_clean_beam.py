"""beam/embed.py: the RunInference embedding transform on the DirectRunner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from apache_beam.testing import test_pipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402
from PIL import Image  # noqa: E402

from beam.embed import EmbedImages  # noqa: E402
from kaedama.clean.embed import embedding_model, save_weights  # noqa: E402

MODEL = "test_efficientnet"


def test_embed_images_matches_the_core_on_the_direct_runner(tmp_path, one_torch_thread):
    rng = np.random.default_rng(0)
    uris = []
    for n in range(5):
        path = tmp_path / f"img{n}.png"
        Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(path)
        uris.append(str(path))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    bad = [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")]
    model = embedding_model(MODEL, pretrained=False)
    weights = str(tmp_path / "weights.pt")
    save_weights(model, weights)
    blobs = [Path(u).read_bytes() for u in uris]
    expected = model.embed(model.preprocess.batch(blobs))
    want = {
        u: (hashlib.sha256(b).hexdigest(), v) for u, b, v in zip(uris, blobs, expected, strict=True)
    }

    def close_to_core(actual):
        got = {uri: (sha, vector) for uri, sha, vector in actual}
        assert set(got) == set(want)
        for uri, (sha, vector) in got.items():
            assert sha == want[uri][0]
            assert vector.shape == (model.dim,) and vector.dtype == np.float32
            assert np.allclose(vector, want[uri][1], atol=1e-4)

    with test_pipeline.TestPipeline(runner="DirectRunner") as p:
        out = (
            p
            | beam.Create(uris + bad)
            | EmbedImages(MODEL, model.data_config, weights, batch_size=2)
        )
        assert_that(out["embeddings"], close_to_core, label="Embeddings")
        assert_that(
            out["failed"] | beam.Map(lambda f: (f[0].rsplit("/", 1)[1], f[1])),
            equal_to([("broken.jpg", "truncated"), ("missing.png", "unreadable")]),
            label="Failed",
        )
