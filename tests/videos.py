"""Test videos whose frames show their own frame number, encoded for real with PyAV.

Each frame carries its index as 10 black/white cells (4 x 3 grid, row-major, most significant
bit first) plus two marker cells (white, black) that also tell the orientation; the cells are
large enough that lossy codecs and resizing keep their mean far from the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

GRID_ROWS, GRID_COLS = 3, 4
BITS = 10
MAX_FRAMES = 1 << BITS


def frame_number_image(index: int, width: int, height: int) -> np.ndarray:
    """An RGB image (height, width, 3) showing ``index`` as cells; markers in the last two."""
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"frame index {index} does not fit in {BITS} bits")
    cells = [(index >> (BITS - 1 - b)) & 1 for b in range(BITS)] + [1, 0]
    img = np.empty((height, width, 3), np.uint8)
    rows = np.linspace(0, height, GRID_ROWS + 1).round().astype(int)
    cols = np.linspace(0, width, GRID_COLS + 1).round().astype(int)
    for k, bit in enumerate(cells):
        r, c = divmod(k, GRID_COLS)
        img[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 255 if bit else 0
    return img


def read_frame_number(img: np.ndarray) -> int:
    """The index shown by ``img`` (any size), or -1 when the markers are wrong (e.g. rotated)."""
    gray = img[..., 1]  # the cells are grey: one channel is enough
    h, w = gray.shape
    rows = np.linspace(0, h, GRID_ROWS + 1)
    cols = np.linspace(0, w, GRID_COLS + 1)
    bits = []
    for k in range(GRID_ROWS * GRID_COLS):
        r, c = divmod(k, GRID_COLS)
        # The central half of each cell: edges blur under compression and resizing.
        r0, r1 = rows[r] + (rows[r + 1] - rows[r]) / 4, rows[r + 1] - (rows[r + 1] - rows[r]) / 4
        c0, c1 = cols[c] + (cols[c + 1] - cols[c]) / 4, cols[c + 1] - (cols[c + 1] - cols[c]) / 4
        cell = gray[int(r0) : int(np.ceil(r1)), int(c0) : int(np.ceil(c1))]
        bits.append(int(cell.mean() > 127.5))
    if bits[BITS:] != [1, 0]:
        return -1
    return int("".join(map(str, bits[:BITS])), 2)


def read_frame_numbers(frames: np.ndarray) -> list[int]:
    return [read_frame_number(f) for f in frames]


@dataclass
class EncodedVideo:
    path: Path
    times: list[Fraction]  # presentation time of each frame, seconds from the first frame
    width: int  # display size (after rotation)
    height: int

    def shown_at(self, t: Fraction | float) -> int:
        """The frame index on screen at time ``t``: the last frame whose time is <= t."""
        t = Fraction(t)
        k = int(np.searchsorted(np.array(self.times, dtype=object), t, side="right")) - 1
        return max(k, 0)


def encode_frame_number_video(
    path: str | Path,
    num_frames: int,
    *,
    fps: Fraction | int = 30,
    codec: str = "libx264",
    width: int = 128,
    height: int = 96,
    pix_fmt: str = "yuv420p",
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
    audio: bool = False,
    gop: int | None = None,
    bframes: int | None = None,
    container_format: str | None = None,
) -> EncodedVideo:
    """Encode ``num_frames`` frame-number frames and return where each one is shown.

    ``width``/``height`` are the display size. With ``rotation`` (degrees counterclockwise,
    as PyAV's ``set_display_rotation`` and ``VideoFrame.rotation`` define it) the coded frames
    are stored turned the other way, so a player that honours the display matrix shows the
    pattern upright. ``pts`` (in ``time_base`` units) gives variable frame rate.
    """
    path = Path(path)
    fps = Fraction(fps)
    k = (rotation // 90) % 4
    coded_w, coded_h = (height, width) if k % 2 else (width, height)
    if pts is None:
        time_base = time_base or 1 / fps
        pts = [int(round(i / fps / time_base)) for i in range(num_frames)]
    elif time_base is None:
        raise ValueError("pts needs a time_base")
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, pix_fmt
        stream.codec_context.time_base = time_base
        options = {}
        if codec in ("libx264", "libx265"):
            options["crf"] = "20"
            options["preset"] = "veryfast"
        if codec == "libx265":
            options["x265-params"] = "log-level=error"
        if codec == "libvpx-vp9":
            options.update({"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"})
        if codec == "mpeg4":
            stream.codec_context.bit_rate = 2_000_000  # the default 200 kb/s smears the cells
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                options["keyint_min"] = str(gop)
                options["sc_threshold"] = "0"
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        stream.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(num_frames):
            upright = frame_number_image(i, width, height)
            # Stored turned clockwise by `rotation` so that the display turn undoes it.
            coded = np.ascontiguousarray(np.rot90(upright, -k))
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts, frame.time_base = pts[i], time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if audio_stream is not None:
            seconds = float(pts[-1] * time_base) + float(1 / fps)
            _write_tone(out, audio_stream, seconds)
    times = [Fraction(p - pts[0]) * time_base for p in pts]
    return EncodedVideo(path, times, width, height)


def _write_tone(out, stream, seconds: float, rate: int = 16000) -> None:
    samples = int(seconds * rate)
    t = np.arange(samples, dtype=np.float32) / rate
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, samples, 1024):
        chunk = tone[start : start + 1024][None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def encode_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        _write_tone(out, out.add_stream("aac", rate=16000, layout="mono"), seconds)
    return path
