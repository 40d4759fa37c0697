"""Decode the frames on screen at given times from one video with PyAV, in one forward pass that
seeks only where that is cheaper than decoding through; resize the short side, turn rotated video
upright. Every failure is a `VideoDecodeError` whose `.reason` names the quarantine bucket.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import io
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from slowfast.video.geometry import short_side_size
from slowfast.video.sampling import num_target_frames

# Quarantine reasons, and how each is told apart:
# - missing_file: the path does not exist.
# - zero_bytes: the file (or byte buffer) is empty.
# - truncated: the file is shorter than its own container structure says (an MP4/MOV top-level
#   box, or the Matroska/WebM segment, runs past the end of the file: checked before opening and
#   again when decoding fails), or the video stream ends more than _TRUNCATION_SLACK_SEC before
#   the duration it declares while a requested time lies in the missing part.
# - not_a_video: FFmpeg cannot open it as a container (random bytes, text, a broken header), its
#   container format is not one of ACCEPTED_CONTAINERS (a playlist, a script, an image), or it
#   holds no streams at all.
# - no_video_stream: a valid container without a video stream (cover art does not count).
# - frame_too_large: width * height over max_pixels, from the stream header before any frame is
#   decoded, and again on every decoded frame (the size can change mid-stream).
# - too_many_frames: more frames decoded than the reader's max_frames (a caller's budget, e.g. a served
#   model's: a header may claim 1 s over a million tiny frames, so the duration alone bounds nothing).
# - decode_error: the demuxer or decoder raises while decoding the requested windows and the
#   file is not truncated. Damage the decoder conceals (it usually does for a few bad bytes in
#   H.264) gives a plausible picture and is not an error; damage outside the decoded windows is
#   never seen, since only the windows are decoded.
MISSING_FILE = "missing_file"
ZERO_BYTES = "zero_bytes"
TRUNCATED = "truncated"
NOT_A_VIDEO = "not_a_video"
NO_VIDEO_STREAM = "no_video_stream"
FRAME_TOO_LARGE = "frame_too_large"
TOO_MANY_FRAMES = "too_many_frames"
DECODE_ERROR = "decode_error"
REASONS = (
    MISSING_FILE,
    ZERO_BYTES,
    TRUNCATED,
    NOT_A_VIDEO,
    NO_VIDEO_STREAM,
    FRAME_TOO_LARGE,
    TOO_MANY_FRAMES,
    DECODE_ERROR,
)
_REASON_TEXT = {
    MISSING_FILE: "file not found",
    ZERO_BYTES: "file is empty",
    TRUNCATED: "file is truncated",
    NOT_A_VIDEO: "not a video file",
    NO_VIDEO_STREAM: "no video stream",
    FRAME_TOO_LARGE: "frame size over the limit",
    TOO_MANY_FRAMES: "more frames than allowed",
    DECODE_ERROR: "decode error mid-stream",
}

DEFAULT_MAX_PIXELS = 4096 * 2160  # DCI 4K; anything bigger is a decompression bomb here
DEFAULT_SHORT_SIDE = 256
# Without a keyframe index, decode forward instead of seeking across gaps shorter than this.
DEFAULT_RESEEK_GAP_SEC = 1.0
# With one, a seek costs this many frames of decoding on top of the frames from the keyframe on
# (the demuxer's jump, the decoder's flush and its first keyframe, dearer than the average frame),
# plus one frame per extra decode thread: a flush loses the frame each thread had in flight.
# Measured on 640x360 H.264 (the bench data videos): seeking to a keyframe 2 frames past the
# decode position lost to decoding through, 5 frames won (1 thread); with 2 threads 5 lost, 10 won.
SEEK_COST_FRAMES = 4
_MAX_AUTO_THREADS = 16  # FFmpeg's cap on the threads it picks itself
_EPS = 1e-6  # seconds; far below any real time base step (1/90000 s)
_TRUNCATION_SLACK_SEC = 0.5
_MAX_DECLARED_SEC = 1e7  # 115 days: a header declaring more is lying; the stream's timestamps are used instead

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# The demuxers FFmpeg may use, by FFmpeg's names: the containers of the extensions
# pipelines/ingest.py lists as video. mov: .mp4 .m4v .mov .3gp; matroska: .mkv .webm; mpegts: .ts
# .mts .m2ts; mpeg (program streams): .mpg .mpeg; asf: .wmv; ogg: .ogv. Each reads its streams from
# the file's own bytes. Any other demuxer is refused before it reads a header, above all those that
# open the files or URLs their input names: concat (ffconcat scripts), hls and dash (playlists),
# image2 (numbered image files). A video is untrusted bytes (a REST upload, a bucket object, a file
# in an annotation list) and must never make FFmpeg read the machine's files or the network.
ACCEPTED_CONTAINERS = ("mov", "matroska", "avi", "mpegts", "mpeg", "flv", "asf", "ogg")
_DEMUXER_OPTIONS = {
    "format_whitelist": ",".join(ACCEPTED_CONTAINERS),
    # Nothing is opened by URL: the container's bytes come from our file object, and an accepted
    # demuxer that asks for another file (a mov data reference) is refused whatever it names.
    "protocol_whitelist": "",
    "enable_drefs": "0",  # mov: no external data references (FFmpeg's default, pinned)
}


class VideoDecodeError(Exception):
    """A video that cannot be used, with the quarantine ``reason`` (one of ``REASONS``)."""

    def __init__(self, name: str, reason: str, detail: str = "", hint: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASONS}")
        self.name, self.reason, self.detail = name, reason, detail
        text = _REASON_TEXT[reason] + (f" ({detail})" if detail else "")
        text += f"; {hint}" if hint else ""
        super().__init__(f"VideoDecodeError: {name}: {text}")


@dataclass(frozen=True)
class VideoInfo:
    duration_sec: float  # of the video stream, from its first frame
    fps: float  # average frame rate
    num_frames: int  # as the container declares it, else duration * fps
    width: int  # display size: after rotation, before any resize
    height: int
    rotation: int  # degrees counterclockwise the player turns the coded frames (0, 90, 180, -90)
    codec: str
    has_audio: bool

    def frames_at(self, target_fps: float) -> int:
        """Length of the video resampled to ``target_fps``: the ``num_frames`` for planning."""
        return num_target_frames(self.duration_sec, target_fps)


@dataclass
class DecodeStats:
    """What decoding cost: frames out of the decoder, frames converted to RGB, seeks."""

    frames_decoded: int = 0
    frames_converted: int = 0
    seeks: int = 0


class VideoReader:
    """One open video: ``info`` at once, then any number of ``decode_windows`` or
    ``decode_stream`` calls.

    Time is in seconds from the first frame. The frame for time t is the one on screen at t:
    the last frame whose presentation time is <= t (the first frame for t before it, the last
    for t past the end). That resamples any source rate, constant or variable, to the target
    grid t = j / target_fps. Opening decodes the first frame: it carries the rotation and
    fixes time 0 (streams may start at any timestamp, negative included).
    """

    def __init__(
        self,
        source: Source,
        *,
        name: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        reseek_gap_sec: float = DEFAULT_RESEEK_GAP_SEC,
        seek_cost_frames: float | None = None,
        max_frames: int | None = None,
    ):
        self.name = name or _source_name(source)
        self.max_pixels = max_pixels
        self.reseek_gap_sec = reseek_gap_sec
        if seek_cost_frames is None:
            in_flight = threads or min(os.cpu_count() or 1, _MAX_AUTO_THREADS)
            seek_cost_frames = SEEK_COST_FRAMES + in_flight - 1
        self.seek_cost_frames = seek_cost_frames
        self.stats = DecodeStats()
        self._file, self._owns_file = _open_source(source, self.name)
        self.container = None
        self.max_frames = max_frames
        try:
            self._open(threads)
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _open(self, threads: int | None) -> None:
        shortfall = _container_shortfall(self._file)
        if shortfall:
            raise self._error(TRUNCATED, shortfall)
        try:
            self.container = self._open_container()
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
            # format_whitelist refuses with EINVAL, and no word on what it refused.
            refused = _refusal(self._file) if getattr(e, "errno", None) == errno.EINVAL else None
            raise self._error(NOT_A_VIDEO, refused or _ffmpeg_message(e)) from e
        streams = list(self.container.streams)
        if not streams:
            raise self._error(NOT_A_VIDEO, "the container holds no streams")
        video = [s for s in self.container.streams.video if not _is_cover_art(s)]
        if not video:
            kinds = sorted({s.type for s in streams})
            raise self._error(NO_VIDEO_STREAM, " + ".join(f"{k} only" for k in kinds))
        self.stream = stream = video[0]
        ctx = stream.codec_context
        self._check_size(ctx.width, ctx.height, "stream header")
        # Frame and slice threads, FFmpeg's count (one per core) unless told; a worker that
        # already runs one decode per core can pass threads=1.
        stream.thread_type = "AUTO"
        if threads is not None:
            ctx.thread_count = threads
        self._time_base = float(stream.time_base)
        # Timestamps are rounded to the time base (WebM: 1 ms), so a frame within half a tick
        # of t counts as starting at t; exact time bases keep exact answers.
        self._tol = max(_EPS, 0.5 * self._time_base)
        self._frames = None  # the active decode generator
        self._peeked = None  # (time, frame) pulled from the generator but not yet consumed
        self._last = None  # (time, frame): the last consumed frame
        self._at_start = True  # nothing decoded or sought since opening
        self._scaler, self._to_rgb = VideoReformatter(), VideoReformatter()
        self._origin_pts = None  # pts of the first frame: time 0
        first = self._peek()
        if first is None:
            raise self._error(DECODE_ERROR, "the video stream has no decodable frames")
        if self._origin_pts is None:  # the first frame had no pts
            self._origin_pts = 0
        self._keyframes = self._keyframe_index()
        self.info = self._describe(first[1])

    def _describe(self, first) -> VideoInfo:
        stream, container = self.stream, self.container
        rotation = _rotation(first, stream)
        self._turns = (rotation // 90) % 4 if rotation % 90 == 0 else 0
        declared = None
        if stream.duration:
            declared = _plausible(stream.duration * self._time_base)
        elif "DURATION" in stream.metadata:  # Matroska writes the track duration as a tag
            declared = _parse_clock(stream.metadata["DURATION"])
        elif len(container.streams) == 1 and container.duration:
            declared = _plausible(container.duration / av.time_base)  # the container's is the video's
        self._declared_sec = declared
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration = declared
        if duration is None and container.duration:
            duration = _plausible(container.duration / av.time_base)
        if duration is None and rate and stream.frames:
            duration = _plausible(stream.frames / float(rate))
        if duration is None:
            duration = self._scan_duration()
        fps = float(rate) if rate else (stream.frames / duration if stream.frames else 30.0)
        num_frames = stream.frames or max(1, round(duration * fps))
        w, h = first.width, first.height
        if self._turns % 2:
            w, h = h, w
        return VideoInfo(
            duration_sec=float(duration),
            fps=fps,
            num_frames=int(num_frames),
            width=w,
            height=h,
            rotation=rotation,
            codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )

    def _scan_duration(self) -> float:
        """Nothing declares a duration (raw streams): read the packets' timestamps, rewind."""
        end = 0.0
        count = 0
        try:
            for packet in self.container.demux(self.stream):
                count += packet.size > 0
                if packet.pts is not None:
                    tail = packet.pts - self._origin_pts + (packet.duration or 0)
                    end = max(end, tail * self._time_base)
        except av.FFmpegError as e:
            raise self._decode_failure(e) from e
        self._rewind()
        return end or count / float(self.stream.average_rate or 30)

    def _rewind(self) -> None:
        """Back to the first frame by reopening: works where seeking does not (raw streams)."""
        index = self.stream.index
        thread_count = self.stream.codec_context.thread_count
        self.container.close()
        try:
            self.container = self._open_container()
        except av.FFmpegError as e:
            raise self._decode_failure(e) from e
        self.stream = self.container.streams[index]
        self.stream.thread_type = "AUTO"
        self.stream.codec_context.thread_count = thread_count
        self._frames = None
        self._peeked = self._last = None
        self._at_start = True

    def _open_container(self):
        """The container from the start of the file, by an accepted demuxer only."""
        self._file.seek(0)
        # max_pixels reaches the stream-info probe's decoders too: a 16000x16000 header is refused before
        # av.open has decoded (and allocated) frames of that size, not after.
        options = {**_DEMUXER_OPTIONS, "max_pixels": str(self.max_pixels)}
        return av.open(self._file, "r", metadata_errors="replace", options=options)

    def _keyframe_index(self) -> list[float] | None:
        """Keyframe times (seconds, estimated) from the demuxer's index, if it has one.

        MP4 indexes every sample; Matroska only its cues, often just one, which says nothing.
        Index timestamps are decode times: a stream with B-frames decodes each keyframe a
        fixed delay before showing it, the gap between its first decode time and time 0.
        """
        try:
            entries = [(e.timestamp, e.is_keyframe) for e in self.stream.index_entries if not e.is_discard]
        except (AttributeError, TypeError):  # PyAV < 14 has no index_entries
            return None
        keys = sorted(ts for ts, key in entries if key)
        if len(keys) < 2:
            return None
        delay = max(self._origin_pts - min(ts for ts, _ in entries), 0)
        return [(ts + delay - self._origin_pts) * self._time_base for ts in keys]

    # -- decoding ---------------------------------------------------------------------------

    def frame_size(self, short_side: int | None = DEFAULT_SHORT_SIDE) -> tuple[int, int]:
        """(height, width) of the frames decoded with ``short_side``: upright, short side resized
        (None keeps the size)."""
        h, w = self.info.height, self.info.width
        return (h, w) if short_side is None else short_side_size(h, w, short_side)

    def decode_windows(
        self,
        windows: Sequence[Sequence[float]],
        *,
        short_side: int | None = DEFAULT_SHORT_SIDE,
        interpolation: str = "BILINEAR",
        stats: DecodeStats | None = None,
    ) -> list[np.ndarray]:
        """For each window (a list of times in seconds), the frames shown at those times as
        one (len(window), H, W, 3) uint8 array, resized and upright.

        All requested times are decoded in one ``decode_stream`` pass, so overlapping or
        adjacent windows share their frames.
        """
        before = DecodeStats(**vars(self.stats))
        times = sorted({float(t) for w in windows for t in w})
        shown = dict(
            zip(times, self.decode_stream(times, short_side=short_side, interpolation=interpolation), strict=False)
        )
        empty = np.empty((0, *self.frame_size(short_side), 3), np.uint8)
        out = [np.stack([shown[float(t)] for t in window]) if len(window) else empty for window in windows]
        if stats is not None:
            stats.frames_decoded += self.stats.frames_decoded - before.frames_decoded
            stats.frames_converted += self.stats.frames_converted - before.frames_converted
            stats.seeks += self.stats.seeks - before.seeks
        return out

    def decode_stream(
        self,
        times: Sequence[float],
        *,
        short_side: int | None = DEFAULT_SHORT_SIDE,
        interpolation: str = "BILINEAR",
    ) -> Iterator[np.ndarray]:
        """The frame shown at each of ``times`` (seconds, ascending), one (H, W, 3) uint8 array
        each, resized and upright, yielded as soon as it is decoded.

        One forward pass: between two times it decodes through, or seeks where the keyframe
        index says that skips more than ``seek_cost_frames`` frames, so dense times (eval views
        that cover the video) read it once in order and sparse ones jump. Only the last frame is
        held, so a consumer that encodes each frame as it comes keeps nothing else in memory.
        Times that show the same source frame yield the same array: treat it as read-only.
        """
        times = [float(t) for t in times]
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"{self.name}: decode_stream takes times in ascending order; sort them")
        h, w = self.frame_size(short_side)
        # Resize in coded orientation, turn afterwards.
        size = (h, w) if self._turns % 2 else (w, h)
        return self._stream(times, size, interpolation)

    def _stream(self, times: list[float], size: tuple[int, int], interpolation: str):
        frame = rgb = None
        for t in times:
            shown = self._frame_at(t)
            if shown is not frame:
                frame, rgb = shown, self._rgb(shown, size, interpolation)
            yield rgb

    def _frame_at(self, t: float):
        """The frame shown at ``t``; moves the decode position forward (or seeks)."""
        if self._needs_seek(t):
            self._seek(t, margin=0.0)
        margin = 1.0
        while True:
            while (nxt := self._peek()) is not None and nxt[0] <= t + self._tol:
                self._last, self._peeked = nxt, None
            if self._last is not None:
                if nxt is None:
                    self._check_not_truncated(t)
                return self._last[1]
            if self._at_start:
                if nxt is None:
                    raise self._error(DECODE_ERROR, "no frame decodes from the start")
                return nxt[1]  # t is before the first frame
            # The seek landed after t, or on nothing (inexact index, open GOP): further back.
            self._seek(t, margin=margin)
            margin *= 2

    def _needs_seek(self, t: float) -> bool:
        """Whether to seek before decoding forward to ``t``."""
        current = self._last or self._peeked
        if current is None:
            return False  # just sought: _frame_at decodes from there
        if t + self._tol < current[0]:
            # Behind the decode position, unless t merely precedes the very first frame.
            return not (self._last is None and self._at_start)
        # Ahead: seek only if that lands on a keyframe far enough past every frame in hand that
        # the frames it skips cost more than the seek.
        held = (self._peeked or self._last)[0]
        if self._keyframes is not None:
            k = bisect.bisect_right(self._keyframes, t + self._tol) - 1
            return k >= 0 and (self._keyframes[k] - held) * self.info.fps > self.seek_cost_frames
        return t - held > self.reseek_gap_sec

    def _seek(self, t: float, margin: float) -> None:
        target = t - margin
        self._last = self._peeked = None
        self._frames = None
        self.stats.seeks += 1
        if target <= 0:
            offset = self._origin_pts
            self._at_start = True
        else:
            offset = self._origin_pts + int(target / self._time_base)
            self._at_start = False
        try:
            self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as e:
            if not self._at_start:
                raise self._decode_failure(e) from e
            self._rewind()  # some demuxers cannot seek at all; reopening reaches the start

    def _peek(self):
        """The next decoded (time, frame), without consuming it; None at the end."""
        if self._peeked is not None:
            return self._peeked
        if self._frames is None:
            self._frames = self.container.decode(self.stream)
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except (av.FFmpegError, ValueError) as e:
            raise self._decode_failure(e) from e
        self.stats.frames_decoded += 1
        if self.max_frames is not None and self.stats.frames_decoded > self.max_frames:
            raise self._error(TOO_MANY_FRAMES, f"over max_frames {self.max_frames:,}", "raise max_frames to accept it")
        self._check_size(frame.width, frame.height, "decoded frame")
        if frame.pts is None:
            # No timestamp: one average frame after the previous frame.
            step = 1 / float(self.stream.average_rate or 30)
            base = self._last[0] if self._last is not None else -step
            self._peeked = (base + step, frame)
        else:
            if self._origin_pts is None:
                self._origin_pts = frame.pts
            self._peeked = ((frame.pts - self._origin_pts) * self._time_base, frame)
        return self._peeked

    def _rgb(self, frame, size: tuple[int, int], interpolation: str) -> np.ndarray:
        w, h = size
        # Resize in the decoder's pixel format (YUV), then convert at the output size: swscale
        # does the two steps ~4x faster than scaling straight into rgb24 (0.7 vs 2.9 ms at
        # 640x360 -> 455x256). Reformatters live as long as the reader: each keeps its swscale
        # context, which frame.reformat rebuilds for every frame.
        sized = frame
        if (w, h) != (frame.width, frame.height):
            sized = self._scaler.reformat(frame, width=w, height=h, interpolation=interpolation)
        rgb = self._to_rgb.reformat(sized, format="rgb24").to_ndarray()
        if self._turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, self._turns))
        self.stats.frames_converted += 1
        return rgb

    # -- failures ---------------------------------------------------------------------------

    def _check_size(self, width: int, height: int, where: str) -> None:
        if width and height and width * height > self.max_pixels:
            raise self._error(
                FRAME_TOO_LARGE,
                f"{where}: {width}x{height} = {width * height:,} pixels > max_pixels {self.max_pixels:,}",
                "raise max_pixels to accept it",
            )

    def _check_not_truncated(self, t: float) -> None:
        """At the end of the stream: was ``t`` inside what the container promised?"""
        if self._declared_sec is None:
            return
        last_t, frame = self._last
        frame_sec = (frame.duration or 0) * self._time_base or 1 / self.info.fps
        end = last_t + frame_sec
        if t > end and end + _TRUNCATION_SLACK_SEC < self._declared_sec:
            raise self._error(
                TRUNCATED,
                f"the video stream ends at {end:.2f} s, the container declares {self._declared_sec:.2f} s",
            )

    def _decode_failure(self, e: Exception) -> VideoDecodeError:
        shortfall = _container_shortfall(self._file)
        if shortfall:
            return self._error(TRUNCATED, shortfall)
        return self._error(DECODE_ERROR, _ffmpeg_message(e))

    def _error(self, reason: str, detail: str, hint: str = "") -> VideoDecodeError:
        return VideoDecodeError(self.name, reason, detail, hint)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        self._frames = None
        self._peeked = self._last = None
        if self.container is not None:
            self.container.close()
            self.container = None
        if self._owns_file and self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> VideoInfo:
    """Duration, rate, size (upright), rotation, codec; raises VideoDecodeError if unusable."""
    with VideoReader(source, name=name, max_pixels=max_pixels) as reader:
        return reader.info


def decode_windows(
    source: Source,
    windows: Sequence[Sequence[float]],
    *,
    short_side: int | None = DEFAULT_SHORT_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    interpolation: str = "BILINEAR",
    threads: int | None = None,
    stats: DecodeStats | None = None,
) -> list[np.ndarray]:
    """Open ``source`` once and decode several windows of times; see VideoReader."""
    with VideoReader(source, name=name, max_pixels=max_pixels, threads=threads) as reader:
        out = reader.decode_windows(windows, short_side=short_side, interpolation=interpolation)
        if stats is not None:  # everything this call did, opening included
            stats.frames_decoded += reader.stats.frames_decoded
            stats.frames_converted += reader.stats.frames_converted
            stats.seeks += reader.stats.seeks
        return out


def decode_frames(
    source: Source,
    times: Sequence[float],
    *,
    short_side: int | None = DEFAULT_SHORT_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    interpolation: str = "BILINEAR",
    threads: int | None = None,
    stats: DecodeStats | None = None,
) -> np.ndarray:
    """The frames shown at ``times`` (seconds from the first frame): (N, H, W, 3) uint8."""
    return decode_windows(
        source,
        [times],
        short_side=short_side,
        max_pixels=max_pixels,
        name=name,
        interpolation=interpolation,
        threads=threads,
        stats=stats,
    )[0]


# -- helpers ---------------------------------------------------------------------------------


def _source_name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _open_source(source: Source, name: str) -> tuple[BinaryIO, bool]:
    """A seekable binary file for ``source``, and whether we opened it (and must close it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        f, owns = io.BytesIO(source), True
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoDecodeError(name, MISSING_FILE, hint="check the path in the annotations")
        # Opened by descriptor, so the file object's name is a number: PyAV hands FFmpeg a file
        # object's name as its URL, and a path must not steer the demuxer (a .m3u8 or img%03d.png
        # name makes FFmpeg guess a playlist or an image sequence; relative names resolve from it).
        f, owns = open(os.open(path, os.O_RDONLY), "rb"), True
    else:
        f, owns = source, False
        if not f.seekable():
            f, owns = io.BytesIO(f.read()), True
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        if owns:
            f.close()
        raise VideoDecodeError(name, ZERO_BYTES, "0 bytes", "download it again")
    return f, owns


_MP4_TOP_BOXES = {
    b"ftyp",
    b"styp",
    b"moov",
    b"mdat",
    b"free",
    b"skip",
    b"wide",
    b"pnot",
    b"uuid",
    b"meta",
    b"moof",
    b"mfra",
    b"sidx",
    b"pdin",
}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MKV_SEGMENT = b"\x18\x53\x80\x67"


def _container_shortfall(f: BinaryIO) -> str | None:
    """Why the file is shorter than its own structure says, or None if it is not (or the
    format is not one we can check: only ISO-BMFF (MP4/MOV) and Matroska/WebM are)."""
    pos = f.tell()
    try:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        head = f.read(8)
        if len(head) == 8 and head[4:8] in _MP4_TOP_BOXES:
            return _mp4_shortfall(f, size)
        if head[:4] == _EBML_MAGIC:
            return _mkv_shortfall(f, size)
        return None
    finally:
        f.seek(pos)


def _mp4_shortfall(f: BinaryIO, size: int) -> str | None:
    pos = 0
    while pos < size:
        f.seek(pos)
        header = f.read(16)
        if len(header) < 8:
            return f"a box header at byte {pos:,} is cut off; the file has {size:,} bytes"
        box_size, box_type = struct.unpack(">I4s", header[:8])
        if box_size == 1:
            if len(header) < 16:
                return f"a box header at byte {pos:,} is cut off; the file has {size:,} bytes"
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            return None  # the last box runs to the end of the file by definition
        if box_size < 8 or not box_type.isalnum() and box_type not in _MP4_TOP_BOXES:
            return None  # not box structure any more: damaged, not short; FFmpeg decides
        if pos + box_size > size:
            name = box_type.decode("latin-1")
            return f"the '{name}' box at byte {pos:,} needs {pos + box_size:,} bytes, the file has {size:,}"
        pos += box_size
    return None


def _mkv_shortfall(f: BinaryIO, size: int) -> str | None:
    f.seek(4)
    header_size, n = _ebml_vint(f.read(8))
    if header_size is None:
        return None
    f.seek(4 + n + header_size)
    if f.read(4) != _MKV_SEGMENT:
        return None
    start = f.tell()
    seg_size, n = _ebml_vint(f.read(8))
    if seg_size is None:
        return None  # unknown size (live stream): nothing declared
    end = start + n + seg_size
    if end > size:
        return f"the Matroska segment needs {end:,} bytes, the file has {size:,}"
    return None


def _ebml_vint(data: bytes) -> tuple[int | None, int]:
    """An EBML variable-length size: (value or None if unknown/invalid, bytes used)."""
    if not data or data[0] == 0:
        return None, 0
    n = 8 - data[0].bit_length() + 1
    if len(data) < n:
        return None, 0
    value = data[0] & (0xFF >> n)
    for b in data[1:n]:
        value = (value << 8) | b
    if value == (1 << (7 * n)) - 1:
        return None, n  # all ones: unknown size
    return value, n


def _refusal(f: BinaryIO) -> str | None:
    """Why the allow-list refused ``f``, naming the container FFmpeg detected; None if it did not.

    FFmpeg says only "Invalid argument" when format_whitelist refuses a demuxer, so this asks
    its probe again which demuxer it picks for the first MiB (as av.open does: no file name).
    """
    probe_format = _ffmpeg_probe()
    if probe_format is None:
        return None
    pos = f.tell()
    try:
        f.seek(0)
        head = f.read(1 << 20)
    finally:
        f.seek(pos)
    padded = ctypes.create_string_buffer(head, len(head) + 64)  # AVPROBE_PADDING_SIZE zeros
    data = _AVProbeData(b"", ctypes.cast(padded, ctypes.c_char_p), len(head), None)
    score = ctypes.c_int(0)
    found = probe_format(ctypes.byref(data), 1, ctypes.byref(score))
    detected = found[0].decode() if found else None
    if detected is None or set(detected.split(",")) & set(ACCEPTED_CONTAINERS):
        return None
    accepted = ", ".join(ACCEPTED_CONTAINERS)
    return f"container format '{detected}' is not accepted; accepted: {accepted}"


class _AVProbeData(ctypes.Structure):
    _fields_ = [
        ("filename", ctypes.c_char_p),
        ("buf", ctypes.c_char_p),
        ("buf_size", ctypes.c_int),
        ("mime_type", ctypes.c_char_p),
    ]


@functools.cache
def _ffmpeg_probe():
    """av_probe_input_format3 of the libavformat PyAV loaded (an AVInputFormat's first field is
    its name), or None where it cannot be found (no /proc/self/maps: not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split(None, 5)[-1].strip() for line in maps if "/libavformat" in line]
    except OSError:
        return None
    if not paths:
        return None
    try:
        probe_format = ctypes.CDLL(paths[0]).av_probe_input_format3
    except (OSError, AttributeError):  # a library file gone since it was mapped, or another build
        return None
    probe_format.restype = ctypes.POINTER(ctypes.c_char_p)
    probe_format.argtypes = [ctypes.POINTER(_AVProbeData), ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    return probe_format


def _is_cover_art(stream) -> bool:
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except (AttributeError, TypeError):
        return False


def _rotation(frame, stream) -> int:
    """Degrees counterclockwise that a player turns the coded frame to show it upright."""
    rotation = getattr(frame, "rotation", None)  # PyAV >= 14: the display matrix side data
    if rotation is None:
        # Older FFmpeg exported the matrix as a clockwise 'rotate' tag.
        try:
            rotation = -int(float(stream.metadata.get("rotate", 0)))
        except ValueError:
            rotation = 0
    return (int(round(rotation)) + 179) % 360 - 179  # in (-180, 180]


def _parse_clock(text: str) -> float | None:
    """'HH:MM:SS.fffffffff' -> seconds; None for anything else (inf and nan included)."""
    try:
        h, m, s = text.split(":")
        return _plausible(int(h) * 3600 + int(m) * 60 + float(s))
    except ValueError:
        return None


def _plausible(seconds: float | None) -> float | None:
    """A duration a header declares, if it can be one: > 0 and under _MAX_DECLARED_SEC (a file may say anything:
    inf, nan, 1e308)."""
    return seconds if seconds is not None and 0 < seconds < _MAX_DECLARED_SEC else None


def _ffmpeg_message(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
