"""Run untrusted generated code against test cases in a resource-limited child process."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile

# The child reads {"code", "function", "tests", "tag"} on stdin and prints "<tag> <passed>".
# The tag is random per call, so generated code cannot forge the result line by printing.
_HARNESS = r"""
import json, sys
job = json.loads(sys.stdin.read())
_BLOCKED = ("os.system", "os.exec", "os.fork", "os.posix_spawn", "os.spawn", "os.kill", "os.remove",
            "os.rename", "os.rmdir", "os.mkdir", "os.unlink", "os.chmod", "os.truncate",
            "subprocess.", "socket.", "shutil.", "ctypes.", "pty.", "urllib.")

def _guard(event, args):
    # Audit hooks cannot be removed from Python code: the generated code may compute, not act.
    if event.startswith(_BLOCKED):
        raise PermissionError(event)
    if event == "open" and (args[1] is None or any(c in str(args[1]) for c in "wax+")):
        raise PermissionError("open for writing")

sys.addaudithook(_guard)
passed = 0
try:
    ns = {}
    exec(compile(job["code"], "<generated>", "exec"), ns)
    fn = ns[job["function"]]
    for args, want in job["tests"]:
        try:
            got = fn(*args)
            if isinstance(got, tuple):
                got = list(got)
            passed += got == want
        except Exception:
            pass
except BaseException:
    pass
sys.__stdout__.write("\n%s %d\n" % (job["tag"], passed))
"""


def _limit_resources() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (2, 2))
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file writes
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


def run_tests(code: str, function: str, tests: list, timeout_s: float = 5.0) -> float:
    """Fraction of (args, expected) tests that `function` defined by `code` passes; 0 on any failure."""
    tag = secrets.token_hex(8)
    job = json.dumps({"code": code, "function": function, "tests": tests, "tag": tag})
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", "-c", _HARNESS], input=job,
                                  capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                                  env={"PATH": os.defpath}, preexec_fn=_limit_resources)
        except subprocess.TimeoutExpired:
            return 0.0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(tag + " "):
            return int(line.split()[1]) / len(tests)
    return 0.0
