"""Spatial transforms on decoded clips (uint8, T x H x W x 3) and pathway packing; no PyAV here.

Train: short side jittered, random crop, horizontal flip. Eval: short side scaled to the crop, then
PySlowFast's uniform_crop (left/center/right, or top/center/bottom for portrait frames).
Then normalise to float32 (C, T, H, W) and pack [slow, fast].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from slowfast.video.geometry import short_side_size

# PySlowFast's Kinetics defaults (DATA.MEAN / DATA.STD), on frames scaled to [0, 1].
MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
SPATIAL_POSITIONS = 3  # uniform_crop's windows: left/top, centre, right/bottom (index 1 = the centre crop)
# Frames per normalisation step: 4 frames of 224x224 in float are 2.4 MB, about one L2 cache.
_NORM_FRAMES = 4


class CropBox(NamedTuple):
    """A region of the stored frame, in stored-frame pixels."""

    y: int
    x: int
    height: int
    width: int


def jitter_range(crop: int) -> tuple[int, int]:
    """The paper's short-side jitter [256, 320] for a 224 crop, scaled to `crop`."""
    return round(256 * crop / 224), round(320 * crop / 224)


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8, bilinear, align_corners=False, no antialias.

    One interpolate call on the whole clip, in uint8 channels-last: torch's vectorised uint8 path,
    4x less memory than float. Its fixed-point weights and rounding differ from the reference's
    float resize by at most one level out of 255 (a third of a level on average).
    """
    if frames.shape[1:3] == (height, width):
        return frames
    if not frames.flags.c_contiguous or not frames.flags.writeable:
        frames = frames.copy()  # torch wants writable memory (raw frames are read-only Arrow buffers)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # channels-last view
    return _bilinear(x, height, width, in_float=False).permute(0, 2, 3, 1).numpy()


def short_side_scale(frames: np.ndarray, size: int) -> np.ndarray:
    """Scale the clip so its short side is `size` (unchanged when it already is)."""
    return resize(frames, *short_side_size(frames.shape[1], frames.shape[2], size))


def uniform_crop_box(height: int, width: int, size: int, spatial_idx: int) -> CropBox:
    """PySlowFast's uniform_crop window: spatial_idx 0, 1, 2 = left, center, right when width >= height,
    top, center, bottom when height > width; the center offset rounds up."""
    if spatial_idx not in (0, 1, 2):
        raise ValueError(f"spatial_idx must be 0, 1 or 2, got {spatial_idx}")
    if height < size or width < size:
        raise ValueError(f"cannot take a {size}x{size} crop from a {width}x{height} frame")
    y = int(math.ceil((height - size) / 2))
    x = int(math.ceil((width - size) / 2))
    if height > width:
        y = (0, y, height - size)[spatial_idx]
    else:
        x = (0, x, width - size)[spatial_idx]
    return CropBox(y, x, size, size)


def uniform_crop(frames: np.ndarray, size: int, spatial_idx: int) -> np.ndarray:
    """A size x size view of (T, H, W, 3) frames at uniform_crop_box's window (no copy)."""
    b = uniform_crop_box(frames.shape[1], frames.shape[2], size, spatial_idx)
    return frames[:, b.y : b.y + size, b.x : b.x + size]


def scaled_crop_box(height: int, width: int, crop: int, size: int, y: int, x: int) -> CropBox:
    """The region of a height x width frame that the crop x crop window at (y, x) of the same frame
    scaled to short side `size` covers, rounded to whole pixels."""
    scaled_h, scaled_w = short_side_size(height, width, size)
    if not (0 <= y <= scaled_h - crop and 0 <= x <= scaled_w - crop):
        raise ValueError(f"a {crop} crop at ({y}, {x}) does not fit a frame scaled to {scaled_w}x{scaled_h}")
    ry, rx = height / scaled_h, width / scaled_w
    h = min(height, max(1, round(crop * ry)))
    w = min(width, max(1, round(crop * rx)))
    return CropBox(min(height - h, round(y * ry)), min(width - w, round(x * rx)), h, w)


def random_crop_box(
    height: int, width: int, crop: int, jitter: tuple[int, int], rng: np.random.Generator
) -> tuple[CropBox, int]:
    """Scale jitter + random crop, as the region of the stored frame it covers; also returns the scale.

    The reference scales the whole frame so its short side is s ~ U[jitter] (rounded), then crops
    crop x crop at a uniform offset. Here the offset is drawn in the scaled frame and mapped back, so
    only the region (crop * stored / s pixels a side) is resized afterwards.
    """
    s = int(round(rng.uniform(jitter[0], jitter[1])))
    scaled_h, scaled_w = short_side_size(height, width, s)
    if scaled_h < crop or scaled_w < crop:
        raise ValueError(
            f"jitter {jitter} scales a {width}x{height} frame to {scaled_w}x{scaled_h}, smaller than the {crop} crop"
        )
    # Inclusive upper bound: every position is possible (the reference's randint never picks the last).
    y = int(rng.integers(0, scaled_h - crop + 1))
    x = int(rng.integers(0, scaled_w - crop + 1))
    return scaled_crop_box(height, width, crop, s, y, x), s


def resized_crop(frames: np.ndarray, box: CropBox, size: int, flip: bool = False) -> np.ndarray:
    """The box of every frame resized to size x size, optionally mirrored: (T, size, size, 3) uint8.

    Equals scale-then-crop up to interpolation at the crop border (border pixels here see only
    pixels inside the box) and the rounding of the box to whole stored pixels (under half a pixel).
    The mirror is done on the small uint8 region, where it is cheap: reversing each row's bytes
    mirrors the pixels and turns RGB into BGR, which the returned view undoes with a reversed channel
    axis (no copy; `normalize` reads channels one at a time anyway). Bilinear resizing with
    align_corners=False commutes with mirroring, so this equals resize-then-flip.
    """
    region = frames[:, box.y : box.y + box.height, box.x : box.x + box.width].copy()
    if not flip:
        return resize(region, size, size)
    t, h, w, c = region.shape
    mirrored = torch.from_numpy(region).view(t, h, w * c).flip(2).view(t, h, w, c).numpy()
    return resize(mirrored, size, size)[..., ::-1]


def region_side(short_side: int, crop: int, jitter: tuple[int, int]) -> int:
    """The side of a square that holds every train crop box of a frame stored at short side `short_side`:
    the box of the smallest jittered scale, crop * short_side / jitter[0] pixels (exactly `crop` for the
    paper's 224 crop of a 256 short side jittered in [256, 320]); never less than `crop`."""
    return max(crop, math.ceil(crop * short_side / jitter[0]))


def resize_regions(fast: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The second half of train augmentation, where the network runs: uint8 (B, F, S, S, 3) frames whose
    clip b holds its crop box in [:, :height, :width], region (B, 4) = (height, width, flip, size) ->
    uint8 (B, F, size, size, 3), each box mirrored where flip is set, then resized as `resize` does.

    The same operations in the same order as resized_crop on the CPU, so on a CPU device the pixels are
    identical. Elsewhere the resize runs in float32 and rounds (devices have no uint8 bilinear kernel):
    within one level of the CPU's fixed-point result.
    """
    rows = region.tolist()  # B small rows to the host: one sync
    if not rows:
        return fast
    size = rows[0][3]
    if fast.shape[2:4] == (size, size) and all(h == w == size and not flip for h, w, flip, _ in rows):
        return fast
    out = torch.empty((len(rows), fast.shape[1], size, size, 3), dtype=torch.uint8, device=fast.device)
    for b, (h, w, flip, _) in enumerate(rows):
        box = fast[b, :, :h, :w]
        if flip:
            box = box.flip(2)
        if (h, w) == (size, size):
            out[b] = box
            continue
        x = box.contiguous().permute(0, 3, 1, 2)  # (F, 3, h, w), channels-last
        out[b] = _bilinear(x, size, size, in_float=x.device.type != "cpu").permute(0, 2, 3, 1)
    return out


def _bilinear(x: torch.Tensor, height: int, width: int, in_float: bool) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> (N, 3, height, width): bilinear, align_corners=False, no antialias; in uint8
    (torch's fixed-point kernel, what `resize` runs) or (in_float) in float32 rounded back to uint8 levels."""
    y = F.interpolate(
        x.float() if in_float else x, size=(height, width), mode="bilinear", align_corners=False, antialias=False
    )
    return y.round_().clamp_(0, 255) if in_float else y


def train_view(
    frames: np.ndarray, crop: int, jitter: tuple[int, int], rng: np.random.Generator, flip_prob: float = 0.5
) -> np.ndarray:
    """Training augmentation of one clip: jittered short side, random crop, random horizontal flip."""
    box, _ = random_crop_box(frames.shape[1], frames.shape[2], crop, jitter, rng)
    flip = bool(rng.random() < flip_prob)
    return resized_crop(frames, box, crop, flip)


def eval_views(frames: np.ndarray, crop: int, spatial_crops: int = 3) -> list[np.ndarray]:
    """Test views of one clip: short side scaled to `crop`, then 3 uniform crops (or the center one)."""
    if spatial_crops not in (1, 3):
        raise ValueError(f"spatial_crops must be 1 (center) or 3 (PySlowFast's test views), got {spatial_crops}")
    scaled = short_side_scale(frames, crop)
    indices = (1,) if spatial_crops == 1 else (0, 1, 2)
    return [uniform_crop(scaled, crop, i) for i in indices]


def normalize(
    frames: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, out: np.ndarray | None = None
) -> np.ndarray:
    """(T, H, W, 3) uint8 -> float32 (3, T, H, W): (x / 255 - mean) / std per channel.

    The channel split (a strided read) is the cost; it goes a few frames at a time so that the
    float scale-and-shift that follows runs on data still in cache. Writes into `out` when given.
    """
    t, h, w, c = frames.shape
    if out is None:
        out = np.empty((c, t, h, w), np.float32)
    scale = np.array([1.0 / (255.0 * s) for s in std], np.float32).reshape(c, 1, 1, 1)
    shift = np.array([m / s for m, s in zip(mean, std, strict=True)], np.float32).reshape(c, 1, 1, 1)
    for t0 in range(0, t, _NORM_FRAMES):
        o = out[:, t0 : t0 + _NORM_FRAMES]
        for ch in range(c):
            np.copyto(o[ch], frames[t0 : t0 + _NORM_FRAMES, ..., ch], casting="unsafe")
        np.multiply(o, scale, out=o)
        np.subtract(o, shift, out=o)
    return out


def normalize_tensor(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 (..., 3, T, H, W) -> float32, normalised as `normalize` does, in x's memory format; meant for
    the device, where a loader that emits uint8 leaves this step (4x fewer bytes through the data path)."""
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [m / s for m, s in zip(mean, std, strict=True)]
    out = x.float()
    if len(set(scale)) == 1 and len(set(shift)) == 1:
        # One value for all channels (the Kinetics defaults): scalar operands, the same float32 products,
        # no per-channel tensors to build on the device, and 1.3x faster on CPU than broadcasting them
        # over channels-last clips, where the channel is the innermost axis.
        return out.mul_(scale[0]).sub_(shift[0])
    shape = (3, 1, 1, 1)
    scale_t, shift_t = (torch.tensor(v, dtype=torch.float32, device=x.device).view(shape) for v in (scale, shift))
    return out.mul_(scale_t).sub_(shift_t)
