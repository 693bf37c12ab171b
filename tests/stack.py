"""Starts the whole stack (launcher -> mpiexec shards -> router) as real processes for tests and
benchmarks, and stops it cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launcher_cmd() -> list[str]:
    return [sys.executable, "-m", "launcher"]


@contextlib.contextmanager
def running_stack(args: Sequence[str] = (), *, timeout: float = 240.0, env: dict | None = None) -> Iterator[Stack]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="tgi-trtllm-test-"))
    log_path = tmp / "stack.log"
    cmd = [
        *launcher_cmd(),
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--shard-uds-path", str(tmp / "shard"),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=full_env,
                                start_new_session=True)
    stack = Stack(base_url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stack exited with {proc.returncode} before ready:\n{stack.log()[-6000:]}")
            try:
                if httpx.get(stack.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack not ready after {timeout}s:\n{stack.log()[-6000:]}")
            time.sleep(0.5)
        yield stack
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
