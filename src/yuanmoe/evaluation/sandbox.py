"""Running untrusted generated code: a separate Python process in a fresh temporary directory,
with a wall-clock and CPU time limit, an address-space limit, no network, and no way to leave
children running behind it.

The child sets its own limits before it runs the program (rather than a `preexec_fn`, which is not
safe while other threads are starting processes). Network isolation is a new network namespace
when the kernel grants one (root, or unprivileged user namespaces), and in every case the socket
module refuses to open connections.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, TIMEOUT, OUT_OF_MEMORY = "passed", "failed", "timed out", "out of memory"

# Runs in the child before the program: limits, network off, then the program as __main__.
_BOOTSTRAP = r"""
import ctypes, resource, runpy, socket, sys
memory_bytes, cpu_seconds, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
except OSError:
    pass
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
class _NoSocket(socket.socket):
    __init__ = _no_network
socket.socket = _NoSocket
socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
sys.argv = [program]
runpy.run_path(program, run_name="__main__")
"""


@dataclass
class ExecutionResult:
    status: str  # PASSED, FAILED, TIMEOUT or OUT_OF_MEMORY
    detail: str = ""  # the last line of the error output, for a failure

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run `program` in a sandboxed interpreter; it passes when it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="yuan-sandbox-") as workdir:
        path = Path(workdir) / "program.py"
        path.write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(memory_mb << 20),
                   str(max(1, int(timeout_s) + 1)), str(path)]
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecutionResult(TIMEOUT, f"no result within {timeout_s:g} s")
        finally:
            _kill_group(proc)  # whatever the program forked must not outlive it
    return _classify(proc.returncode, stderr.decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _classify(returncode: int, stderr: str) -> ExecutionResult:
    if returncode == 0:
        return ExecutionResult(PASSED)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {returncode}"
    if "MemoryError" in stderr:
        return ExecutionResult(OUT_OF_MEMORY, last)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecutionResult(TIMEOUT, "CPU time limit reached")
    return ExecutionResult(FAILED, last)
