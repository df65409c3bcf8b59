"""FaultCluster: real redis-server (AOF, fsync always), engines and a gateway as subprocesses,
each of which a fault scenario can kill -9 and restart on the same port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from services.common.pb.inlaid.v1 import engine_pb2, engine_pb2_grpc
from services.common.redis_server import redis_binary
from services.stack import wait_serving

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClusterConfig:
    """Knobs of the fault cluster; claim_idle_s is short so a dead engine's requests are
    reclaimed within seconds instead of the production 30 s."""

    claim_idle_s: float = 3.0
    claim_every_s: float = 0.5
    engine_threads: int = 1
    max_model_len: int = 512
    kv_cache_bytes: int = 32 << 20
    max_num_seqs: int = 8
    startup_timeout_s: float = 240.0


@dataclass
class _Proc:
    role: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log_path: Path | None = None


@dataclass
class FaultCluster:
    """One Redis, named engines and one gateway. All on 127.0.0.1, all restartable."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="inlaid-faults-")))
    redis_port: int = field(default_factory=free_port)
    redis_process: subprocess.Popen | None = None
    engines: dict[str, _Proc] = field(default_factory=dict)
    gateway: _Proc | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}"

    @property
    def gateway_addr(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    # redis -------------------------------------------------------------------------------
    def start_redis(self) -> None:
        """redis-server with AOF and fsync on every write: an acknowledged write survives kill -9."""
        args = [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        log = open(self.workdir / "redis.log", "ab")
        self.redis_process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.redis_process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                client = redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=1)
                # While loading the AOF Redis answers LOADING errors; wait until it serves.
                if client.ping() and client.info("persistence").get("loading") == 0:
                    client.close()
                    return
                client.close()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill_redis(self) -> None:
        self.redis_process.send_signal(signal.SIGKILL)
        self.redis_process.wait()

    # services ----------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        c = self.config
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ENGINE_", "GATEWAY_", "REDIS_"))}
        env.update(REDIS_URL=self.redis_url, METRICS_PORT="off", LOG_LEVEL="INFO",
                   LOG_FORMAT="text", PYTHONUNBUFFERED="1",
                   ENGINE_HOST="127.0.0.1", ENGINE_DEVICE="cpu",
                   ENGINE_NUM_THREADS=str(c.engine_threads),
                   ENGINE_MAX_MODEL_LEN=str(c.max_model_len),
                   ENGINE_KV_CACHE_BYTES=str(c.kv_cache_bytes),
                   ENGINE_MAX_NUM_SEQS=str(c.max_num_seqs),
                   ENGINE_CLAIM_IDLE_S=str(c.claim_idle_s),
                   ENGINE_CLAIM_EVERY_S=str(c.claim_every_s), ENGINE_READ_BLOCK_MS="50",
                   ENGINE_GRACE_S="2",
                   GATEWAY_HOST="127.0.0.1", GATEWAY_MAX_MODEL_LEN=str(c.max_model_len),
                   GATEWAY_READ_BLOCK_MS="100", GATEWAY_GRACE_S="1")
        return env

    def _spawn(self, proc: _Proc) -> None:
        proc.log_path = self.workdir / f"{proc.role}.log"
        log = open(proc.log_path, "ab")
        proc.process = subprocess.Popen([sys.executable, "-m", f"services.{proc.role.split('-')[0]}.server"],
                                        cwd=ROOT, env=proc.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait(self, proc: _Proc) -> None:
        try:
            wait_serving(f"127.0.0.1:{proc.port}", time.monotonic() + self.config.startup_timeout_s,
                         proc.process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{proc.role} did not start: {exc}\n{self.log_tail(proc)}") from exc

    def log_tail(self, proc: _Proc, num_chars: int = 3000) -> str:
        return proc.log_path.read_text(errors="replace")[-num_chars:] if proc.log_path else ""

    def start_engine(self, name: str, wait: bool = True) -> _Proc:
        port = self.engines[name].port if name in self.engines else free_port()
        env = self._base_env()
        env.update(ENGINE_PORT=str(port), ENGINE_ENGINE_ID=name)
        proc = _Proc(f"engine-{name}", port, env)
        self.engines[name] = proc
        self._spawn(proc)
        if wait:
            self._wait(proc)
        return proc

    def wait_engine(self, name: str) -> None:
        self._wait(self.engines[name])

    def start_gateway(self) -> _Proc:
        port = self.gateway.port if self.gateway else free_port()
        env = self._base_env()
        env.update(GATEWAY_PORT=str(port))
        self.gateway = _Proc("gateway", port, env)
        self._spawn(self.gateway)
        self._wait(self.gateway)
        return self.gateway

    @staticmethod
    def kill(proc: _Proc) -> None:
        """kill -9: no shutdown hook runs, exactly like a crashed or OOM-killed process."""
        if proc.process is not None and proc.process.poll() is None:
            proc.process.send_signal(signal.SIGKILL)
            proc.process.wait()

    @staticmethod
    def terminate(proc: _Proc, timeout_s: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM (what Kubernetes and `docker stop` send) and wait for the process to exit:
        its graceful shutdown runs. Returns (exit code, seconds until it exited)."""
        start = time.monotonic()
        if proc.process is None or proc.process.poll() is not None:
            return (proc.process.returncode if proc.process else None), 0.0
        proc.process.send_signal(signal.SIGTERM)
        try:
            code = proc.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.process.kill()
            code = proc.process.wait()
        return code, time.monotonic() - start

    def engine_status(self, name: str) -> engine_pb2.GetStatusResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.engines[name].port}") as channel:
            return engine_pb2_grpc.EngineServiceStub(channel).GetStatus(
                engine_pb2.GetStatusRequest(), timeout=10)

    def live_engines(self) -> list[str]:
        return [n for n, p in self.engines.items() if p.process and p.process.poll() is None]

    def start(self, engine_names: tuple[str, ...] = ("e1", "e2")) -> FaultCluster:
        self.start_redis()
        for name in engine_names:  # start together: model loads overlap
            self.start_engine(name, wait=False)
        for name in engine_names:
            self.wait_engine(name)
        self.start_gateway()
        return self

    def stop(self) -> None:
        procs = ([self.gateway] if self.gateway else []) + list(self.engines.values())
        for proc in procs:
            if proc.process is not None and proc.process.poll() is None:
                proc.process.terminate()
        for proc in procs:
            if proc.process is not None:
                try:
                    proc.process.wait(15)
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait()
        if self.redis_process is not None and self.redis_process.poll() is None:
            self.redis_process.terminate()
            self.redis_process.wait(10)
