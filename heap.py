"""The worker's heap under glibc: few malloc arenas, and freed memory handed back to the system.

A request frees most of what it allocated (images, masks, regions), but glibc keeps freed memory in its arenas for
reuse, and under 32 request threads it makes up to 8 arenas per core: the worker's RSS then settles well above what
it uses and creeps up as fragments pile (a 30-minute soak measured 1.3 GB in use in a 3.4 GB RSS). So each worker
caps the arenas (MALLOC_ARENA_MAX) before its request threads start, and a daemon thread calls malloc_trim(0),
which returns free pages from inside the arenas too, after each MALLOC_TRIM_INTERVAL s in which the process was
quiet. Only then: under load, what is freed is soon needed again, and trimming it anyway made the RSS swing with
every dip in the load (2.1 to 3.7 GB in one 30-minute soak). Elsewhere (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

logger = logging.getLogger(__name__)
trims = 0  # malloc_trim calls by this process's trimming thread (shown in /metrics)
QUIET = 0.1  # an interval is quiet when the process used less than this share of one core's time in it

M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        return libc
    except (OSError, AttributeError):
        return None


def manage_heap(arena_max: int, trim_interval: float) -> threading.Thread | None:
    """Cap glibc's malloc arenas at `arena_max` (0: glibc's default) and start the thread that trims the heap at the
    end of every `trim_interval` seconds (0: never) in which all the process's threads together used under QUIET of
    one core; the thread, or None. Call once per process, before its request threads."""
    libc = _glibc()
    if libc is None:
        return None
    if arena_max and not libc.mallopt(M_ARENA_MAX, arena_max):
        logger.warning("mallopt(M_ARENA_MAX, %d) failed: glibc's default arenas", arena_max)
    if not trim_interval:
        return None

    def trim_forever() -> None:
        global trims
        cpu = time.process_time()  # every thread's CPU time
        while True:
            time.sleep(trim_interval)
            now = time.process_time()
            if now - cpu < QUIET * trim_interval:
                libc.malloc_trim(0)
                trims += 1
            cpu = now

    thread = threading.Thread(target=trim_forever, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def heap_stats() -> dict | None:
    """glibc's own count over all arenas: {"in_use": bytes allocated (mmapped blocks included), "free": bytes free
    in the arenas, resident or handed back by malloc_trim}; None without glibc >= 2.33. RSS well above in_use is the
    allocator keeping, not a leak."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}
