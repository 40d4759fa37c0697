"""A synthetic Kinetics-layout dataset whose classes differ by motion only, and a general PyAV encoder.

`write_dataset` renders real H.264 `.mp4` files under `<split>/<label>/<youtube_id>_<start>_<end>.mp4` with
official-format annotation CSVs; `encode_video` is the encoder behind it, reusable for any codec a test needs.

The classes, in the fixed order that `--classes N` takes the first N of:

  #  label                    seen by     motion (everything else is random per video)
  0  scrolling up             slow        the whole scene slides up, 0.4-0.6 frame heights per second
  1  stripes drifting up      fast only   the stripes inside the still object drift up at 2.4-5.4 cycles/s
  2  stripes drifting down    fast only   the stripes inside the still object drift down at 2.4-5.4 cycles/s
  3  bouncing                 slow        the object moves up and down at 0.4-0.6 frame heights per second
  4  flickering smoothly      fast only   object brightness follows Gaussian noise correlated over ~0.09 s
  5  flickering erratically   fast only   object brightness, same noise level, independent every frame
  6  standing still           slow        nothing moves
  7  scrolling down           slow        the whole scene slides down, 0.4-0.6 frame heights per second
  8  wobbling                 fast only   object position wanders, Gaussian noise correlated over ~0.09 s
  9  jittering                fast only   object position, same noise level, independent every frame
 10  pulsing                  slow        the object and its stripes swell and shrink at x2.6-3.2 per second

"slow" classes are told apart by the slow pathway alone; "fast only" classes come in adjacent pairs that the
slow pathway's samples cannot tell apart (below), so any N >= 3 includes at least one complete pair, and
N = 6 (the demo) holds 2 slow classes and 2 pairs, N = 8 (the ablation study) 4 and 2: a Slow-only network can
score at most 4/6 = 67% or 6/8 = 75% there.
Pulsing comes last: training slowfast_tiny on 8 x 30 videos for 600 steps on a CPU, it was the class most
often missed (taken for standing still), and the demo has little room to spare.
Nothing in the set is left/right or clockwise/anticlockwise: a horizontal flip (training augmentation) maps every
class onto itself.

Appearance. Every video draws its background (two colours blended by smooth periodic noise), its object (shape,
aspect, angle, size, position) and the object's stripes (two colours, period 0.15-0.25 frame heights, within 30
degrees of horizontal, phase) from one distribution, whatever its class. A frame on its own says nothing about the
class, except that bouncing and pulsing objects, whose motion is a change of place or size, reach places and
sizes that others don't. Lengths scale with the frame height and times are in seconds, so any size and frame
rate keeps the classes; after a resize to a 64-pixel short side a stripe period is still at least 9 pixels.

Why the fast-only pairs are invisible to the slow pathway. The pipeline resamples to 30 fps; slowfast_tiny's fast
pathway sees every 2nd frame (15 Hz, Nyquist 7.5 Hz), its slow pathway every 10th (3 Hz, Nyquist 1.5 Hz; a
Slow-only network sampling at tau = 8 sees every 8th, 3.75 Hz). Clips start anywhere.

* Drifting stripes (wagon-wheel aliasing). A sinusoidal grating drifting at temporal frequency f shifts its phase
  by f / rate cycles per sampled frame, and a phase step of x cycles looks exactly like x - 1: a step of 0.3
  cycles up is the same picture as 0.7 cycles down. f is drawn uniformly from a band exactly one slow sampling
  rate wide (2.4-5.4 Hz, all above the slow Nyquist), so the step between slow frames, modulo one cycle, is
  uniform on [0, 1) for both directions: the slow frames of "up" and "down" videos have the same distribution.
  That is exact at 3 Hz (no classifier can beat 50%); at slow strides of 8, 9, 11, 12 or 16 frames (tau = 8
  Slow-only, the 4x16 preset) even a perfect reading of the step scores at most 56%. (Near 3 Hz the slow frames
  even show the stripes standing still, like a filmed wagon wheel.) At 15 Hz the step is 0.16-0.36 cycles,
  always under half a cycle, so its sign is the direction.
* Smooth versus erratic noise (flicker, wobble). Both classes of a pair modulate the object's brightness (or
  position) by stationary Gaussian noise with the same variance: "smooth" noise has a Gaussian autocorrelation
  with a 0.09 s standard deviation, "erratic" noise is independent per frame. The law of Gaussian samples is fixed
  by their covariance; frames 8 or more apart (0.27 s) correlate by at most 0.012 in the smooth class and 0 in the
  erratic one, so slow frames are, to that precision, i.i.d. with the same variance in both. Frames 2 apart
  (1/15 s) correlate by 0.76 versus 0: the fast pathway sees smooth change against frame-to-frame noise.

The slow classes are plain at 3 Hz. Between slow frames scrolling moves everything by 0.13-0.20 frame heights,
bouncing moves the object by at most 0.20, pulsing changes its size by at most x1.48; the object's outline and the
background (noise, periodic only over a whole frame height) show the motion without ambiguity. The stripes they
carry along move at most 0.27 cycles per fast frame, so at 15 Hz they never alias either. No motion blur is
rendered, so a single frame carries no trace of speed.

Determinism. Each video is rendered from its own generator, seeded by (seed, class index, video index), so one
video can be regenerated alone and adding classes or videos leaves the others unchanged; nothing reads numpy's
global random state. Given the arguments, a file's bytes depend on the numpy and PyAV (FFmpeg, x264) builds and
the CPU's instruction sets, never on the process: each encoder runs on one thread whatever the CPU count (x264
encodes other bytes with another thread count, and its automatic count follows the CPUs), so `write_dataset`
gets its speed by encoding several videos at once instead; RGB is converted to the encoder's pixel format with
swscale's exact C arithmetic (PyAV's implicit conversion runs whichever SIMD code FFmpeg picks, and that code
rounds differently); x264 runs without its macroblock-tree rate control (mbtree=0), which reads heap memory it
has not written, so that with it the bytes followed whatever earlier work in the process had left in the heap;
muxers run with `fflags=+bitexact` (no library version or creation time in the file). The instruction sets still
count where x264 or numpy pick SIMD code: x264's C and SSE2 code encode other bytes than
its SSSE3-and-newer code, for instance.

Annotations follow the official Kinetics-400 CSVs: header `label,youtube_id,time_start,time_end,split`, labels in
plain words with spaces (quoted when they contain one, as there), split values `train` and `val`, files
`annotations/train.csv` and `annotations/val.csv`, videos under `train/` and `val/`. Kinetics windows are 10 s;
ours are `seconds` long and the CSV says so: `time_end = time_start + ceil(seconds)`. Readers should take a
video's real duration from the container anyway (many Kinetics downloads are shorter than their window).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from av.video.reformatter import Interpolation


class SynthError(ValueError):
    """A bad argument to the synthetic dataset or the encoder: what was wrong and what to pass instead."""


@dataclass(frozen=True)
class SynthClass:
    label: str
    seen_by: str  # "slow": the slow pathway separates it from every other class; "fast only": see `partner`
    partner: str | None  # the class that only the fast pathway tells apart from this one
    description: str


CLASSES: tuple[SynthClass, ...] = (
    SynthClass("scrolling up", "slow", None, "the whole scene slides up, 0.4-0.6 frame heights per second"),
    SynthClass(
        "stripes drifting up",
        "fast only",
        "stripes drifting down",
        "the stripes inside the still object drift up at 2.4-5.4 cycles/s",
    ),
    SynthClass(
        "stripes drifting down",
        "fast only",
        "stripes drifting up",
        "the stripes inside the still object drift down at 2.4-5.4 cycles/s",
    ),
    SynthClass("bouncing", "slow", None, "the object moves up and down at 0.4-0.6 frame heights per second"),
    SynthClass(
        "flickering smoothly",
        "fast only",
        "flickering erratically",
        "object brightness follows Gaussian noise correlated over ~0.09 s",
    ),
    SynthClass(
        "flickering erratically",
        "fast only",
        "flickering smoothly",
        "object brightness, same noise level, independent every frame",
    ),
    SynthClass("standing still", "slow", None, "nothing moves"),
    SynthClass("scrolling down", "slow", None, "the whole scene slides down, 0.4-0.6 frame heights per second"),
    SynthClass("wobbling", "fast only", "jittering", "object position wanders, Gaussian noise correlated over ~0.09 s"),
    SynthClass("jittering", "fast only", "wobbling", "object position, same noise level, independent every frame"),
    SynthClass("pulsing", "slow", None, "the object and its stripes swell and shrink at x2.6-3.2 per second"),
)

# Motion constants; the module docstring explains each against the pathways' sampling rates.
SCROLL_HEIGHTS_PER_S = (0.40, 0.60)
DRIFT_HZ = (2.4, 5.4)  # exactly 3 Hz wide: one slow sampling rate of slowfast_tiny
# Bouncing and pulsing go at a constant rate and turn at random limits (a triangle wave): most clips show one
# steady motion, which a few slow frames catch better than the slow ends of a sinusoid.
BOUNCE_HEIGHTS_PER_S, BOUNCE_HEIGHTS = (0.40, 0.60), (0.12, 0.18)  # speed; turning point from the middle
PULSE_PER_S, PULSE_FACTOR = (math.log(2.6), math.log(3.2)), (1.5, 1.7)  # log-size rate; turns at base x/ factor
SMOOTH_NOISE_S = 0.09  # standard deviation of the smooth noise's Gaussian autocorrelation
FLICKER_LEVELS = 46.0  # brightness noise, standard deviation in 8-bit levels
WOBBLE_HEIGHTS = 0.03  # position noise, standard deviation per axis in frame heights

# YouTube ids: 11 characters of URL-safe base64 holding 64 bits, so the last one carries 4 bits.
_YT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_YT_LAST = "AEIMQUYcgkosw048"
_CSV_HEADER = "label,youtube_id,time_start,time_end,split"


def class_names(classes: int | None = None) -> list[str]:
    """The first `classes` labels of the fixed order (all of them when None)."""
    n = len(CLASSES) if classes is None else classes
    if not 1 <= n <= len(CLASSES):
        raise SynthError(
            f"classes={n}: the synthetic set defines {len(CLASSES)} classes "
            f"({', '.join(c.label for c in CLASSES)}); pass a number from 1 to {len(CLASSES)}"
        )
    return [c.label for c in CLASSES[:n]]


# ---------------------------------------------------------------------------------------------------------------
# One video: draw its appearance and motion, then render frames.


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video: appearance constants and per-frame motion series."""

    label: str
    width: int
    height: int
    fps: Fraction
    background: np.ndarray  # (H, W, 3) float32, periodic in both axes so it can scroll with wrap-around
    shape_power: float  # superellipse exponent: 1 diamond, 2 ellipse, 4 rounded box, inf rectangle
    shape_angle: float
    aspect: float  # minor / major axis
    stripe_period: float  # pixels, at the object's base size
    stripe_angle: float  # of the stripes' wave vector from vertical
    stripe_colours: np.ndarray  # (2, 3) float32
    wrap: bool  # the object wraps around the frame with the scrolling scene
    base_size: float
    scroll: np.ndarray  # (n,) pixels the scene has moved up
    centre: np.ndarray  # (n, 2) object centre (x, y) on the scene
    size: np.ndarray  # (n,) object major axis, pixels
    phase: np.ndarray  # (n,) stripe phase, radians
    light: np.ndarray  # (n,) brightness offset of the object, 8-bit levels

    @property
    def n_frames(self) -> int:
        return len(self.scroll)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour_pair(rng: np.random.Generator, min_luma_gap: float) -> np.ndarray:
    while True:
        pair = rng.uniform(0, 255, (2, 3))
        if abs(_luma(pair[0]) - _luma(pair[1])) >= min_luma_gap:
            return pair.astype(np.float32)


def _periodic_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Smooth Gaussian noise in [0, 1], periodic in both axes, features about `scale` pixels across."""
    spectrum = np.fft.rfft2(rng.standard_normal((height, width)))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    field = np.fft.irfft2(spectrum * np.exp(-0.5 * (fy**2 + fx**2) * (2 * np.pi * scale / 2) ** 2), s=(height, width))
    field = (field - field.mean()) / (field.std() + 1e-12)
    return np.clip(0.5 + 0.3 * field, 0, 1)


def _noise(rng: np.random.Generator, n: int, fps: float, smooth: bool, dims: int = 1) -> np.ndarray:
    """(n, dims) stationary unit-variance Gaussian noise: smooth (Gaussian autocorrelation, SMOOTH_NOISE_S) or
    independent per frame."""
    if not smooth:
        return rng.standard_normal((n, dims))
    # White noise filtered by a Gaussian of std s has a Gaussian autocorrelation of std s * sqrt(2).
    s = SMOOTH_NOISE_S * fps / math.sqrt(2)
    half = int(math.ceil(4 * s))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / s) ** 2)
    kernel /= np.sqrt((kernel**2).sum())
    white = rng.standard_normal((n + 2 * half, dims))
    return np.stack([np.convolve(white[:, d], kernel, mode="valid") for d in range(dims)], axis=1)


def _triangle(cycles: np.ndarray) -> np.ndarray:
    """A triangle wave in [-1, 1] with period 1: constant slope, turning at the ends."""
    return 2 * np.abs(2 * (cycles % 1.0) - 1) - 1


def sample_video(
    seed: int,
    class_index: int,
    video_index: int,
    *,
    width: int = 160,
    height: int = 120,
    fps: int | float | Fraction | str = 30,
    seconds: float = 4.0,
) -> VideoSpec:
    """Draw one video of class `class_index`; the same arguments always give the same video."""
    if not 0 <= class_index < len(CLASSES):
        raise SynthError(f"class_index={class_index}: must be in [0, {len(CLASSES)})")
    rate = _as_rate(fps)
    n = max(1, round(seconds * rate))
    appearance, motion = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, class_index, video_index]).spawn(2)
    )
    h, w = float(height), float(width)

    # Appearance: identical draws whatever the class.
    bg_colours = _colour_pair(appearance, 50)
    noise = _periodic_noise(appearance, height, width, scale=h * appearance.uniform(0.06, 0.15))
    background = (bg_colours[0] + noise[..., None] * (bg_colours[1] - bg_colours[0])).astype(np.float32)
    shape_power = float(appearance.choice([1.0, 2.0, 4.0, np.inf]))
    shape_angle = appearance.uniform(0, np.pi)
    aspect = appearance.uniform(0.6, 1.0)
    base_size = h * math.exp(appearance.uniform(math.log(0.4), math.log(0.7)))
    centre0 = np.array([w / 2 + appearance.uniform(-0.1, 0.1) * w, h / 2 + appearance.uniform(-0.1, 0.1) * h])
    stripe_period = h * math.exp(appearance.uniform(math.log(0.15), math.log(0.25)))
    stripe_angle = appearance.uniform(-np.pi / 6, np.pi / 6)
    stripe_colours = _colour_pair(appearance, 60)
    phase0 = appearance.uniform(0, 2 * np.pi)

    # Motion: the only thing the class decides.
    label = CLASSES[class_index].label
    t = np.arange(n) / float(rate)
    zeros = np.zeros(n)
    scroll, size, phase, light = zeros, np.full(n, base_size), np.full(n, phase0), zeros
    centre = np.tile(centre0, (n, 1))
    if label in ("scrolling up", "scrolling down"):
        speed = h * motion.uniform(*SCROLL_HEIGHTS_PER_S) * (1 if label == "scrolling up" else -1)
        scroll = speed * t
    elif label in ("stripes drifting up", "stripes drifting down"):
        # Phase rising with time moves the stripes against their wave vector, which points down-screen: up.
        f = motion.uniform(*DRIFT_HZ) * (1 if label == "stripes drifting up" else -1)
        phase = phase0 + 2 * np.pi * f * t
    elif label == "bouncing":
        speed, reach = h * motion.uniform(*BOUNCE_HEIGHTS_PER_S), h * motion.uniform(*BOUNCE_HEIGHTS)
        centre[:, 1] += reach * _triangle(speed / (4 * reach) * t + motion.uniform())
    elif label == "pulsing":
        speed, reach = motion.uniform(*PULSE_PER_S), math.log(motion.uniform(*PULSE_FACTOR))
        size = base_size * np.exp(reach * _triangle(speed / (4 * reach) * t + motion.uniform()))
    elif label in ("flickering smoothly", "flickering erratically"):
        light = FLICKER_LEVELS * _noise(motion, n, float(rate), label == "flickering smoothly")[:, 0]
    elif label in ("wobbling", "jittering"):
        centre = centre + WOBBLE_HEIGHTS * h * _noise(motion, n, float(rate), label == "wobbling", dims=2)
    return VideoSpec(
        label=label,
        width=width,
        height=height,
        fps=rate,
        background=background,
        shape_power=shape_power,
        shape_angle=shape_angle,
        aspect=aspect,
        stripe_period=stripe_period,
        stripe_angle=stripe_angle,
        stripe_colours=stripe_colours,
        wrap=label in ("scrolling up", "scrolling down"),
        base_size=base_size,
        scroll=scroll,
        centre=centre,
        size=size,
        phase=phase,
        light=light,
    )


def render(spec: VideoSpec, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames [start, stop) of the video as a (n, H, W, 3) uint8 RGB array."""
    stop = spec.n_frames if stop is None else min(stop, spec.n_frames)
    sl = slice(start, stop)
    f32 = np.float32
    height, width = spec.height, spec.width

    # Background: rows of the periodic canvas, shifted by the scroll with linear interpolation between rows.
    shift = spec.scroll[sl]
    if not shift.any():
        frames = np.repeat(spec.background[None], stop - start, axis=0)
    else:
        whole = np.floor(shift)
        frac = (shift - whole).astype(f32)[:, None, None, None]
        rows = (np.arange(height)[None, :] + whole.astype(np.int64)[:, None]) % height
        frames = spec.background[rows] * (1 - frac) + spec.background[(rows + 1) % height] * frac

    # The object is drawn only inside the box that holds it in every frame of the chunk.
    cx = spec.centre[sl, 0]
    cy = spec.centre[sl, 1] - shift
    reach = spec.size[sl].max() / 2 * math.hypot(1, spec.aspect) + 2  # a rectangle's corner is the farthest
    x0, x1 = max(0, int(cx.min() - reach)), min(width, int(math.ceil(cx.max() + reach)))
    y0, y1 = max(0, int(cy.min() - reach)), min(height, int(math.ceil(cy.max() + reach)))
    if spec.wrap:
        y0, y1 = 0, height
    if x1 <= x0 or y1 <= y0:
        return np.clip(frames + 0.5, 0, 255).astype(np.uint8)

    # Object coordinates relative to its centre; the object rides on the scrolling scene.
    dx = np.arange(x0, x1, dtype=f32)[None, None, :] - cx.astype(f32)[:, None, None]
    dy = np.arange(y0, y1, dtype=f32)[None, :, None] - cy.astype(f32)[:, None, None]
    if spec.wrap:
        dy = (dy + height / 2) % height - height / 2
    cos, sin = f32(math.cos(spec.shape_angle)), f32(math.sin(spec.shape_angle))
    a = (spec.size[sl] / 2).astype(f32)[:, None, None]
    b = a * f32(spec.aspect)
    u = np.abs(dx * cos + dy * sin) / a
    v = np.abs(dy * cos - dx * sin) / b
    p = spec.shape_power
    if p == 1:
        r = u + v
    elif p == 2:
        r = np.sqrt(u * u + v * v)
    elif p == 4:
        r = np.sqrt(np.sqrt(u**4 + v**4))
    else:
        r = np.maximum(u, v)
    mask = np.clip((1 - r) * b + 0.5, 0, 1)[..., None]  # about one pixel of anti-aliased edge

    # Stripes: a sinusoidal grating in the object's frame, scaled with the object.
    period = (spec.stripe_period * spec.size[sl] / spec.base_size).astype(f32)[:, None, None]
    along = dx * f32(math.sin(spec.stripe_angle)) + dy * f32(math.cos(spec.stripe_angle))
    grating = 0.5 + 0.5 * np.cos(f32(2 * np.pi) * along / period + spec.phase[sl].astype(f32)[:, None, None])
    c0, c1 = spec.stripe_colours
    obj = c0 + grating[..., None] * (c1 - c0) + spec.light[sl].astype(f32)[:, None, None, None]
    box = frames[:, y0:y1, x0:x1]
    box += mask * (obj - box)
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


def iter_frames(spec: VideoSpec, chunk: int = 32) -> Iterable[np.ndarray]:
    """The video in (n, H, W, 3) chunks, so long or large videos render in bounded memory."""
    for start in range(0, spec.n_frames, chunk):
        yield render(spec, start, start + chunk)


# ---------------------------------------------------------------------------------------------------------------
# Encoding.

# Quality and determinism defaults per encoder; `options` passed to encode_video override them. x264's
# macroblock-tree rate control (mbtree, on by default) reads heap memory it has not written: with it, the same
# frames encoded to other bytes after the process's heap had held other data (one video in seven, after freed
# buffers filled with 0xff or random bytes; none with mbtree=0).
_ENCODER_DEFAULTS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "18", "preset": "veryfast", "mbtree": "0"},
    "libx265": {"crf": "20", "x265-params": "log-level=error:pools=none:frame-threads=1"},
    "libvpx-vp9": {"crf": "32", "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "0"},
    "libaom-av1": {"crf": "35", "cpu-used": "8", "row-mt": "0"},
}
_CODEC_ALIASES = {"h264": "libx264", "hevc": "libx265", "h265": "libx265", "vp9": "libvpx-vp9", "av1": "libaom-av1"}
# swscale flags for RGB -> the encoder's pixel format. Without BITEXACT and ACCURATE_RND swscale runs SIMD code
# chosen for the CPU, which rounds differently from its C code: the same frames gave other YUV bytes with FFmpeg's
# CPU flags forced to 0. With them the result is the C arithmetic whatever the CPU, for ~0.1 ms a frame.
_EXACT_CONVERSION = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT


def _as_rate(fps: int | float | Fraction | str) -> Fraction:
    try:
        rate = Fraction(fps) if not isinstance(fps, float) else Fraction(fps).limit_denominator(1001)
    except (ValueError, TypeError, ZeroDivisionError):
        raise SynthError(f"fps={fps!r}: expected a number or a fraction such as '30000/1001'") from None
    if rate <= 0:
        raise SynthError(f"fps={fps!r}: must be positive")
    return rate


def encoder_available(codec: str) -> bool:
    """Whether this PyAV build can encode `codec` (an encoder name or an alias such as 'h264', 'vp9', 'hevc')."""
    try:
        av.codec.Codec(_CODEC_ALIASES.get(codec, codec), "w")
    except Exception:  # PyAV raises different types for unknown and for decode-only codecs
        return False
    return True


def tone(seconds: float, rate: int = 48000, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    """A quiet sine tone as a (channels, samples) float32 array, for `encode_video(audio=...)`."""
    wave = 0.1 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)
    return np.repeat(wave[None].astype(np.float32), channels, axis=0)


def _frames_of(frames: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    for item in frames:
        item = np.asarray(item)
        if item.ndim == 4:
            yield from item
        else:
            yield item


def encode_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: int | float | Fraction | str = 30,
    *,
    codec: str = "h264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    bit_rate: int | None = None,
    timestamps: Sequence[float] | None = None,
    rotation: int | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 48000,
    audio_codec: str | None = None,
) -> Path:
    """Encode RGB frames into a video file with PyAV; the container follows the suffix (.mp4, .mkv, .webm, .avi).

    frames: (T, H, W, 3) uint8, or an iterable of (H, W, 3) frames or (n, H, W, 3) chunks.
    fps: the nominal rate; Fraction(30000, 1001) or "30000/1001" for NTSC 29.97.
    codec: an encoder or alias (h264 = libx264, hevc = libx265, vp9 = libvpx-vp9, mpeg4, av1, ...), with the
      defaults in _ENCODER_DEFAULTS, overridden by `options`; `bit_rate` in bits/s for rate-controlled codecs
      (mpeg4 without it uses a fixed quantiser of 3).
    timestamps: one presentation time per frame, in seconds, strictly increasing: a variable frame rate.
    rotation: display rotation in degrees counter-clockwise, stored as the container's display matrix (what
      `VideoFrame.rotation` reads back; the pixels are stored unrotated).
    audio: (channels, samples) float32 in [-1, 1] at `audio_rate` (see `tone`), encoded with `audio_codec`
      (default: aac, or libopus in .webm).
    The bytes depend on the arguments and the library builds only (see Determinism in the module docstring): the
    encoder runs on one thread and the RGB frames are converted with swscale's exact arithmetic.
    """
    path = Path(path)
    encoder = _CODEC_ALIASES.get(codec, codec)
    if not encoder_available(encoder):
        raise SynthError(
            f"{path}: codec {codec!r} has no encoder in this PyAV build "
            f"(check with slowfast.video.synth.encoder_available)"
        )
    rate = _as_rate(fps)
    frame_iter = iter(_frames_of(frames))
    first = next(frame_iter, None)
    if first is None:
        raise SynthError(f"{path}: no frames to encode")
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise SynthError(f"{path}: frames must be (H, W, 3) uint8 RGB, got {first.shape} {first.dtype}")
    height, width = first.shape[:2]
    if "420" in pix_fmt and (height % 2 or width % 2):
        raise SynthError(f"{path}: {pix_fmt} needs an even width and height, got {width}x{height}")
    if timestamps is not None:
        timestamps = [float(x) for x in timestamps]
        if any(b <= a for a, b in zip(timestamps, timestamps[1:], strict=False)):
            raise SynthError(f"{path}: timestamps must be strictly increasing")

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # One thread: x264 and x265 encode other bytes with another thread count, and PyAV's default (0) lets the
        # encoder pick one from the CPU count.
        stream.codec_context.thread_count = 1
        time_base = Fraction(1, 90000) if timestamps is not None else None
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        elif encoder == "mpeg4":
            stream.codec_context.qscale = 3
        stream.options = {**_ENCODER_DEFAULTS.get(encoder, {}), **(options or {})}
        if rotation is not None:
            if not hasattr(stream, "set_display_rotation"):
                raise SynthError(f"{path}: this PyAV ({av.__version__}) cannot set a display rotation; PyAV >= 16 can")
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio is not None:
            audio = np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
            audio_codec = audio_codec or ("libopus" if path.suffix == ".webm" else "aac")
            audio_stream = container.add_stream(audio_codec, rate=audio_rate)
            audio_stream.layout = "mono" if audio.shape[0] == 1 else "stereo"

        count = 0
        for image in itertools.chain([first], frame_iter):
            if image.shape != first.shape or image.dtype != np.uint8:
                raise SynthError(
                    f"{path}: frame {count} is {image.shape} {image.dtype}, expected {first.shape} uint8 like frame 0"
                )
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(
                format=pix_fmt, interpolation=_EXACT_CONVERSION, threads=1
            )
            if timestamps is not None:
                if count >= len(timestamps):
                    raise SynthError(f"{path}: more frames than timestamps ({len(timestamps)})")
                frame.pts, frame.time_base = round(timestamps[count] / time_base), time_base
            container.mux(stream.encode(frame))
            count += 1
        container.mux(stream.encode())
        if timestamps is not None and count != len(timestamps):
            raise SynthError(f"{path}: {count} frames but {len(timestamps)} timestamps")

        if audio_stream is not None:
            # PyAV resamples to the encoder's sample format and frame size as it encodes.
            layout = audio_stream.layout.name
            for start in range(0, audio.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(audio[:, start : start + 1024], format="fltp", layout=layout)
                af.sample_rate, af.pts, af.time_base = audio_rate, start, Fraction(1, audio_rate)
                container.mux(audio_stream.encode(af))
            container.mux(audio_stream.encode())
    return path


# ---------------------------------------------------------------------------------------------------------------
# The dataset.


def video_key(seed: int, class_index: int, video_index: int, seconds: float = 4.0) -> tuple[str, int, int]:
    """(youtube_id, time_start, time_end) of one video: the name `write_dataset` gives it, from the same seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, video_index, 1]))
    youtube_id = "".join(_YT_ALPHABET[i] for i in rng.integers(0, 64, 10)) + _YT_LAST[rng.integers(0, 16)]
    time_start = int(rng.integers(0, 291))
    return youtube_id, time_start, time_start + math.ceil(seconds)


def _csv_field(text: str) -> str:
    # Kinetics quotes labels that contain spaces ("air drumming"); doubling quotes keeps it valid RFC 4180.
    if any(ch in text for ch in ' ,"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class _Written(NamedTuple):
    split: str
    row: tuple[str, str, int, int]  # the annotation: label, youtube_id, time_start, time_end
    size_bytes: int
    n_frames: int


# Videos written at once by default: each worker holds a chunk of 32 float32 frames and its intermediates, so
# memory grows with the count, while the speed-up stops at the CPUs the process may use.
DEFAULT_WORKERS_MAX = 4


def _usable_cpus() -> int:
    # sched_getaffinity counts the CPUs this process may run on (taskset, containers), not all the machine's.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_dataset(
    out_dir: str | os.PathLike,
    classes: int,
    videos_per_class: int,
    seed: int,
    *,
    width: int = 160,
    height: int = 120,
    fps: int | float | Fraction | str = 30,
    seconds: float = 4.0,
    val_fraction: float = 0.25,
    codec: str = "h264",
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> dict:
    """Write `classes` x `videos_per_class` videos and the train/val annotation CSVs under `out_dir`.

    The last round(videos_per_class * val_fraction) videos of each class (at least one when val_fraction > 0
    and there are two or more) go to `val`. `progress(done, total)` is called after each video, in order.
    `workers` videos are rendered and encoded at once (default: the CPUs this process may use, at most
    DEFAULT_WORKERS_MAX); every encoder runs on one thread, so the files are the same whatever the number.
    Returns a summary: out_dir, classes, videos per split, annotation CSV paths, frames per video, bytes, seconds.
    """
    started = time.perf_counter()
    labels = class_names(classes)
    if videos_per_class < 1:
        raise SynthError(f"videos_per_class={videos_per_class}: need at least 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed={seed!r}: must be a non-negative integer")
    if width % 2 or height % 2 or min(width, height) < 16:
        raise SynthError(f"{width}x{height}: width and height must be even and at least 16 (yuv420p)")
    if not 0 <= val_fraction < 1:
        raise SynthError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if seconds <= 0:
        raise SynthError(f"seconds={seconds}: must be positive")
    if workers is None:
        workers = min(DEFAULT_WORKERS_MAX, _usable_cpus())
    elif workers < 1:
        raise SynthError(f"workers={workers}: the number of videos written at once must be at least 1")
    n_val = round(videos_per_class * val_fraction)
    if val_fraction > 0 and videos_per_class >= 2:
        n_val = min(max(n_val, 1), videos_per_class - 1)
    n_train = videos_per_class - n_val
    out = Path(out_dir)

    def write_one(class_index: int, video_index: int) -> _Written:
        label = labels[class_index]
        split = "train" if video_index < n_train else "val"
        youtube_id, time_start, time_end = video_key(seed, class_index, video_index, seconds)
        path = out / split / label / f"{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
        spec = sample_video(seed, class_index, video_index, width=width, height=height, fps=fps, seconds=seconds)
        partial = path.with_name(path.stem + ".partial.mp4")
        encode_video(partial, iter_frames(spec), spec.fps, codec=codec)
        os.replace(partial, path)
        return _Written(split, (label, youtube_id, time_start, time_end), path.stat().st_size, spec.n_frames)

    rows: dict[str, list[tuple[str, str, int, int]]] = {"train": [], "val": []}
    size_bytes, n_frames = 0, 0
    pool = ThreadPoolExecutor(workers, thread_name_prefix="synth")
    try:
        futures = [
            pool.submit(write_one, class_index, video_index)
            for class_index in range(len(labels))
            for video_index in range(videos_per_class)
        ]
        for done, future in enumerate(futures, 1):
            written = future.result()
            rows[written.split].append(written.row)
            size_bytes += written.size_bytes
            n_frames = written.n_frames
            if progress is not None:
                progress(done, len(futures))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, start none of the videos still queued

    annotations = {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        csv_path = out / "annotations" / f"{split}.csv"
        lines = [_CSV_HEADER] + [
            f"{_csv_field(label)},{yid},{start},{end},{split}" for label, yid, start, end in sorted(split_rows)
        ]
        partial = csv_path.with_suffix(".csv.partial")
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(partial, csv_path)
        annotations[split] = str(csv_path)
    ids = [r[1] for split_rows in rows.values() for r in split_rows]
    if len(set(ids)) != len(ids):  # 64-bit ids: a collision would be a bug, not bad luck
        raise SynthError(f"seed={seed}: duplicate youtube_id in the generated set")
    return {
        "out_dir": str(out),
        "classes": labels,
        "videos": {split: len(split_rows) for split, split_rows in rows.items()},
        "annotations": annotations,
        "frames_per_video": n_frames,
        "fps": str(_as_rate(fps)),
        "bytes": size_bytes,
        "elapsed_s": time.perf_counter() - started,
    }
