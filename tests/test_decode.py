"""PyAV decoding on real encoded videos whose frames show their own number: the clips hold
exactly the frames the reference arithmetic names, and every broken file gets its reason."""

import io
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from slowfast.video import decode as dec
from slowfast.video.decode import (
    DecodeStats,
    VideoDecodeError,
    VideoReader,
    decode_frames,
    decode_windows,
    probe,
)
from slowfast.video.geometry import short_side_size
from slowfast.video.sampling import plan_clips

from videos import (
    encode_audio_only,
    encode_frame_number_video,
    frame_number_image,
    read_frame_number,
    read_frame_numbers,
)

TARGET_FPS = 30
T, TAU, ALPHA = 8, 8, 4  # slowfast_8x8: 64-frame windows, 32 Fast frames

# name: (encoder settings, display width, height). Each is ~200 frames of 128x96 or so.
VARIANTS = {
    "h264_30fps": dict(codec="libx264", fps=30),
    "h264_25fps": dict(codec="libx264", fps=25),
    "h264_29.97fps": dict(codec="libx264", fps=Fraction(30000, 1001)),
    "h264_60fps": dict(codec="libx264", fps=60),
    "h264_odd_173x97": dict(codec="libx264", fps=30, width=173, height=97, pix_fmt="yuv444p"),
    "mpeg4_odd_173x97_25fps": dict(codec="mpeg4", fps=25, width=173, height=97),
    "vp9_webm_30fps": dict(codec="libvpx-vp9", fps=30, container_format="webm"),
    "hevc_29.97fps": dict(codec="libx265", fps=Fraction(30000, 1001)),
    # Irregular gaps of 5-70 ms (time base 1 ms); no B-frames, see the VFR test below.
    "h264_vfr": dict(codec="libx264", fps=30, time_base=Fraction(1, 1000), bframes=0, pts="vfr"),
    # Streams that do not start at timestamp 0: MPEG-TS (1.4 s by default) and MP4 at 1.5 s.
    "h264_mpegts_offset_start": dict(codec="libx264", fps=30, container_format="mpegts"),
    "h264_mp4_offset_start": dict(codec="libx264", fps=30, time_base=Fraction(1, 15360), pts="offset"),
    "h264_rotated_90": dict(codec="libx264", fps=30, rotation=90),
    "h264_rotated_-90_with_audio": dict(codec="libx264", fps=30, rotation=-90, audio=True, width=96, height=128),
}
NUM_FRAMES = 200


def _vfr_pts(n):
    rng = np.random.default_rng(5)
    return np.concatenate([[0], np.cumsum(rng.integers(5, 70, n - 1))]).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, settings in VARIANTS.items():
        settings = dict(settings)
        if not _encoder_available(settings["codec"]):
            continue
        pts = settings.pop("pts", None)
        if pts == "vfr":
            settings["pts"] = _vfr_pts(NUM_FRAMES)
        elif pts == "offset":
            settings["pts"] = [23040 + 512 * i for i in range(NUM_FRAMES)]
        ext = {"webm": "webm", "mpegts": "ts"}.get(settings.get("container_format"), "mp4")
        out[name] = encode_frame_number_video(root / f"{name}.{ext}", NUM_FRAMES, gop=30, **settings)
    return out


def _encoder_available(codec):
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:
        return False


def _expected(video, indices):
    """Source frame on screen at target frame j (time j / 30), from the encoded timestamps."""
    return [video.shown_at(Fraction(int(j), TARGET_FPS)) for j in indices]


def test_frame_number_pattern_reads_back():
    for i in (0, 1, 2, 511, 512, 1023):
        assert read_frame_number(frame_number_image(i, 128, 96)) == i
        assert read_frame_number(frame_number_image(i, 173, 97)) == i
    # Upside down, the markers are wrong: a rotation mistake cannot read as a number.
    assert read_frame_number(np.rot90(frame_number_image(5, 128, 96), 2)) == -1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_clips_hold_the_frames_the_reference_names(videos, name):
    if name not in videos:
        pytest.skip(f"encoder for {name} not in this PyAV build")
    video = videos[name]
    info = probe(video.path)
    n = info.frames_at(TARGET_FPS)
    evals = plan_clips(n, T=T, tau=TAU, alpha=ALPHA, mode="eval", num_clips=10)
    trains = plan_clips(n, T=T, tau=TAU, alpha=ALPHA, mode="train", num_clips=2, seed=0, video_id=name)
    plans = [evals[0], evals[5], evals[9], *trains]
    # Also the very end: the last 32 target frames of the video.
    end = list(range(n - ALPHA * T, n))
    windows = [p.times(TARGET_FPS) for p in plans] + [[j / TARGET_FPS for j in end]]
    stats = DecodeStats()
    clips = decode_windows(video.path, windows, short_side=256, stats=stats)

    for plan, clip in zip(plans, clips[:-1], strict=True):
        assert read_frame_numbers(clip) == _expected(video, plan.indices), plan
    assert read_frame_numbers(clips[-1]) == _expected(video, end)
    assert _expected(video, end)[-1] >= NUM_FRAMES - 2  # within a target frame of the end

    # Upright display size, short side resized to 256 (long side floored, like the reference).
    assert (info.width, info.height) == (video.width, video.height)
    h, w = short_side_size(video.height, video.width, 256)
    assert all(clip.shape == (ALPHA * T, h, w, 3) and clip.dtype == np.uint8 for clip in clips)
    assert stats.frames_converted <= sum(len(w) for w in windows)


def test_29_97_fps_repeats_a_frame_at_the_start(videos):
    # Source frame k starts at k * 1001 / 30000 s; target frame j at j / 30 s shows
    # k = floor(j * 1000 / 1001): frame 1 starts 1/30000 s after 1/30 s, so frame 0 shows
    # twice (and then once in every 1001 target frames). Exact to the time base tick.
    video = videos["h264_29.97fps"]
    clip = decode_frames(video.path, [j / TARGET_FPS for j in range(8)], short_side=None)
    assert read_frame_numbers(clip) == [0, 0, 1, 2, 3, 4, 5, 6]


def test_25_and_60_fps_repeat_and_skip_frames(videos):
    times = [j / TARGET_FPS for j in range(12)]
    frames_25 = read_frame_numbers(decode_frames(videos["h264_25fps"].path, times, short_side=None))
    frames_60 = read_frame_numbers(decode_frames(videos["h264_60fps"].path, times, short_side=None))
    assert frames_25 == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]  # floor(j * 25 / 30)
    assert frames_60 == list(range(0, 24, 2))


def test_variable_frame_rate_uses_timestamps(videos):
    video = videos["h264_vfr"]
    gaps = np.diff([float(t) for t in video.times])
    assert gaps.min() < 0.01 and gaps.max() > 0.06  # really irregular
    info = probe(video.path)
    assert info.duration_sec == pytest.approx(float(video.times[-1]), abs=0.1)
    n = info.frames_at(TARGET_FPS)
    times = [j / TARGET_FPS for j in range(n)]
    clip = decode_frames(video.path, times, short_side=None)
    assert read_frame_numbers(clip) == _expected(video, range(n))


def test_time_zero_is_the_first_frame_shown(videos, tmp_path):
    for name in ("h264_mpegts_offset_start", "h264_mp4_offset_start"):
        with av.open(str(videos[name].path)) as c:
            assert c.streams.video[0].start_time > 0
        clip = decode_frames(videos[name].path, [0.0, 0.5], short_side=None)
        assert read_frame_numbers(clip) == [0, 15]
    # Negative timestamps: MP4 keeps the first 10 frames before its presentation start (an
    # edit list), so the container shows frame 10 at time 0, and so do we.
    video = encode_frame_number_video(
        tmp_path / "neg.mp4", 60, time_base=Fraction(1, 15360), pts=[512 * (i - 10) for i in range(60)]
    )
    clip = decode_frames(video.path, [0.0, 0.5], short_side=None)
    assert read_frame_numbers(clip) == [10, 25]
    assert probe(video.path).frames_at(TARGET_FPS) == 50


def test_rotation_metadata_turns_frames_upright(videos):
    for name, rotation in (("h264_rotated_90", 90), ("h264_rotated_-90_with_audio", -90)):
        video = videos[name]
        info = probe(video.path)
        assert info.rotation == rotation
        # The coded frames are the other way round: PyAV stores them turned.
        with av.open(str(video.path)) as c:
            coded = c.streams.video[0].codec_context
            assert (coded.width, coded.height) == (video.height, video.width)
        clip = decode_frames(video.path, [0.0, 1.0], short_side=None)
        assert clip.shape[1:3] == (video.height, video.width)
        assert read_frame_numbers(clip) == [0, 30]


def test_upside_down_video(tmp_path):
    video = encode_frame_number_video(tmp_path / "r180.mp4", 20, rotation=180)
    assert probe(video.path).rotation == 180
    clip = decode_frames(video.path, [0.0, 0.5], short_side=None)
    assert clip.shape[1:3] == (96, 128) and read_frame_numbers(clip) == [0, 15]


def test_rotation_is_the_real_mp4_display_matrix(videos):
    # What a phone writes for a portrait video (QuickTime's tkhd matrix a=0 b=1 c=-1 d=0,
    # "rotate 90 clockwise"), read from the file's bytes, not through FFmpeg.
    data = videos["h264_rotated_-90_with_audio"].path.read_bytes()
    tkhd = data.find(b"tkhd")
    version = data[tkhd + 4]
    matrix_at = tkhd + 4 + 4 + (32 if version == 1 else 20) + 8 + 2 + 2 + 2 + 2
    a, b, u, c, d, v, x, y, w = struct.unpack(">9i", data[matrix_at : matrix_at + 36])
    assert (a, b, c, d) == (0, 1 << 16, -(1 << 16), 0)


def test_audio_stream_is_ignored(videos):
    video = videos["h264_rotated_-90_with_audio"]
    with av.open(str(video.path)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
    assert probe(video.path).has_audio
    assert not probe(videos["h264_30fps"].path).has_audio


def test_probe_reports_the_stream(videos):
    info = probe(videos["h264_29.97fps"].path)
    assert info.fps == pytest.approx(30000 / 1001)
    assert info.num_frames == NUM_FRAMES
    assert info.duration_sec == pytest.approx(NUM_FRAMES * 1001 / 30000, abs=1e-3)
    assert info.frames_at(30) == 201  # 6.673 s: instants 0 .. 200/30 s
    assert info.codec == "h264" and info.rotation == 0
    assert (info.width, info.height) == (128, 96)


def test_bytes_and_file_objects_decode_like_paths(videos):
    video = videos["h264_30fps"]
    times = [j / TARGET_FPS for j in (0, 100, 199)]
    from_path = decode_frames(video.path, times, short_side=64)
    from_bytesio = decode_frames(io.BytesIO(video.path.read_bytes()), times, short_side=64)
    from_bytes = decode_frames(video.path.read_bytes(), times, short_side=64)
    np.testing.assert_array_equal(from_path, from_bytesio)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert read_frame_numbers(from_path) == [0, 100, 199]
    assert from_path.shape == (3, 64, 85, 3)


def test_short_video_repeats_frames_and_is_flagged(tmp_path):
    video = encode_frame_number_video(tmp_path / "short.mp4", 40)  # 1.33 s < a 64-frame clip
    n = probe(video.path).frames_at(TARGET_FPS)
    assert n == 40
    (plan,) = plan_clips(n, T=T, tau=TAU, alpha=ALPHA, mode="eval", num_clips=1)
    assert plan.short
    clip = decode_frames(video.path, plan.times(TARGET_FPS), short_side=None)
    numbers = read_frame_numbers(clip)
    assert numbers == plan.indices.tolist()
    assert numbers[-12:] == [39] * 12  # clamped: the last frame repeats


def test_seeking_decodes_only_near_the_window(tmp_path):
    # 10 s at 30 fps, a keyframe every second.
    video = encode_frame_number_video(tmp_path / "long.mp4", 300, gop=30)
    whole = DecodeStats()
    decode_frames(video.path, [j / TARGET_FPS for j in range(300)], short_side=None, stats=whole)
    assert whole.frames_decoded == 300 and whole.seeks == 0  # open + all the rest, in order

    near_end = DecodeStats()
    clip = decode_frames(video.path, [j / TARGET_FPS for j in range(250, 282)], short_side=None, stats=near_end)
    assert read_frame_numbers(clip) == list(range(250, 282))
    # Opening decodes frame 0; one seek lands on the keyframe at 240; decoding stops at 282,
    # the frame that shows 281 has ended.
    assert near_end.seeks == 1
    assert near_end.frames_decoded == 1 + (282 - 240 + 1)

    two_clips = DecodeStats()
    plans = plan_clips(300, T=T, tau=TAU, alpha=ALPHA, mode="train", num_clips=2, seed=1, video_id="long")
    clips = decode_windows(video.path, [p.times(TARGET_FPS) for p in plans], short_side=None, stats=two_clips)
    for plan, clip in zip(plans, clips, strict=True):
        assert read_frame_numbers(clip) == plan.indices.tolist()
    assert two_clips.frames_decoded < 2 * (64 + 30) + 3 < 300


def test_overlapping_windows_share_decoded_frames(videos):
    video = videos["h264_30fps"]
    stats = DecodeStats()
    a = [j / TARGET_FPS for j in range(10, 40)]
    b = [j / TARGET_FPS for j in range(20, 50)]
    with VideoReader(video.path) as reader:
        clip_b, clip_a = reader.decode_windows([b, a], short_side=None, stats=stats)
        assert read_frame_numbers(clip_b) == list(range(20, 50))
        assert read_frame_numbers(clip_a) == list(range(10, 40))
        # The same reader goes back for another window.
        (again,) = reader.decode_windows([[0.0, 0.5]], short_side=None)
        assert read_frame_numbers(again) == [0, 15]
    assert stats.frames_converted == 40


# -- quarantine ------------------------------------------------------------------------------


def _reason(source, **kwargs):
    """Probe and decode every frame; the reason of the error raised."""
    with pytest.raises(VideoDecodeError) as err:
        with VideoReader(source, **kwargs) as reader:
            n = reader.info.frames_at(TARGET_FPS)
            reader.decode_windows([[j / TARGET_FPS for j in range(n)]], short_side=None)
    return err.value


@pytest.fixture(scope="module")
def good_mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "good.mp4"
    return encode_frame_number_video(path, 150, width=160, height=120, gop=30).path.read_bytes()


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.mp4").reason == dec.MISSING_FILE


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert _reason(tmp_path / "empty.mp4").reason == dec.ZERO_BYTES
    assert _reason(io.BytesIO(b"")).reason == dec.ZERO_BYTES


def test_truncated_mp4_without_its_index(good_mp4):
    # FFmpeg's default MP4 layout puts the index (moov) last: the first 40% has no index.
    err = _reason(good_mp4[: int(len(good_mp4) * 0.4)])
    assert err.reason == dec.TRUNCATED
    assert "'mdat' box" in err.detail


def test_truncated_mp4_with_its_index_first(good_mp4, tmp_path):
    # "faststart" MP4 (index first, as web videos are): opens fine, the media data is short.
    path = tmp_path / "faststart.mp4"
    with av.open(io.BytesIO(good_mp4)) as src, av.open(str(path), "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    assert probe(data).num_frames == 150  # the whole file is fine
    assert _reason(data[: int(len(data) * 0.6)]).reason == dec.TRUNCATED


def test_truncated_webm(tmp_path):
    video = encode_frame_number_video(tmp_path / "v.webm", 90, codec="libvpx-vp9", container_format="webm")
    data = video.path.read_bytes()
    assert _reason(data[: int(len(data) * 0.6)]).reason == dec.TRUNCATED


def test_truncated_stream_that_declares_no_size(tmp_path):
    # A Matroska segment of unknown size (as live recorders write it): nothing in the file
    # structure is short, but the stream ends well before the duration it declares.
    video = encode_frame_number_video(tmp_path / "v.webm", 150, codec="libvpx-vp9", container_format="webm")
    data = bytearray(video.path.read_bytes())
    seg = data.find(bytes.fromhex("18538067"))
    data[seg + 4 : seg + 12] = bytes.fromhex("01ffffffffffffff")
    cut = bytes(data[: int(len(data) * 0.6)])
    assert probe(cut).duration_sec == pytest.approx(5.0)
    err = _reason(cut)
    assert err.reason == dec.TRUNCATED and "declares 5.00 s" in err.detail


def test_random_bytes_are_not_a_video():
    junk = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    assert _reason(junk).reason == dec.NOT_A_VIDEO
    assert _reason(b"label,youtube_id,time_start,time_end,split\n" * 50).reason == dec.NOT_A_VIDEO


def test_audio_only_has_no_video_stream(tmp_path):
    path = encode_audio_only(tmp_path / "x_000010_000020.mp4")
    err = _reason(path, name="train/abseiling/x_000010_000020.mp4")
    assert err.reason == dec.NO_VIDEO_STREAM
    assert str(err) == ("VideoDecodeError: train/abseiling/x_000010_000020.mp4: no video stream (audio only)")


def test_frame_over_the_pixel_limit(good_mp4):
    err = _reason(good_mp4, max_pixels=160 * 120 - 1)
    assert err.reason == dec.FRAME_TOO_LARGE
    assert "stream header: 160x120" in err.detail  # refused before decoding a frame
    assert probe(good_mp4, max_pixels=160 * 120).width == 160


def test_corrupt_bytes_mid_stream_are_a_decode_error(good_mp4):
    data = bytearray(good_mp4)
    mdat = data.find(b"mdat")
    middle = mdat + (len(data) - mdat) // 2
    data[middle : middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    err = _reason(bytes(data))
    assert err.reason == dec.DECODE_ERROR
    # Only decoded windows are checked: the first second is intact and decodes.
    assert read_frame_numbers(decode_frames(bytes(data), [0.0, 0.5], short_side=None)) == [0, 15]


def test_reasons_are_exported():
    assert set(dec.REASONS) == {
        "missing_file",
        "zero_bytes",
        "truncated",
        "not_a_video",
        "no_video_stream",
        "frame_too_large",
        "too_many_frames",
        "decode_error",
    }
    with pytest.raises(ValueError):
        VideoDecodeError("x.mp4", "gremlins")
