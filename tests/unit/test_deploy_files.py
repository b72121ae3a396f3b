"""Deployment files cannot run here (no Docker), so they are checked against the code.

The Dockerfile, docker-compose.yml, deploy/nginx.conf, railway.json and
deploy/railway.worker.json name commands, import paths, settings, ports and health
paths; each test reads what a file names and checks it against what the code has: the
`flywheel` parser's subcommands, the objects uvicorn and arq import, `Settings`' fields,
`create_app`'s routes, and the other files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import main as flywheel_main
from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {name.upper() for name in Settings.model_fields}
# Set on flywheel containers without being settings: uvicorn reads FORWARDED_ALLOW_IPS;
# OTEL_* and LANGSMITH_* are the libraries' standard variables.
EXTERNAL_ENV = {"FORWARDED_ALLOW_IPS"}
EXTERNAL_ENV_PREFIXES = ("OTEL_", "LANGSMITH_")
# The Dockerfile's own ENV for Python and pip, not the app's.
TOOLING_ENV = {
    "PATH",
    "VIRTUAL_ENV",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}
HEALTHY = {"service_healthy", "service_completed_successfully"}
ENV_REF = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
# `flywheel ...`, `uvicorn ...` and `arq ...` inside a RUN's shell line.
RUN_COMMAND = re.compile(r"(?:^|&&|;|\|\|)\s*((?:flywheel|uvicorn|arq)\b[^&;|>]*)")
LOCAL_URL_PATH = re.compile(r"http://(?:127\.0\.0\.1|localhost)(?::[^/'\"\s]*)?(/[^'\"\s]*)")


# --- reading the files ---------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def flywheel_services() -> dict[str, dict[str, Any]]:
    """The services that run this repository's image (built from the Dockerfile)."""
    return {name: s for name, s in services().items() if "build" in s}


def gateway_services() -> dict[str, dict[str, Any]]:
    """Flywheel services running the image's default command: the gateway."""
    return {name: s for name, s in flywheel_services().items() if "command" not in s}


def balancer() -> tuple[str, dict[str, Any]]:
    mounted = [
        (name, s)
        for name, s in services().items()
        if any("deploy/nginx.conf" in str(v) for v in s.get("volumes", []))
    ]
    assert len(mounted) == 1, "one service mounts deploy/nginx.conf"
    return mounted[0]


def railway(path: str = "railway.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / path).read_text())
    return data


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) for each FROM."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append((name, []))
        elif stages:
            stages[-1][1].append((keyword, args))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1][1]


def env_instructions(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r} is not in exec form"
    return [str(v) for v in value]


def dockerfile_cmd() -> str:
    cmds = [args for keyword, args in final_stage() if keyword == "CMD"]
    assert len(cmds) == 1
    return " ".join(exec_form(cmds[0]))


def dockerfile_healthcheck() -> str:
    checks = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    return checks[0]


@cache
def nginx_conf() -> str:
    return re.sub(r"#[^\n]*", "", (ROOT / "deploy" / "nginx.conf").read_text())


def nginx_upstream_servers() -> list[tuple[str, int]]:
    servers = re.findall(r"^\s*server\s+([A-Za-z0-9._-]+):(\d+)\b", nginx_conf(), re.M)
    return [(host, int(port)) for host, port in servers]


def compose_healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def commands_run_by_the_files() -> list[list[str]]:
    """Every command line the deployment files run in the image."""
    lines: list[list[str]] = []
    for s in flywheel_services().values():
        if "command" in s:
            command = s["command"]
            lines.append(command if isinstance(command, list) else shlex.split(command))
        if "healthcheck" in s and not s["healthcheck"].get("disable"):
            lines.append([part for part in s["healthcheck"]["test"] if part != "CMD"])
    for path in ("railway.json", "deploy/railway.worker.json"):
        deploy = railway(path)["deploy"]
        lines.append(shlex.split(deploy["startCommand"]))
        lines.extend(shlex.split(c) for c in deploy.get("preDeployCommand", []))
    lines.append(shlex.split(dockerfile_cmd()))
    for _, instructions in dockerfile_stages():
        for keyword, args in instructions:
            if keyword == "RUN":
                lines.extend(m.split() for m in RUN_COMMAND.findall(args))
    return lines


def flattened(lines: list[list[str]]) -> list[list[str]]:
    """`sh -c 'exec x y'` counts as `x y` too."""
    out = []
    for words in lines:
        out.append(words)
        if len(words) >= 3 and words[0] in {"sh", "/bin/sh"} and words[1] == "-c":
            inner = shlex.split(words[2])
            out.append(inner[1:] if inner[:1] == ["exec"] else inner)
    return out


def interpolated(value: object) -> str:
    """A compose value as the container sees it, with the defaults of `${VAR:-x}`."""

    def sub(match: re.Match[str]) -> str:
        operator, rest = match.group(2) or "", match.group(3) or ""
        if operator in {":-", "-"}:
            return rest
        if operator in {":?", "?"}:
            return "set-by-the-operator-0123456789"
        return ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", sub, str(value))


# --- commands and import paths --------------------------------------------------------


def test_flywheel_subcommands_the_files_run_exist(capsys: pytest.CaptureFixture[str]) -> None:
    named = {
        words[1]
        for words in flattened(commands_run_by_the_files())
        if len(words) >= 2 and words[0] == "flywheel" and not words[1].startswith("-")
    }
    assert {"migrate", "worker"} <= named
    for sub in sorted(named):
        # argparse answers `--help` for a subcommand it has and exits 2 for one it lacks.
        with pytest.raises(SystemExit) as exit_info:
            flywheel_main([sub, "--help"])
        assert exit_info.value.code == 0, f"`flywheel {sub}` is not a subcommand"
    capsys.readouterr()


def test_import_paths_the_files_name_resolve(tmp_path: Path) -> None:
    """`uvicorn X` and `arq [--check] Y` targets, resolved the way uvicorn and arq do it,
    in a clean process (no .env, no routes file, no FLYWHEEL_* from this one)."""
    uvicorn_targets, arq_targets = set(), set()
    for words in flattened(commands_run_by_the_files()):
        args = [w for w in words[1:] if not w.startswith("-")]
        if words[:1] == ["uvicorn"] and args:
            uvicorn_targets.add(args[0])
        if words[:1] == ["arq"] and args:
            arq_targets.add(args[0])
    assert uvicorn_targets == {"app.main:app"}
    assert arq_targets == {"workers.main.WorkerSettings"}
    script = (
        "import sys\n"
        "from fastapi import FastAPI\n"
        "from uvicorn.importer import import_from_string\n"
        "from arq.utils import import_string\n"
        "for target in sys.argv[1].split():\n"
        "    assert isinstance(import_from_string(target), FastAPI), target\n"
        "for target in sys.argv[2].split():\n"
        "    settings = import_string(target)\n"
        "    assert settings.functions and settings.redis_settings, target\n"
        "print('resolved')\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in SETTINGS and not k.upper().startswith("FLYWHEEL_")
    }
    env["FLYWHEEL_VAR_DIR"] = str(tmp_path / "var")
    done = subprocess.run(
        [sys.executable, "-c", script, " ".join(uvicorn_targets), " ".join(arq_targets)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resolved" in done.stdout


def test_compose_roles_and_commands() -> None:
    s = services()
    assert {"redis", "postgres", "migrate", "worker"} <= set(s)
    assert s["migrate"]["command"] == ["flywheel", "migrate"]
    assert s["migrate"].get("restart") == "no"
    assert s["worker"]["command"] == ["flywheel", "worker"]
    # Two gateway replicas, identical but for their names.
    gateways = gateway_services()
    assert len(gateways) >= 2, sorted(gateways)
    first, *others = gateways.values()
    assert all(other == first for other in others)


# --- settings ------------------------------------------------------------------------


def allowed_env(name: str) -> bool:
    return name in SETTINGS or name in EXTERNAL_ENV or name.startswith(EXTERNAL_ENV_PREFIXES)


def test_compose_sets_only_settings_and_known_variables() -> None:
    for name, s in flywheel_services().items():
        unknown = {k for k in s["environment"] if not allowed_env(k)}
        assert not unknown, f"{name} sets {sorted(unknown)}: not settings in app/config.py"


@pytest.mark.parametrize("name", sorted(flywheel_services()))
def test_compose_environment_is_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a service's environment holds (with compose's defaults) is a startable config."""
    for var in SETTINGS:
        monkeypatch.delenv(var, raising=False)
    environment = flywheel_services()[name]["environment"]
    for var, value in environment.items():
        monkeypatch.setenv(var, interpolated(value))
    settings = Settings(_env_file=None)
    assert settings.flywheel_env == "prod"
    assert settings.redis_url is not None
    assert settings.database_dsn.startswith("postgresql+asyncpg://")


def test_dockerfile_and_start_commands_use_only_settings() -> None:
    env = env_instructions(final_stage())
    assert set(env) - SETTINGS - TOOLING_ENV == set()
    assert env["FLYWHEEL_ENV"] == "prod"
    referenced = set(ENV_REF.findall(dockerfile_cmd() + dockerfile_healthcheck()))
    for path in ("railway.json", "deploy/railway.worker.json"):
        referenced |= set(ENV_REF.findall(railway(path)["deploy"]["startCommand"]))
    assert {"PORT", "HOST"} <= referenced
    assert referenced - SETTINGS == set()


# --- ports and health paths ----------------------------------------------------------


@cache
def gateway_app() -> Any:
    from app.main import create_app

    return create_app(Settings(_env_file=None))


def serves_get(path: str) -> bool:
    """Whether create_app's router has a GET route for exactly this path."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(r.matches(scope)[0] == Match.FULL for r in gateway_app().router.routes)


def health_paths() -> dict[str, str]:
    found = {"Dockerfile HEALTHCHECK": dockerfile_healthcheck()}
    for name, s in gateway_services().items():
        found[f"compose {name}"] = compose_healthcheck(s)
    found["compose balancer"] = compose_healthcheck(balancer()[1])
    paths = {}
    for where, text in found.items():
        match = LOCAL_URL_PATH.search(text)
        assert match, f"{where}: no local URL in {text!r}"
        paths[where] = match.group(1)
    paths["railway.json"] = railway()["deploy"]["healthcheckPath"]
    return paths


def test_health_paths_are_routes() -> None:
    paths = health_paths()
    assert set(paths.values()) == {"/health"}, paths
    assert serves_get("/health")
    assert not serves_get("/health-not-a-route")  # the check can say no


def test_dockerfile_healthcheck_and_cmd_honour_port() -> None:
    # Python reads $PORT itself in the healthcheck; the shell expands it in the CMD.
    assert re.search(r"environ(\.get\(|\[)\s*['\"]PORT['\"]", dockerfile_healthcheck())
    cmd = dockerfile_cmd()
    assert cmd.startswith("sh -c exec uvicorn app.main:app")
    assert '--port "$PORT"' in cmd
    assert '--host "$HOST"' in cmd


def test_ports_agree() -> None:
    env = env_instructions(final_stage())
    port = int(env["PORT"])
    exposed = {int(args) for keyword, args in final_stage() if keyword == "EXPOSE"}
    assert exposed == {port}
    for name, s in gateway_services().items():
        assert int(s["environment"].get("PORT", port)) == port, name
        assert {int(p) for p in s.get("expose", [port])} == {port}, name
        assert "ports" not in s, f"{name} publishes a port: only the balancer should"
    assert {p for _, p in nginx_upstream_servers()} == {port}
    # Host 8000 goes to the port nginx listens on.
    _, lb = balancer()
    listen = {int(p) for p in re.findall(r"^\s*listen\s+(\d+)", nginx_conf(), re.M)}
    published = [str(p).rsplit(":", 2)[-2:] for p in lb["ports"]]
    assert [(int(host), int(inside)) for host, inside in published] == [(8000, *listen)]


# --- replicas, balancer and dependencies ----------------------------------------------


def test_balancer_points_at_every_gateway() -> None:
    name, lb = balancer()
    assert lb["image"].startswith("nginx:")
    hosts = {host for host, _ in nginx_upstream_servers()}
    assert hosts == set(gateway_services())
    assert {k for k, v in lb["depends_on"].items() if v["condition"] == "service_healthy"} == (
        hosts
    )
    mount = next(v for v in lb["volumes"] if "deploy/nginx.conf" in v)
    source, target = mount.split(":")[:2]
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf", name


def test_balancer_streams_and_sets_the_client_address() -> None:
    conf = nginx_conf()
    upstream = re.search(r"upstream\s+(\S+)\s*\{", conf)
    assert upstream
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    assert re.search(r"proxy_buffering\s+off;", conf), "SSE chunks would be held back"
    assert re.search(r"proxy_http_version\s+1\.1;", conf)
    trusting = [
        n for n, s in gateway_services().items() if s["environment"].get("FORWARDED_ALLOW_IPS")
    ]
    if trusting:
        # The gateways believe X-Forwarded-For: the balancer must replace the client's.
        assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$remote_addr;", conf)
    # Its own 502/503/504 are OpenAI-shaped like the gateways' errors.
    bodies = re.findall(r"return\s+(50\d)\s+'([^']*)';", conf)
    assert {code for code, _ in bodies} >= {"503", "504"}
    for _, body in bodies:
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_every_dependency_is_health_gated() -> None:
    s = services()
    for name, service in s.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert isinstance(spec, dict), f"{name} -> {dep}: no condition"
            condition = spec["condition"]
            assert condition in HEALTHY, f"{name} -> {dep}: {condition}"
            if condition == "service_healthy":
                check = s[dep].get("healthcheck", {})
                assert check.get("test"), f"{dep} has no healthcheck"
                assert not check.get("disable"), f"{dep}'s healthcheck is disabled"
            else:
                assert s[dep].get("restart") == "no", f"{dep} is not a one-shot"
    for name in [*gateway_services(), "worker"]:
        deps = s[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_files_volume_is_shared_by_gateways_and_worker() -> None:
    for name in [*gateway_services(), "worker"]:
        service = flywheel_services()[name]
        files_dir = service["environment"]["FLYWHEEL_FILES_DIR"]
        assert f"files:{files_dir}" in service["volumes"], name
    assert "files" in compose()["volumes"]
    # The image creates it for the non-root user, so a new volume starts owned by them.
    runs = " ".join(args for keyword, args in final_stage() if keyword == "RUN")
    assert files_dir in runs
    assert "chown" in runs


# --- the image -----------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_slim_non_root_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    names = {name for name, _ in stages[:-1] if name}
    runtime = final_stage()
    copied_from = {
        m.group(1)
        for keyword, args in runtime
        if keyword == "COPY" and (m := re.match(r"--from=(\S+)", args))
    }
    assert copied_from, "the runtime copies from a build stage"
    assert copied_from <= names
    builder = dict(stages)[next(iter(copied_from))]
    builder_runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "pip install" in builder_runs
    assert " -e ." in builder_runs
    runtime_runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert "pip install" not in runtime_runs
    assert "build-essential" not in runtime_runs
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert f" {users[-1]}" in runtime_runs, "the runtime user is created in the runtime stage"


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "no re-includes: keep the matcher below honest"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex + "(?:/.*)?"))
    return patterns


def test_build_context_has_what_the_dockerfile_copies() -> None:
    ignored = dockerignore_patterns()

    def excluded(rel: str) -> bool:
        return any(p.fullmatch(rel) for p in ignored)

    for name in (".venv", "var", ".git", "test-artifacts", ".env", ".mypy_cache"):
        assert excluded(name), f".dockerignore lets {name} into the build context"
    sources = []
    for _stage_name, instructions in dockerfile_stages():
        for keyword, args in instructions:
            if keyword == "COPY" and not args.startswith("--from"):
                sources.extend(args.split()[:-1])
    assert {"app", "workers", "migrations", "alembic.ini", "pyproject.toml"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else list(path.rglob("*"))
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and "__pycache__" not in rel:
                assert not excluded(rel), f"{rel} is copied but .dockerignore drops it"
    # The dashboard's pages come with app/ (package data, served from the editable install).
    assert (ROOT / "app" / "dashboard" / "static" / "index.html").is_file()


# --- Railway -------------------------------------------------------------------------


def test_railway_deploys_the_gateway() -> None:
    config = railway()
    assert config["build"]["builder"] == "DOCKERFILE"
    assert (ROOT / config["build"]["dockerfilePath"]).is_file()
    deploy = config["deploy"]
    assert serves_get(deploy["healthcheckPath"])
    start = shlex.split(deploy["startCommand"])
    assert start[:2] == ["sh", "-c"], "exec-form start commands do not expand $PORT"
    assert "uvicorn app.main:app" in start[2]
    assert "${PORT" in start[2]
    assert deploy["preDeployCommand"] == ["flywheel migrate"]
    assert deploy["restartPolicyType"] in {"ON_FAILURE", "ALWAYS"}


def test_railway_worker_service_config() -> None:
    config = railway("deploy/railway.worker.json")
    assert config["build"] == railway()["build"], "the worker runs the gateway's image"
    deploy = config["deploy"]
    assert deploy["startCommand"] == "flywheel worker"
    # No HTTP server to probe; migrations run once, in the gateway's pre-deploy step.
    assert "healthcheckPath" not in deploy
    assert "preDeployCommand" not in deploy


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
