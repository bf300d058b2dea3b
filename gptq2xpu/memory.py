"""Keeping the process's memory what the work needs, whatever the model size (glibc only; a no-op
elsewhere).

Two habits of glibc's allocator make a long conversion's RSS grow with the model although the
live data does not (measured on a 48-layer, 75 K-tensor checkpoint, ``scripts/bench.py``):

* its mmap threshold rises to the largest block ever freed (up to 32 MiB), after which MiB-sized
  buffers come from per-thread heaps, where freed space is kept rather than returned: about
  20 MiB more at 48 layers than at 4 with two threads, more with more threads;
* the header and index parsing frees tens of MiB of small objects that stay in the heap.

:func:`settle` fixes the threshold at glibc's own starting value (128 KiB: large blocks are
mapped and unmapped, never kept) and hands free heap pages back (``malloc_trim``); it costs well
under a millisecond.  It changes allocator settings of the whole process, which is what a
command-line run wants; a program embedding gptq2xpu gets the same settings once it converts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
_THRESHOLD = 128 * 1024
_libc = None
_fixed = False


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


def settle() -> None:
    """Fix the mmap threshold (once) and return free heap pages to the system."""
    global _fixed
    libc = _glibc()
    if libc is None:
        return
    if not _fixed:
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
        _fixed = True
    libc.malloc_trim(0)
