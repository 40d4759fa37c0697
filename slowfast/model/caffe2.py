"""Read PySlowFast's Caffe2 .pkl checkpoints without running pickled code, and write them.

A Caffe2 checkpoint is a pickle (often Python 2's, protocol 2) of {"blobs": {name: numpy array}}.
Unpickling calls whatever the file names, so the reader builds only numpy arrays, dtypes and plain
containers; any other global is refused before it is called.
"""

from __future__ import annotations

import codecs
import pickle
from collections import OrderedDict
from typing import BinaryIO

import numpy as np


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names a global that building numpy arrays does not need."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); the codec is
    # pinned so that the name cannot reach any other codec.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickle("_codecs", f"encode(..., {encoding!r})")
    return text.encode("latin1")


# numpy 1 pickles name numpy.core.*, numpy 2 numpy._core.*: the same functions, taken from numpy itself
# rather than by importing the names the file gives. _reconstruct rebuilds arrays up to pickle protocol 4,
# _frombuffer from protocol 5 on.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise UnsafePickle(module, name) from None

    def persistent_load(self, pid):
        raise UnsafePickle("persistent id", repr(pid)[:60])


def read_pickle(file: BinaryIO):
    """The first object pickled in `file`, built from arrays and plain containers only.

    Python 2 pickles decode their byte strings as latin-1, as PySlowFast reads them. Raises
    UnsafePickle naming the refused global; other pickle errors pass through.
    """
    return _ArraysOnly(file, encoding="latin1").load()


# Blobs that Caffe2 saves beside the weights for its solver; PySlowFast skips them when converting.
_SOLVER_BLOBS = ("lr", "model_iter")


def blobs(obj: dict) -> dict:
    """The weight blobs of a loaded Caffe2 checkpoint: {"blobs": {...}} without the solver's state."""
    return {
        name: value
        for name, value in obj["blobs"].items()
        if not name.endswith("_momentum") and name not in _SOLVER_BLOBS
    }


def write_pickle(file: BinaryIO, blobs: dict[str, np.ndarray]) -> None:
    """{"blobs": blobs} as PySlowFast reads it (pickle.load(f, encoding="latin1"))."""
    pickle.dump({"blobs": blobs}, file, protocol=2)
