"""Child processes of the launcher: start, watch, stop (no orphans), and readiness probes.

Every child runs in its own session (process group), so a terminal's Ctrl-C reaches only the
launcher, which then stops the children in order. mpiexec (MPICH's hydra) puts each rank in a
session of its own too, so killing mpiexec's group does not reach the ranks: stop() asks mpiexec
(SIGTERM, which it forwards to the ranks), and on escalation kills every process that carries the
child's marker in its environment. Ranks inherit that variable from mpiexec, so they are found
even after mpiexec is gone and they were re-parented to init.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger("launcher")

MARKER_ENV = "TGI_TRTLLM_CHILD"  # value: "<launcher pid>:<child name>"
HEALTH_METHOD = "/tgi_trtllm.v1.TextGenerationService/Health"
SERVICE_DISCOVERY_METHOD = "/tgi_trtllm.v1.TextGenerationService/ServiceDiscovery"
POLL_S = 0.2
PROGRESS_EVERY_S = 5.0


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived: shut down and exit 0."""


class ChildExited(Exception):
    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} {describe_exit(child.popen.returncode)}")
        self.child = child


class StartupTimeout(Exception):
    pass


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@dataclass
class Child:
    name: str  # "shard world (mpiexec)" | "router": used in every message about it
    popen: subprocess.Popen
    marker: str

    @property
    def running(self) -> bool:
        return self.popen.poll() is None


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment holds MARKER_ENV=marker (Linux /proc; [] elsewhere)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return found


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Owns the children; turns SIGINT/SIGTERM into StopRequested at the next wait."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.children: list[Child] = []
        self.grace_s = grace_s
        self._stop = threading.Event()
        self.stop_signal: str | None = None

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signal.Signals(signum).name
            self._stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        marker = f"{os.getpid()}:{name}"
        popen = subprocess.Popen(list(argv), env={**env, MARKER_ENV: marker}, start_new_session=True)
        child = Child(name=name, popen=popen, marker=marker)
        self.children.append(child)
        log.info("started %s (pid %d)", name, popen.pid)
        return child

    def check(self) -> None:
        """Raises StopRequested or ChildExited when either has happened."""
        if self._stop.is_set():
            raise StopRequested(self.stop_signal or "stop")
        for child in self.children:
            if not child.running:
                raise ChildExited(child)

    def wait_until(self, ready: Callable[[], bool], *, what: str, timeout_s: float) -> None:
        """Polls `ready` until it holds, logging progress; raises on a signal, a dead child or timeout."""
        started = time.monotonic()
        next_progress = started + PROGRESS_EVERY_S
        while True:
            self.check()
            if ready():
                return
            now = time.monotonic()
            if now - started > timeout_s:
                raise StartupTimeout(f"{what}: not ready after {timeout_s:.0f} s (raise --startup-timeout?)")
            if now >= next_progress:
                log.info("waiting for %s (%.0f s)...", what, now - started)
                next_progress = now + PROGRESS_EVERY_S
            self._stop.wait(POLL_S)

    def supervise(self) -> None:
        """Blocks until a signal (StopRequested) or a child's exit (ChildExited)."""
        while True:
            self.check()
            self._stop.wait(POLL_S)

    def stop(self, child: Child) -> None:
        """SIGTERM to the child's group, up to grace_s for it and its marked processes, then SIGKILL."""
        deadline = time.monotonic() + self.grace_s
        if child.running:
            log.info("stopping %s", child.name)
            _signal_group(child.popen.pid, signal.SIGTERM)
            try:
                child.popen.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
        while marked_pids(child.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = marked_pids(child.marker)
        if child.running or leftovers:
            log.warning("%s did not stop within %.0f s; killing it", child.name, self.grace_s)
            _signal_group(child.popen.pid, signal.SIGKILL)
            for pid in leftovers:
                _kill(pid, signal.SIGKILL)
        child.popen.wait()

    def stop_all(self) -> None:
        """Stops children in reverse start order (router before shards)."""
        for child in reversed(self.children):
            self.stop(child)


# ---------------------------------------------------------------- readiness probes (no router/shard imports)


def _unary(url: str, method: str, timeout_s: float) -> bytes | None:
    """One raw unary call with an empty request; the response bytes, or None if it failed."""
    try:
        with grpc.insecure_channel(url) as channel:
            call = channel.unary_unary(
                method, request_serializer=lambda x: x, response_deserializer=lambda x: x
            )
            return call(b"", timeout=timeout_s)
    except grpc.RpcError:
        return None


def shard_healthy(url: str, timeout_s: float = 2.0) -> bool:
    return _unary(url, HEALTH_METHOD, timeout_s) is not None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_service_discovery(data: bytes) -> list[str]:
    """ServiceDiscoveryResponse is `repeated string urls = 1`: decode that field by hand."""
    urls, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if field_number == 1:
                urls.append(data[pos : pos + length].decode())
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    return urls


def shard_urls(url: str, timeout_s: float = 5.0) -> list[str] | None:
    """Every rank's URL as rank 0 at `url` advertises it, or None if it did not answer."""
    data = _unary(url, SERVICE_DISCOVERY_METHOD, timeout_s)
    return None if data is None else decode_service_discovery(data)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
