"""Hand freed heap memory back to the OS (glibc malloc_trim), so RSS tracks what is in use."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


class MallocTrimmer:
    """glibc keeps freed memory in its arenas (one per thread that allocated) at their
    high-water mark; a process whose tensor shapes vary (prompt lengths, batch sizes) then
    shows RSS creeping up in steps with no leak. malloc_trim(0) returns the free pages of every
    arena. A no-op where the C library is not glibc (musl, macOS)."""

    def __init__(self) -> None:
        self._trim = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            log.debug("malloc_trim unavailable: not glibc")

    @property
    def is_available(self) -> bool:
        return self._trim is not None

    def trim(self) -> bool:
        """True if memory was released. Takes milliseconds to tens of ms: call when idle."""
        return bool(self._trim(0)) if self._trim is not None else False
