"""Memory watcher for soak tests: put this directory on PYTHONPATH and set INLAID_MEMWATCH_DIR.

Python imports `sitecustomize` at start-up, so every service process of a load test gets a
daemon thread that appends one JSON line per INLAID_MEMWATCH_S seconds to
<dir>/<argv module>-<pid>.jsonl: RSS, anonymous / heap memory from /proc/self/smaps, glibc
malloc statistics (mallinfo2: heap in use vs free, mmapped), and, when
INLAID_MEMWATCH_TRACE=1, the Python allocation sites that grew most since the first sample
(tracemalloc) and the object types whose counts grew most (gc). Diagnostic only: it is never
imported by the services themselves.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
from collections import Counter


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo() -> dict:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    mb = 1 / (1 << 20)
    return {"malloc_arena_mb": info.arena * mb, "malloc_in_use_mb": info.uordblks * mb,
            "malloc_free_mb": info.fordblks * mb, "malloc_mmapped_mb": info.hblkhd * mb,
            "malloc_num_mmapped": info.hblks}


def _arenas() -> dict:
    """Per-arena heap sizes from malloc_info(): each thread that mallocs may get its own arena,
    and every arena keeps its own high-water mark."""
    import re
    import tempfile
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
            fp = libc.fopen(tmp.name.encode(), b"w")
            libc.malloc_info(0, fp)
            libc.fclose(fp)
            xml = open(tmp.name).read()
    except (OSError, AttributeError):
        return {}
    sizes = [int(m) / (1 << 20) for m in re.findall(
        r'<heap nr="\d+">.*?<system type="current" size="(\d+)"/>', xml, re.S)]
    return {"num_arenas": len(sizes), "arena_mb": [round(x, 1) for x in sizes]}


def _smaps() -> dict:
    totals = Counter()
    region = ""
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":") or "-" in parts[0]:
                    region = parts[5] if len(parts) > 5 else "[anon]"
                    continue
                if parts[0] == "Rss:":
                    kind = "heap" if region == "[heap]" else ("anon" if region in ("[anon]", "") else
                                                              ("stack" if "stack" in region else "file"))
                    totals[kind] += int(parts[1])
    except OSError:
        return {}
    return {f"rss_{k}_mb": v / 1024 for k, v in totals.items()}


def _role() -> str:
    parts = os.path.normpath(sys.argv[0] or "python").split(os.sep)
    return "-".join(parts[-2:]).replace(".py", "")


def _watch(out_dir: str, every_s: float, trace: bool) -> None:
    import tracemalloc
    baseline, base_types, path = None, None, None
    # Diff against a snapshot taken after warm-up (models and adapters loaded), not at start;
    # snapshots are large, so take them rarely.
    baseline_s = float(os.environ.get("INLAID_MEMWATCH_BASELINE_S", "120"))
    snapshot_every_s = float(os.environ.get("INLAID_MEMWATCH_SNAPSHOT_S", "120"))
    last_snapshot_s = 0.0
    t0 = time.monotonic()
    while True:
        time.sleep(every_s)
        # sys.argv is only ['-m'] while site runs; the module name is there by now.
        path = path or os.path.join(out_dir, f"{_role()}-{os.getpid()}.jsonl")
        sample = {"t_s": round(time.monotonic() - t0, 1)}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                    key, value = line.split(":", 1)
                    sample[key] = int(value.split()[0]) / (1024 if key != "Threads" else 1)
        sample.update(_smaps())
        sample.update(_mallinfo())
        sample.update(_arenas())
        is_snapshot_due = sample["t_s"] >= baseline_s and (
            baseline is None or sample["t_s"] - last_snapshot_s >= snapshot_every_s)
        if trace and tracemalloc.is_tracing() and is_snapshot_due:
            last_snapshot_s = sample["t_s"]
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            sample["traced_mb"] = tracemalloc.get_traced_memory()[0] / (1 << 20)
            if baseline is None:
                baseline = snap
            else:
                stats = snap.compare_to(baseline, "lineno")[:12]
                sample["top_growth"] = [f"{s.size_diff / 1024:.0f} KiB {s.count_diff:+d} "
                                        f"{s.traceback}" for s in stats]
            types = Counter(type(o).__name__ for o in gc.get_objects())
            if base_types is None:
                base_types = types
            else:
                grown = (types - base_types).most_common(10)
                sample["type_growth"] = grown
            sample["num_gc_objects"] = sum(types.values())
        with open(path, "a") as f:
            f.write(json.dumps(sample) + "\n")


def _start() -> None:
    out_dir = os.environ.get("INLAID_MEMWATCH_DIR")
    if not out_dir:
        return
    trace = os.environ.get("INLAID_MEMWATCH_TRACE") == "1"
    if trace:
        import tracemalloc
        tracemalloc.start(int(os.environ.get("INLAID_MEMWATCH_FRAMES", "1")))
    every_s = float(os.environ.get("INLAID_MEMWATCH_S", "30"))
    threading.Thread(target=_watch, args=(out_dir, every_s, trace), name="memwatch",
                     daemon=True).start()


_start()
