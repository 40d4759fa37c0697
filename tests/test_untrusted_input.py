"""Untrusted bytes stay video: inputs crafted to make FFmpeg read other files or the network (an ffconcat
script, HLS playlists with a local and an http segment, an image sequence, protocol strings as paths) are
refused as not_a_video by bytes and by path, and what they name is never opened: a FIFO there, or a listening
socket for the http segment, would notice. A positive control shows each would notice an unrestricted av.open.
test_serving.py sends the same inputs to `python -m pipelines predict` and to a real `mlflow models serve`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

from slowfast.video import decode as dec
from slowfast.video.decode import VideoDecodeError, VideoReader

from videos import encode_frame_number_video, frame_number_image, read_frame_numbers

MARKER = "marker.mp4"  # a FIFO beside the crafted file: what the file names
SEGMENT = "segment.ts"


@dataclass(frozen=True)
class Crafted:
    """One crafted input: its bytes, the file name that makes an unrestricted FFmpeg follow it, what it names
    (a file beside it, or "http" for the listener) and what the refusal's detail says."""

    name: str
    data: bytes
    filename: str
    target: str
    detail: str


CRAFTED = ("ffconcat", "hls_local_segment", "hls_http_segment", "image_sequence")


def crafted(name: str, port: int) -> Crafted:
    """One of CRAFTED; an http segment points at 127.0.0.1:`port`."""
    hls = "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n"
    # FFmpeg takes a playlist for HLS only by its .m3u8 name; by its bytes alone it is text, not a container.
    text = "Invalid data found when processing input"
    cases = [
        Crafted(
            "ffconcat",
            f"ffconcat version 1.0\nfile {MARKER}\n".encode(),
            "list.ffconcat",
            MARKER,
            "container format 'concat' is not accepted; accepted: mov, matroska, avi, mpegts, mpeg, flv, asf, ogg",
        ),
        Crafted("hls_local_segment", hls.format(SEGMENT).encode(), "local.m3u8", SEGMENT, text),
        Crafted(
            "hls_http_segment", hls.format(f"http://127.0.0.1:{port}/{SEGMENT}").encode(), "remote.m3u8", "http", text
        ),
        Crafted("image_sequence", png_bytes(), "img%03d.png", "img001.png", "container format 'png_pipe'"),
    ]
    return next(case for case in cases if case.name == name)


def png_bytes() -> bytes:
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "rgb24"
    return bytes(encoder.encode(av.VideoFrame.from_ndarray(frame_number_image(0, 64, 48), format="rgb24"))[0])


def write_crafted(case: Crafted, folder: Path) -> tuple[Path, Path]:
    """The crafted file under its telling name and under a .mp4 name; an image sequence gets its first image."""
    telling, disguised = folder / case.filename, folder / f"{case.name}.mp4"
    for path in (telling, disguised):
        path.write_bytes(case.data)
    if case.name == "image_sequence":
        (folder / "img000.png").write_bytes(case.data)
    return telling, disguised


class Watch:
    """Notices whether anyone opens `target` beside `folder`: a FIFO made there (opening one for reading
    blocks until a writer comes; a non-blocking open for writing succeeds only while a reader has it open, so
    this thread's success means the reader opened it, and it then lets the reader go on to end of file), or,
    for "http", a socket listening on `port`."""

    def __init__(self, folder: Path, target: str, port: int | None = None):
        self.opened = False
        self._stop = threading.Event()
        if target == "http":
            self._sock = socket.create_server(("127.0.0.1", port))
            self._sock.settimeout(0.05)
            self._poll = self._accept
        else:
            self.fifo = folder / target
            self.fifo.unlink(missing_ok=True)
            os.mkfifo(self.fifo)
            self._sock = None
            self._poll = self._open_for_writing
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._sock is not None:
            self._sock.close()
        else:
            self.fifo.unlink()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.opened |= self._poll()

    def _open_for_writing(self) -> bool:
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader
                raise
            time.sleep(0.002)
            return False
        os.close(fd)
        return True

    def _accept(self) -> bool:
        try:
            connection, _ = self._sock.accept()
        except TimeoutError:
            return False
        connection.close()
        return True


def attempt(call, timeout_s: float = 60) -> BaseException | None:
    """Run `call` in a thread (a decoder stuck opening a FIFO must not hang the test); its exception or None."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test, which asserts on it
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert outcome, f"still running after {timeout_s} s"
    return outcome[0]


def open_reader(source) -> None:
    with VideoReader(source) as reader:
        reader.decode_windows([[0.0, 0.1]])


def open_unrestricted(source) -> None:
    """av.open as decode.py called it before the allow-list (a path opened by name), then every frame."""
    with av.open(open(source, "rb") if isinstance(source, Path) else source) as container:
        for _ in container.decode(video=0):
            pass


@pytest.fixture
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_input_is_refused_and_what_it_names_never_opened(name, tmp_path, monkeypatch, port):
    monkeypatch.chdir(tmp_path)  # bytes have no folder: FFmpeg resolves the names they hold from here
    case = crafted(name, port)
    telling, disguised = write_crafted(case, tmp_path)
    for source in (case.data, telling, str(disguised), io.BytesIO(case.data)):
        with Watch(tmp_path, case.target, port) as watch:
            error = attempt(lambda source=source: open_reader(source))
        assert not watch.opened, f"{source!r}: the decoder opened {case.target}"
        assert isinstance(error, VideoDecodeError), f"{source!r}: {error!r}"
        assert error.reason == dec.NOT_A_VIDEO and case.detail in error.detail, str(error)
        assert "\n" not in str(error)


# The form in which an unrestricted FFmpeg falls for each: bytes for ffconcat (names resolve from the working
# directory), a file object named by its path for HLS (the name makes it a playlist), the path as a URL for
# the image pattern.
CONTROLS = {"ffconcat": "bytes", "hls_local_segment": "file", "hls_http_segment": "file", "image_sequence": "url"}


@pytest.mark.parametrize("name", CONTROLS)
def test_control_the_watch_sees_an_unrestricted_ffmpeg_open_what_the_input_names(name, tmp_path, monkeypatch, port):
    monkeypatch.chdir(tmp_path)
    case = crafted(name, port)
    telling, _ = write_crafted(case, tmp_path)
    source = {"bytes": io.BytesIO(case.data), "file": telling, "url": str(telling)}[CONTROLS[name]]
    with Watch(tmp_path, case.target, port) as watch:
        attempt(lambda: open_unrestricted(source))
    assert watch.opened, f"an unrestricted av.open did not open {case.target}: the watch cannot fail"


@pytest.mark.parametrize(
    "protocol_path",
    ["concat:part.mp4|marker.mp4", f"subfile,,start,0,end,0,,:{MARKER}", "http://127.0.0.1:{port}/segment.ts"],
)
def test_a_path_is_a_file_name_never_a_url(protocol_path, tmp_path, monkeypatch, port):
    monkeypatch.chdir(tmp_path)
    encode_frame_number_video(tmp_path / "part.mp4", 5)
    path = protocol_path.format(port=port)
    target = "http" if path.startswith("http") else MARKER
    with Watch(tmp_path, target, port) as watch:
        error = attempt(lambda: open_reader(path))
    assert isinstance(error, VideoDecodeError) and error.reason == dec.MISSING_FILE, repr(error)
    assert not watch.opened
    if target == MARKER:  # control: FFmpeg given the string as a URL opens the marker
        with Watch(tmp_path, MARKER) as watch:
            attempt(lambda: open_unrestricted(path))
        assert watch.opened
    # A file that has such a name is that file: its own frames.
    literal = tmp_path / path
    literal.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "part.mp4", literal)
    with Watch(tmp_path, target, port) as watch, VideoReader(str(literal)) as reader:
        frames = reader.decode_windows([[0.0, 4 / 30]], short_side=None)[0]
    assert read_frame_numbers(frames) == [0, 4] and not watch.opened


@pytest.mark.parametrize(
    "fmt, codec, ext",
    [
        ("mp4", "libx264", "mp4"),
        ("mov", "libx265", "mov"),
        ("matroska", "libx264", "mkv"),
        ("webm", "libvpx-vp9", "webm"),
        ("avi", "mpeg4", "avi"),
        ("mpegts", "libx264", "ts"),
        ("mpeg", "mpeg2video", "mpg"),
        ("flv", "flv", "flv"),
        ("asf", "wmv2", "wmv"),
        ("ogg", "libvpx", "ogv"),
    ],
)
def test_every_accepted_container_decodes(fmt, codec, ext, tmp_path):
    video = encode_frame_number_video(tmp_path / f"v.{ext}", 30, codec=codec, container_format=fmt)
    for source in (video.path, video.path.read_bytes()):
        with VideoReader(source) as reader:
            frames = reader.decode_windows([[0.0, 0.5]], short_side=None)[0]
            assert set(reader.container.format.name.split(",")) & set(dec.ACCEPTED_CONTAINERS)
        assert read_frame_numbers(frames) == [0, 15] and frames.shape == (2, 96, 128, 3)


def test_a_raw_elementary_stream_is_refused_by_name(tmp_path):
    """Not a container: the decoder names what FFmpeg found."""
    video = encode_frame_number_video(tmp_path / "v.h264", 10, container_format="h264")
    with pytest.raises(VideoDecodeError, match="container format 'h264' is not accepted") as caught:
        VideoReader(video.path)
    assert caught.value.reason == dec.NOT_A_VIDEO


def _one_keyframe_h264(frames: int, rate: int, size=(64, 48)) -> bytes:
    """An MP4 of `frames` near-empty frames after one keyframe: tiny on disk, every frame decoded to reach the last."""
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(
            "libx264",
            rate=rate,
            options={"preset": "ultrafast", "crf": "51", "x264-params": "keyint=infinite:scenecut=0:bframes=0"},
        )
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 100, np.uint8), format="rgb24")
        for i in range(frames):
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def test_a_frame_budget_bounds_what_a_short_declared_duration_hides():
    """2,000 frames declared as 1 s (2,000 fps): the duration bounds nothing, max_frames does, as it decodes."""
    data = _one_keyframe_h264(2000, rate=2000)
    with VideoReader(data) as reader:
        assert reader.info.duration_sec == pytest.approx(1.0, abs=0.01)
        assert len(list(reader.decode_stream([0.999]))) == 1 and reader.stats.frames_decoded >= 1998
    with VideoReader(data, max_frames=500) as reader:
        with pytest.raises(VideoDecodeError) as refused:
            list(reader.decode_stream([0.999]))
        assert reader.stats.frames_decoded == 501
    assert refused.value.reason == dec.TOO_MANY_FRAMES
    assert "more frames than allowed (over max_frames 500); raise max_frames to accept it" in str(refused.value)


@pytest.mark.parametrize("tag", ["00:00:inf", "00:00:nan", "-1:00:00", "00:00:00", "0:0:1e308", "99999999:00:00"])
def test_a_matroska_duration_tag_that_cannot_be_one_is_ignored(tag):
    """A DURATION tag of inf, nan, a negative or zero is no duration: the stream's own timestamps are used (it used
    to raise OverflowError, which stopped every preprocess run)."""
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 5, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    data = buf.getvalue()
    written = data.index(b"00:00:02.000000000")
    crafted = data[:written] + tag.encode().ljust(18) + data[written + 18 :]
    with VideoReader(crafted) as reader:
        assert reader.info.duration_sec == pytest.approx(2.0, abs=0.05)
        assert reader.info.num_frames == 50
