"""The short-side rule: the one size arithmetic that decoding (resize while converting) and the
transforms (resize a clip) share. Pure Python, so `decode` needs no torch and `transforms` no PyAV.
"""

from __future__ import annotations

import math


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side at `size` and the aspect ratio kept.

    The short side is exact; the long side is floored, as the reference's ``scale`` does
    (PySlowFast ``transform.scale``), so it may be odd. A square frame becomes size x size.
    """
    if width < height:
        return int(math.floor(height / width * size)), size
    return size, int(math.floor(width / height * size))
