"""`inlaid serve`: one supervisor runs the whole stack (Redis, predictor, quantizer, engine, gateway)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.redis_server import EmbeddedRedis

log = logging.getLogger("services.stack")
_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class StackConfig:
    """Ports of the services the supervisor starts, and where demo adapters are looked for."""

    gateway_port: int = 50051
    predictor_port: int = 50052
    engine_port: int = 50053
    quantizer_port: int = 50054
    redis_url: str = ""                    # "" → embedded Redis under INLAID_CACHE_DIR/.run
    adapters_dir: str = "adapters"         # each subdirectory with adapter_config.json → a task
    with_predictor: bool = True
    with_quantizer: bool = True
    startup_timeout_s: float = 300.0
    grace_s: float = 15.0

    def __post_init__(self) -> None:
        ports = [self.gateway_port, self.predictor_port, self.engine_port, self.quantizer_port]
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"service ports must be distinct and in 1..65535, got {ports}")


@dataclass
class _Child:
    role: str
    port: int
    process: subprocess.Popen


def _has_server(role: str) -> bool:
    return importlib.util.find_spec(f"services.{role}.server") is not None


def wait_serving(addr: str, deadline_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll the standard health service until SERVING; raise if the process dies or time runs out."""
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline_s:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{addr}: process exited with {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == _SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{addr} did not become SERVING in time")


class Stack:
    """Starts the services as child processes wired through env vars, stops them in reverse."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: list[_Child] = []
        self.redis: EmbeddedRedis | None = None
        self.stop_requested = threading.Event()

    def _env(self, redis_url: str) -> dict[str, str]:
        c = self.config
        env = dict(os.environ, REDIS_URL=redis_url, GATEWAY_PORT=str(c.gateway_port),
                   PREDICTOR_PORT=str(c.predictor_port), ENGINE_PORT=str(c.engine_port),
                   QUANTIZER_PORT=str(c.quantizer_port))
        env.setdefault("LOG_FORMAT", "text")  # a person reads this console
        if self._wants("predictor"):
            env.setdefault("GATEWAY_PREDICTOR_ADDR", f"localhost:{c.predictor_port}")
            env.setdefault("ENGINE_PREDICTOR_ADDR", f"localhost:{c.predictor_port}")
        if self._wants("quantizer"):
            env.setdefault("GATEWAY_QUANTIZER_ADDR", f"localhost:{c.quantizer_port}")
        return env

    def _wants(self, role: str) -> bool:
        enabled = {"predictor": self.config.with_predictor,
                   "quantizer": self.config.with_quantizer}.get(role, True)
        return enabled and _has_server(role)

    def _spawn(self, role: str, port: int, env: dict[str, str]) -> _Child:
        # Own session: the supervisor decides the shutdown order, not the terminal's Ctrl-C.
        process = subprocess.Popen([sys.executable, "-m", f"services.{role}.server"], env=env,
                                   start_new_session=True)
        child = _Child(role, port, process)
        self.children.append(child)
        log.info("started %s (pid %d) on port %d", role, process.pid, port)
        return child

    def start(self) -> None:
        c = self.config
        redis_url = c.redis_url
        if not redis_url:
            self.redis = EmbeddedRedis()
            redis_url = self.redis.start()
        env = self._env(redis_url)
        backends = [(role, port) for role, port in (("predictor", c.predictor_port),
                                                    ("quantizer", c.quantizer_port),
                                                    ("engine", c.engine_port))
                    if self._wants(role)]
        # Peers first: the gateway should not accept requests nobody can predict or serve.
        for role, port in backends:
            self._spawn(role, port, env)
        deadline = time.monotonic() + c.startup_timeout_s
        for child in list(self.children):
            try:
                self._wait(child, deadline)
            except (RuntimeError, TimeoutError) as exc:
                if child.role == "engine":
                    raise
                # Gateway and engine work without these (no predictions / no re-quantization).
                log.warning("%s failed to start (%s); continuing without it", child.role, exc)
                child.process.kill()
                child.process.wait()
                self.children.remove(child)
        self._wait(self._spawn("gateway", c.gateway_port, env), deadline)

    def _wait(self, child: _Child, deadline_s: float) -> None:
        while not self.stop_requested.is_set():
            try:
                wait_serving(f"localhost:{child.port}", min(deadline_s, time.monotonic() + 2),
                             child.process)
                log.info("%s is SERVING on port %d", child.role, child.port)
                return
            except TimeoutError:
                if time.monotonic() >= deadline_s:
                    raise TimeoutError(f"{child.role} did not become SERVING in "
                                       f"{self.config.startup_timeout_s:.0f} s") from None
        raise KeyboardInterrupt

    def register_adapters(self) -> list[str]:
        """Register every ./adapters/<name>/ as task <name>; already registered ones are kept."""
        from services.common.pb.inlaid.v1 import gateway_pb2, gateway_pb2_grpc

        root = Path(self.config.adapters_dir)
        dirs = sorted(p for p in root.glob("*") if (p / "adapter_config.json").is_file())
        added = []
        with grpc.insecure_channel(f"localhost:{self.config.gateway_port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for path in dirs:
                request = gateway_pb2.AddTaskRequest(name=path.name, adapter_path=str(path.resolve()))
                try:
                    stub.AddTask(request, timeout=60)
                    added.append(path.name)
                except grpc.RpcError as exc:
                    if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                        log.warning("adapter %s not registered: %s", path, exc.details())
        return added

    def watch(self) -> int:
        """Block until a signal or a child's death; returns the exit status for the supervisor."""
        while not self.stop_requested.wait(0.5):
            for child in self.children:
                if child.process.poll() is not None:
                    log.error("%s exited unexpectedly with %d; stopping the stack", child.role,
                              child.process.returncode)
                    return 1
        return 0

    def stop(self) -> None:
        for child in reversed(self.children):  # gateway first: no new requests while engines drain
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(self.config.grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", child.role,
                                self.config.grace_s)
                    child.process.kill()
                    child.process.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the whole stack on this machine",
                              description="Start Redis (embedded unless REDIS_URL), predictor, "
                                          "quantizer, engine and gateway; Ctrl-C stops them.")
    defaults = StackConfig()
    for role in ("gateway", "predictor", "engine", "quantizer"):
        p.add_argument(f"--{role}-port", type=int, default=getattr(defaults, f"{role}_port"))
    p.add_argument("--adapters", default=defaults.adapters_dir,
                   help="directory whose subdirectories are registered as tasks at start")
    p.add_argument("--no-predictor", action="store_true")
    p.add_argument("--no-quantizer", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=defaults.startup_timeout_s)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = StackConfig(gateway_port=args.gateway_port, predictor_port=args.predictor_port,
                         engine_port=args.engine_port, quantizer_port=args.quantizer_port,
                         redis_url=os.environ.get("REDIS_URL", ""), adapters_dir=args.adapters,
                         with_predictor=not args.no_predictor, with_quantizer=not args.no_quantizer,
                         startup_timeout_s=args.startup_timeout)
    stack = Stack(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stack.stop_requested.set())
    try:
        stack.start()
        tasks = stack.register_adapters()
        roles = ", ".join(f"{c.role} :{c.port}" for c in stack.children)
        print(f"inlaid is serving: gateway localhost:{config.gateway_port} ({roles}); "
              f"redis {'embedded at ' + stack.redis.url if stack.redis else config.redis_url}; "
              f"tasks registered: {', '.join(tasks) or 'none'}\n"
              f"try: inlaid generate --prompt 'What is 2+2?'   (Ctrl-C stops the stack)",
              flush=True)
        return stack.watch()
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        print("stopping inlaid ...", file=sys.stderr, flush=True)
        stack.stop()
