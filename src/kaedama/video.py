"""A video's frames as images: what a client sends as one burst of predictions.

An uploaded video becomes hundreds of frame requests at once (the burst that the
prediction service sheds with 429 + Retry-After and the client absorbs with backoff).
Frames are decoded with PyAV (FFmpeg's libraries in a wheel: the ``video`` extra) and
encoded as JPEG in memory, every ``every``-th frame.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from kaedama import storage
from kaedama.errors import KaedamaError

# Names that ``kaedama predict`` treats as videos rather than images.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg")


class VideoError(KaedamaError):
    """A video that cannot be opened or decoded."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the video, its time and its JPEG bytes."""

    index: int
    seconds: float
    jpeg: bytes

    def name(self, source: str) -> str:
        """How results name the frame: ``clip.mp4#frame=000120``."""
        return f"{source}#frame={self.index:06d}"


def is_video(uri: str) -> bool:
    """Whether ``uri`` names a video (by its suffix)."""
    return uri.lower().endswith(VIDEO_SUFFIXES)


def iter_frames(uri: str, *, every: int = 1, quality: int = 90) -> Iterator[Frame]:
    """Every ``every``-th frame of the video at ``uri`` (local or ``gs://``), as JPEG.

    Raises:
        VideoError: PyAV is missing, or the file is not a decodable video.
    """
    if every < 1:
        raise VideoError(f"every must be >= 1, got {every}")
    try:
        import av
    except ModuleNotFoundError as exc:
        raise VideoError("reading videos needs PyAV: pip install 'kaedama[video]'") from exc
    data = storage.read_bytes(uri)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError(f"{uri} has no video stream")
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                buf = io.BytesIO()
                frame.to_image().save(buf, "JPEG", quality=quality)
                seconds = float(frame.time) if frame.time is not None else 0.0
                yield Frame(index, seconds, buf.getvalue())
    except av.error.FFmpegError as exc:
        raise VideoError(f"{uri} is not a readable video: {exc}") from exc
