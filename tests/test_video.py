"""A video's frames as one burst: every frame answered by a small server, in order."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from kaedama import cli
from kaedama.video import VideoError, iter_frames
from tests.plugins.serving import run_server

FRAMES = 300


def _video(path, frames: int = FRAMES) -> None:
    """An MPEG-4 clip whose frames differ (a moving bar over cycling colours)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(frames):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, :, i % 3] = 180
            img[8:40, i % 70 : i % 70 + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_frames_are_decoded_every_nth_as_jpeg(tmp_path):
    clip = tmp_path / "clip.mp4"
    _video(clip, 30)
    frames = list(iter_frames(str(clip), every=7))
    assert [f.index for f in frames] == [0, 7, 14, 21, 28]
    image = Image.open(io.BytesIO(frames[1].jpeg))
    assert image.format == "JPEG" and image.size == (96, 64)
    assert frames[1].name("clip.mp4") == "clip.mp4#frame=000007"
    (tmp_path / "fake.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="not a readable video"):
        list(iter_frames(str(tmp_path / "fake.mp4")))


@pytest.mark.slow
def test_a_videos_frames_sent_at_once_are_all_answered(tmp_path, serving_model, capfd):
    clip = tmp_path / "clip.mp4"
    _video(clip)
    with run_server(serving_model, max_batch_size=8, max_queue=16, max_batch_wait_ms=2) as proc:
        code = cli.main(
            ["predict", proc.url, str(clip), "--json", "--no-progress", "--concurrency", "300"]
        )
        metrics = httpx.get(proc.url + "/metrics").text
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    lines = out.strip().splitlines()
    assert len(lines) == FRAMES
    assert [json.loads(line)["file"] for line in lines] == [
        f"{clip}#frame={i:06d}" for i in range(FRAMES)
    ]
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"{FRAMES} frame(s) sent at once: {FRAMES} answered, 0 failed")
    retries = int(summary.split("failed, ")[1].split(" retries")[0])
    # A queue of 16 cannot take 300 at once: the server shed, the client retried.
    assert retries > 0
    assert 'code="429"' in metrics and "kaedama_shed_total" in metrics
