"""Write small test images and videos with Pillow and PyAV (not with slotsmith)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_image(path, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    """A random RGB image (PNG or JPEG by suffix)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return Path(path)


def write_video(path, frames: int, width: int = 32, height: int = 32, fps: int = 16, seed: int = 0) -> Path:
    """A video of ``frames`` random frames (mpeg4 in MP4), each frame a different flat shade plus noise."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            base = np.full((height, width, 3), (i * 17) % 256, dtype=np.uint8)
            noise = rng.integers(0, 32, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(base + noise, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)


def count_frames(path) -> int:
    """Frames PyAV decodes from ``path``."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def write_audio_only(path, seconds: float = 0.1, rate: int = 8000) -> Path:
    """A container (Matroska, whatever the suffix) with one audio stream and no video stream."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        samples = np.zeros((1, int(seconds * rate)), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)
