"""Process-wide memory settings for long, allocation-heavy runs (the stream worker, offline scoring).

Decoding allocates objects for every GPU-sample and frees them a moment later; these two settings keep that
churn from growing the heap (glibc) or from costing time in the cyclic garbage collector (CPython).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def return_big_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at 256 KiB. By default it rises to the size of the largest block freed, so
    after the first big fetch response (MBs of snapshots) every later one is carved from the heap, which
    fragments and keeps growing under bursts (a 10,000-GPU run grew ~55 MB a minute). Fixed, buffers that
    big are mmapped and handed back when freed. A no-op where libc is not glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.mallopt(m_mmap_threshold, 256 * 1024):
            log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    except (OSError, AttributeError) as exc:
        log.debug("no glibc mallopt: %s", exc)


def release_free_heap() -> None:
    """Hand the free pages inside glibc's heaps back to the OS (`malloc_trim(0)`). A long-running process that
    frees as much as it allocates (the stream worker, every batch) leaves holes between live blocks that the
    heap keeps; their pages stay resident and RSS creeps up although nothing is leaked (a 2,000-GPU worker's
    free heap grew ~3 MB a minute in its first minutes). Call it now and then (the worker: every
    TRIM_INTERVAL_S); it takes about a millisecond. A no-op where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError) as exc:
        log.debug("no glibc malloc_trim: %s", exc)


TRIM_INTERVAL_S = 60.0


def spare_startup_heap_from_gc() -> None:
    """Call once set-up is done. Moves every object allocated so far (torch, faust, the model: several
    hundred thousand that live as long as the process) out of the cyclic garbage collector's reach. Its
    full collections, set off again and again by what decoding allocates, would otherwise walk
    them all each time: about 15% of the stream worker's time here. Later garbage is collected as usual."""
    gc.collect()
    gc.freeze()
