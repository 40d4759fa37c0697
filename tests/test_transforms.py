"""Spatial transforms and pathway packing: the paper's jitter range, PySlowFast's test crops, and
the cheap crop-then-resize against the reference's scale-then-crop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slowfast.video import transforms as tf
from slowfast.video.geometry import short_side_size


def gradient_frames(height, width, t=4):
    """Channel 0 rises left -> right, channel 1 top -> bottom, channel 2 constant."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    frame = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    return np.repeat(frame[None], t, 0)


def test_jitter_range_is_the_papers_for_224_and_scales_with_the_crop():
    assert tf.jitter_range(224) == (256, 320)
    assert tf.jitter_range(112) == (128, 160)
    assert tf.jitter_range(256) == (293, 366)


def test_short_side_size_floors_the_long_side_like_the_reference():
    assert short_side_size(256, 340, 224) == (224, 297)  # 340 / 256 * 224 = 297.5
    assert short_side_size(340, 256, 224) == (297, 224)
    assert short_side_size(256, 256, 224) == (224, 224)
    assert short_side_size(97, 173, 256) == (256, 456)  # odd sizes: 173 / 97 * 256 = 456.6


def test_uniform_crop_offsets_follow_pyslowfast():
    # Landscape: x offsets 0, ceil((W - size) / 2), W - size; y centred.
    assert [tf.uniform_crop_box(224, 297, 224, i) for i in range(3)] == [
        (0, 0, 224, 224),
        (0, 37, 224, 224),
        (0, 73, 224, 224),
    ]
    # Portrait: y offsets move, x centred (rounded up).
    assert [tf.uniform_crop_box(297, 225, 224, i) for i in range(3)] == [
        (0, 1, 224, 224),
        (37, 1, 224, 224),
        (73, 1, 224, 224),
    ]
    # Square frames take the landscape branch (height > width is false), all crops identical here.
    assert {tf.uniform_crop_box(224, 224, 224, i) for i in range(3)} == {(0, 0, 224, 224)}
    with pytest.raises(ValueError, match="spatial_idx"):
        tf.uniform_crop_box(224, 297, 224, 3)


def test_eval_views_cover_left_center_right_of_a_landscape_frame():
    views = tf.eval_views(gradient_frames(256, 340), crop=224)
    assert [v.shape for v in views] == [(4, 224, 224, 3)] * 3
    x_means = [v[..., 0].mean() for v in views]
    y_means = [v[..., 1].mean() for v in views]
    assert x_means[0] < x_means[1] < x_means[2]
    assert np.ptp(y_means) < 1  # every view spans the full (scaled) height
    # The right view ends at the right edge: its last column is the brightest of the frame.
    assert views[2][0, :, -1, 0].mean() > 250 and views[0][0, :, 0, 0].mean() < 5


def test_eval_views_cover_top_center_bottom_of_a_portrait_frame():
    views = tf.eval_views(gradient_frames(340, 256), crop=224)
    y_means = [v[..., 1].mean() for v in views]
    x_means = [v[..., 0].mean() for v in views]
    assert y_means[0] < y_means[1] < y_means[2]
    assert np.ptp(x_means) < 1


def test_eval_single_view_is_the_center_crop():
    frames = gradient_frames(256, 340)
    (center,) = tf.eval_views(frames, crop=224, spatial_crops=1)
    np.testing.assert_array_equal(center, tf.eval_views(frames, crop=224)[1])


def test_train_view_shape_and_crop_box_within_the_frame():
    rng = np.random.default_rng(0)
    for height, width in [(256, 340), (256, 455), (340, 256), (256, 256), (180, 320)]:
        for _ in range(200):
            box, s = tf.random_crop_box(height, width, 224, (256, 320), rng)
            assert 256 <= s <= 320
            assert 0 <= box.y and box.y + box.height <= height
            assert 0 <= box.x and box.x + box.width <= width
            # The region is the crop seen at scale s: crop * stored_short / s pixels a side.
            short = min(height, width)
            assert abs(box.height - 224 * short / s) <= 1.5 and abs(box.width - 224 * short / s) <= 1.5
    out = tf.train_view(gradient_frames(256, 340, t=8), 224, (256, 320), np.random.default_rng(1))
    assert out.shape == (8, 224, 224, 3) and out.dtype == np.uint8


def test_train_crop_positions_reach_both_edges():
    rng = np.random.default_rng(0)
    boxes = [tf.random_crop_box(256, 340, 224, (256, 320), rng)[0] for _ in range(2000)]
    assert min(b.x for b in boxes) == 0
    assert max(b.x + b.width for b in boxes) == 340
    assert max(b.y + b.height for b in boxes) == 256


def test_flip_mirrors_the_crop():
    frames = gradient_frames(256, 340)
    box = tf.CropBox(10, 40, 200, 200)
    plain = tf.resized_crop(frames, box, 224, flip=False)
    flipped = tf.resized_crop(frames, box, 224, flip=True)
    # Left -> right gradient runs right -> left after the flip; the vertical one is untouched.
    assert plain[0, :, 0, 0].mean() < plain[0, :, -1, 0].mean()
    assert flipped[0, :, 0, 0].mean() > flipped[0, :, -1, 0].mean()
    assert np.abs(flipped.astype(int) - plain[:, :, ::-1].astype(int)).max() <= 1
    np.testing.assert_array_equal(flipped[..., 1:], plain[:, :, ::-1, 1:])


def test_train_flips_about_half_the_clips():
    frames = gradient_frames(256, 340, t=1)
    flips = 0
    for seed in range(200):
        out = tf.train_view(frames, 224, (256, 320), np.random.default_rng(seed))
        flips += out[0, :, 0, 0].mean() > out[0, :, -1, 0].mean()
    assert 70 < flips < 130


def apparent_scale(out, stored):
    """Short-side scale the output was made at, from the slope of the gradients of `stored`."""

    def slope(profile):
        return abs(np.polyfit(np.arange(len(profile)), profile, 1)[0])  # a flip only changes the sign

    stored_x = slope(stored[0, 0, :, 0].astype(float))
    stored_y = slope(stored[0, :, 0, 1].astype(float))
    return (stored_x / slope(out[0, 112, :, 0].astype(float)), stored_y / slope(out[0, :, 112, 1].astype(float)))


def test_jittered_scale_is_within_the_range_and_spread_over_it():
    stored = gradient_frames(256, 340, t=1)
    scales = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        box, s = tf.random_crop_box(256, 340, 224, (256, 320), np.random.default_rng(seed))
        out = tf.train_view(stored, 224, (256, 320), rng)
        fx, fy = apparent_scale(out, stored)
        assert abs(fx - fy) < 0.01, "aspect ratio must be kept"
        assert abs(fx * 256 - s) < 3, (fx * 256, s)
        scales.append(fx * 256)
    assert 256 * 0.99 <= min(scales) < 268 and 308 < max(scales) <= 320 * 1.01


def scale_then_crop(frames, size, crop, y, x):
    """The reference's order: resize the whole frame (float), then slice the crop."""
    scaled_h, scaled_w = short_side_size(frames.shape[1], frames.shape[2], size)
    scaled = (
        F.interpolate(
            torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
            size=(scaled_h, scaled_w),
            mode="bilinear",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    return scaled[:, y : y + crop, x : x + crop]


def test_crop_then_resize_equals_scale_then_crop_inside_the_border():
    # Scale exactly 2 (64x96 -> 128x192): the box maps to whole stored pixels, so only the border
    # pixels differ (the reference's see one stored pixel beyond the box).
    frames = np.random.default_rng(3).integers(0, 256, (2, 64, 96, 3)).astype(np.uint8)
    box = tf.scaled_crop_box(64, 96, 56, 128, 8, 20)
    assert box == (4, 10, 28, 28)
    ours = tf.resized_crop(frames, box, 56).astype(float)
    ref = scale_then_crop(frames, 128, 56, 8, 20)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert np.abs(ours[inner] - ref[inner]).max() <= 1.01
    assert np.abs(ours - ref).max() > 2  # the border does differ


def test_crop_then_resize_at_any_scale_is_within_a_sub_pixel_shift():
    # At a scale that does not map to whole pixels the box is rounded (under half a stored pixel):
    # on a smooth image that is a difference of a fraction of a level.
    frames = gradient_frames(64, 86, t=2)
    ours = tf.resized_crop(frames, tf.scaled_crop_box(64, 86, 56, 70, 7, 20), 56).astype(float)
    ref = scale_then_crop(frames, 70, 56, 7, 20)
    assert np.abs(ours - ref)[:, 1:-1, 1:-1].mean() < 2.0  # gradient steps are ~3-4 levels a pixel


def test_resize_matches_float_interpolate_to_rounding():
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3)).astype(np.uint8)
    ours = tf.resize(frames, 57, 61).astype(float)
    ref = (
        F.interpolate(
            torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(57, 61), mode="bilinear", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    assert np.abs(ours - ref).max() <= 1.01  # torch's uint8 kernel has fixed-point weights
    assert np.abs(ours - ref).mean() < 0.35  # rounding alone would be 0.25


def test_normalize_values_and_layout():
    frames = np.zeros((2, 3, 4, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 0, 255, 114  # 114.75 is the mean
    frames[1, 0, 0] = (51, 102, 153)
    out = tf.normalize(frames)
    assert out.shape == (3, 2, 3, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (0 - 0.45) / 0.225, rtol=1e-6)
    np.testing.assert_allclose(out[1, 0], (1 - 0.45) / 0.225, rtol=1e-6)
    np.testing.assert_allclose(out[2, 0], (114 / 255 - 0.45) / 0.225, rtol=1e-5)
    np.testing.assert_allclose(out[:, 1, 0, 0], (np.array([51, 102, 153]) / 255 - 0.45) / 0.225, rtol=1e-5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    custom = tf.normalize(frames, mean, std)
    expected = (frames.transpose(3, 0, 1, 2) / 255 - np.reshape(mean, (3, 1, 1, 1))) / np.reshape(std, (3, 1, 1, 1))
    np.testing.assert_allclose(custom, expected, rtol=1e-5, atol=1e-6)


def test_normalize_reads_views_with_reversed_channels():
    frames = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3)).astype(np.uint8)
    np.testing.assert_array_equal(tf.normalize(frames[..., ::-1]), tf.normalize(frames.copy()[..., ::-1].copy()))


def test_normalize_tensor_matches_normalize():
    frames = np.random.default_rng(0).integers(0, 256, (9, 5, 6, 3)).astype(np.uint8)
    planar = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))
    on_device = tf.normalize_tensor(torch.from_numpy(planar)[None])[0].numpy()
    np.testing.assert_allclose(on_device, tf.normalize(frames), rtol=1e-6, atol=1e-6)
