"""Shared pieces of the benchmarks: statistics, per-request timing records, machine facts and
results files. Torch-free at import (torch is imported inside the functions that need it)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


# ---------------------------------------------------------------------------------- GPU busy


class GpuBusy:
    """NVML's utilization.gpu (the share of its last sample period, 1/6 s to 1 s, in which a kernel
    ran) polled every `period` s on every visible GPU while a level runs: its mean says how much of
    the level the GPUs computed, so the rest is time the serving stack left them idle. `result()`
    is None without NVML (no nvidia-ml-py, no GPU): the figure is then simply absent."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.samples: list[list[int]] = []
        self.times: list[float] = []  # time.perf_counter() of each sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver or no GPU
            self._handles = []

    def __enter__(self) -> GpuBusy:
        if self._handles:
            self._thread = threading.Thread(target=self._poll, name="gpu-busy", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()  # before the reading: a sample at or after `since` reads after it
            self.samples.append([self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles])
            self.times.append(t)
            time.sleep(self.period)

    def result(self, since: float | None = None) -> list[float] | None:
        """Mean utilization (%) per GPU over the samples taken (those from time.perf_counter()
        `since` on, when given: a level whose client processes start before its clock does)."""
        samples = [v for v, t in zip(self.samples, self.times, strict=True) if since is None or t >= since]
        if not samples:
            return None
        return [round(sum(col) / len(col), 1) for col in zip(*samples, strict=True)]


# ---------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default "linear" method). NaN for no values."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float], *, scale: float = 1.0) -> dict[str, float]:
    """n, mean, p50, p90, p99, min, max of `values` multiplied by `scale` (e.g. 1e3 for s -> ms)."""
    v = [x * scale for x in values]
    if not v:
        return {
            "n": 0,
            "mean": math.nan,
            "p50": math.nan,
            "p90": math.nan,
            "p99": math.nan,
            "min": math.nan,
            "max": math.nan,
        }
    return {
        "n": len(v),
        "mean": sum(v) / len(v),
        "p50": percentile(v, 50),
        "p90": percentile(v, 90),
        "p99": percentile(v, 99),
        "min": min(v),
        "max": max(v),
    }


@dataclass
class RequestRecord:
    """One streamed request as the client saw it. Times are time.perf_counter() seconds.

    `chunk_times` holds the arrival time of every streamed token event; a server that sends
    several tokens in one event would show up as fewer chunks than output tokens, which is why
    `output_tokens` is kept separately (from the final details when the server gives them)."""

    start: float
    input_tokens: int
    chunk_times: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        """Time to first token: request sent -> first token event."""
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        assert self.end is not None
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        """Every inter-token gap (between consecutive token events)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1), as vLLM's
        bench defines it; None for a one-token answer."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def aggregate(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Serving metrics over one run (like `vllm bench serve`): latencies in ms, throughputs per s."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "input_tokens": sum(r.input_tokens for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (out_tokens + sum(r.input_tokens for r in ok)) / duration_s
        if duration_s > 0
        else math.nan,
        "ttft_ms": summarize([r.ttft for r in ok], scale=1e3),
        "tpot_ms": summarize(tpots, scale=1e3),
        "itl_ms": summarize([g for r in ok for g in r.itls], scale=1e3),
        "e2e_ms": summarize([r.e2e for r in ok], scale=1e3),
        "output_tokens_per_request": summarize([r.output_tokens for r in ok]),
    }


def exit_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into SystemExit, so `with` blocks run and stop the
    servers a benchmark started instead of leaving them holding the GPU."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------- machine facts


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (
            out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # missing, or broken on this machine (e.g. triton without a GPU)
        return None


def machine_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine skews CPU numbers
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "git_commit": git_commit(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": [],
    }
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        facts["cuda"] = torch.version.cuda
    return facts


def card_name(facts: dict[str, Any]) -> str:
    """ "cpu", or the first GPU's name as a file-name token: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    if not facts.get("gpus"):
        return "cpu"
    name = facts["gpus"][0].lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def results_path(name: str, facts: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return out_dir / f"{name}-{card_name(facts)}-{stamp}.json"


def write_results(payload: dict[str, Any], *, name: str, out: str | None) -> Path:
    """Writes `payload` (which must hold "machine") to `out`, or to bench/results/<name>-<card>-<date>.json."""
    path = Path(out) if out else results_path(name, payload["machine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable, allow_nan=True) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table; floats get 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def parse_int_list(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4] (argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]
