"""heap.py: under glibc, the trimming thread hands freed heap memory back to the system once the process is quiet,
and the heap is counted."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only")

FRAGMENTED = textwrap.dedent("""
    import ctypes, time
    from heap import _glibc, manage_heap

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    libc = _glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(4000) for _ in range(100_000)]  # ~400 MB under the mmap threshold: in the heap
    for p in chunks:
        libc.memset(ctypes.c_void_p(p), 1, 4000)
    for p in chunks[:-1]:
        libc.free(ctypes.c_void_p(p))  # freed, but the last chunk keeps the heap's top where it is
    before = rss_mb()
    thread = manage_heap({arena_max}, {interval})
    end = time.process_time() + {busy}
    while time.process_time() < end:  # busy: one core's worth
        pass
    busy = rss_mb()
    time.sleep(0.5)
    print(before, busy, rss_mb(), thread is not None and thread.daemon and thread.is_alive())
""")


def run(arena_max: int, interval: float, busy: float = 0) -> tuple[float, float, float, bool]:
    """RSS (MB) of a process with ~400 MB freed in its heap: before manage_heap, after `busy` s of work, 0.5 s
    quiet later; its thread's life."""
    code = FRAGMENTED.format(arena_max=arena_max, interval=interval, busy=busy)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), out[3] == "True"


def test_freed_memory_goes_back_to_the_system_within_a_quiet_interval():
    before, _, after, running = run(arena_max=2, interval=0.05)
    assert running and before > 350 and after < before - 300, (before, after)


def test_a_busy_process_keeps_its_freed_memory_until_it_is_quiet():
    before, busy, after, running = run(arena_max=2, interval=0.05, busy=0.6)
    assert running and busy > before - 50 and after < before - 300, (before, busy, after)


def test_without_the_interval_nothing_is_trimmed():
    before, _, after, running = run(arena_max=0, interval=0)
    assert not running and after > before - 50, (before, after)


def test_heap_stats_count_what_is_allocated_and_what_is_freed_but_kept():
    libc = heap._glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    start = heap.heap_stats()
    chunks = [libc.malloc(4000) for _ in range(50_000)]  # ~200 MB in small blocks
    held = heap.heap_stats()
    for p in chunks[:-1]:
        libc.free(p)  # kept in the arena below the last block
    freed = heap.heap_stats()
    libc.free(chunks[-1])
    mb = 2**20
    assert held["in_use"] - start["in_use"] > 190 * mb, (start, held)
    assert held["in_use"] - freed["in_use"] > 190 * mb and freed["free"] - held["free"] > 190 * mb, (held, freed)
