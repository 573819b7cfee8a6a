"""Deployment artefacts against the code they deploy (no Docker engine needed).

Structure: docker-compose.yml, the Dockerfile, deploy/haproxy.cfg and deploy/k8s/ are parsed and
checked for what drifts: every command names a real file and real flags (from the scripts'
own --help), every XRATES_*/DATABASE_URL variable is a setting util.load_settings reads, every
health check and probe hits a real route of sanic_app.app, and the ports line up.

Processes: the compose topology runs for real (embedded PostgreSQL, two updaters, three API
instances, Debian's haproxy with deploy/haproxy.cfg, only its server lines and bind ports
rewritten) and serves every client request through SIGKILL of the active updater and of one API
instance; an instance whose /ready turns 503 leaves rotation and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg
import debian
import httpx
import pytest
import yaml
from conftest import ROOT, ApiProcess, fresh_database, wait_for

import model
import sources
import util

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
K8S = ROOT / "deploy" / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"
UPDATER = ROOT / "updater.py"

APP_SERVICES = ("migrate", "updater", "api")  # built from the Dockerfile
SETTING_NAME = re.compile(r"\A(?:XRATES_[A-Z0-9_]+|DATABASE_URL)\Z")
TOKEN = "deploy-test-token"


# --------------------------------------------------------------------------- facts from the code
class _RecordingEnv(dict):
    """An empty environment that remembers every name load_settings asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.names.add(key)
        return default

    def __getitem__(self, key: str) -> Any:
        self.names.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.names.add(str(key))
        return False


@functools.cache
def setting_names() -> frozenset[str]:
    """Every environment variable util.load_settings reads (asked of it, not copied from it)."""
    env = _RecordingEnv()
    util.load_settings(env)
    assert "DATABASE_URL" in env.names and "XRATES_SOURCES" in env.names, env.names
    return frozenset(env.names)


def documented_setting_names() -> set[str]:
    """The settings an operator must find documented (the offline demo source has no URL)."""
    return {name for name in setting_names() if name != "XRATES_DEMO_URL"}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not SETTING_NAME.match(k) and k != "PROMETHEUS_MULTIPROC_DIR"}
    return env


@functools.cache
def cli_help(script: str, *subcommand: str) -> str:
    """`python <script> [subcommand] --help`, run for real."""
    done = subprocess.run([sys.executable, script, *subcommand, "--help"], cwd=ROOT,
                          env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{script} {subcommand} --help failed:\n{done.stderr}"
    return done.stdout


def help_flags(script: str, *subcommand: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cli_help(script, *subcommand)))


def admin_subcommands() -> set[str]:
    match = re.search(r"\{([a-z,-]+)\}", cli_help("admin.py"))
    assert match, cli_help("admin.py")
    return set(match.group(1).split(","))


@functools.cache
def get_routes() -> frozenset[str]:
    """Static GET paths of the app's router (built in a child: no side effects here)."""
    code = ("import json, sanic_app, util; app = sanic_app.create_app(util.load_settings({})); "
            "app.router.finalize(); print(json.dumps([[r.uri, sorted(r.methods)] "
            "for r in app.router.routes]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    routes = json.loads(done.stdout.strip().splitlines()[-1])
    return frozenset(uri for uri, methods in routes if "GET" in methods and "<" not in uri)


# --------------------------------------------------------------------------- parsing artefacts
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """Compose interpolation with an empty environment: ${X:-d} -> d, ${X:?e} -> a placeholder."""
    def one(match: re.Match) -> str:
        op, arg = match.group(2), match.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"<{match.group(1)}>"
        return ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value)


def compose_variables() -> set[str]:
    """Every ${VAR} docker-compose.yml interpolates."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))


def service_command(name: str) -> list[str]:
    command = services()[name]["command"]
    assert isinstance(command, list), f"{name}: use the exec (list) form of command"
    return [interpolate(str(part)) for part in command]


def service_environment(name: str) -> dict[str, str]:
    env = services()[name].get("environment", {})
    assert isinstance(env, dict), f"{name}: environment must be a mapping"
    return {key: str(value) for key, value in env.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_one(keyword: str) -> str:
    found = [rest for kw, rest in dockerfile() if kw == keyword]
    assert len(found) == 1, f"Dockerfile: expected one {keyword}, found {found}"
    return found[0]


def exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"use the exec (JSON) form: {text}"
    return json.loads(text)


def dockerfile_cmd() -> list[str]:
    return exec_form(dockerfile_one("CMD"))


def dockerfile_healthcheck() -> list[str]:
    rest = dockerfile_one("HEALTHCHECK")
    _options, _, command = rest.partition("CMD")
    assert command, "HEALTHCHECK needs a CMD"
    return exec_form(command.strip())


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex over context paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (a matched directory excludes its files)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in k8s_documents()
            if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def k8s_containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for doc in k8s("Deployment") + k8s("Job"):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", container))
    return found


def haproxy_lines() -> list[str]:
    return [line.split("#", 1)[0].strip() for line in HAPROXY_CFG.read_text().splitlines()]


def haproxy_sections() -> dict[str, list[str]]:
    """'backend api' -> its directive lines."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in haproxy_lines():
        if not line:
            continue
        if re.match(r"(global|defaults|frontend|backend|listen|resolvers)\b", line):
            current = line
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def haproxy_api_servers() -> tuple[str, int]:
    """(host, port) of the backend's server-template."""
    templates = [line for line in haproxy_sections()["backend api"]
                 if line.startswith("server-template ")]
    assert len(templates) == 1, templates
    host, port = templates[0].split()[3].rsplit(":", 1)
    return host, int(port)


def haproxy_bind_ports() -> dict[str, int]:
    ports = {}
    for section, lines in haproxy_sections().items():
        for line in lines:
            if line.startswith("bind "):
                ports[section] = int(line.split()[1].rsplit(":", 1)[1])
    return ports


# --------------------------------------------------------------------------- command checks
def option(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def command_problems(argv: list[str], where: str) -> list[str]:
    """What is wrong with a `python <script> ...` command (empty when it would run)."""
    if argv[:1] != ["python"] or len(argv) < 2:
        return [f"{where}: expected `python <script> ...`, got {argv}"]
    script, rest = argv[1], argv[2:]
    if script == "-c":
        return []  # inline health probes: checked by test_health_checks_hit_real_routes
    problems = []
    if not (ROOT / script).is_file():
        return [f"{where}: {script} does not exist"]
    if dockerignored(script):
        problems.append(f"{where}: {script} is excluded from the image by .dockerignore")
    subcommand: tuple[str, ...] = ()
    if script == "admin.py":
        if not rest or rest[0] not in admin_subcommands():
            return [*problems, f"{where}: admin.py needs one of {sorted(admin_subcommands())}"]
        subcommand, rest = (rest[0],), rest[1:]
    flags = help_flags(script, *subcommand)
    for token in rest:
        if token.startswith("-") and token.split("=", 1)[0] not in flags:
            problems.append(f"{where}: {script} {' '.join(subcommand)} has no flag {token} "
                            f"(its --help lists {sorted(flags)})")
    if script == "sanic_app.py":
        for flag in ("--host", "--port", "--workers"):
            if option(rest, flag) is None:
                problems.append(f"{where}: give {flag} explicitly")
        if option(rest, "--host") not in (None, "0.0.0.0"):
            problems.append(f"{where}: in a container the API must listen on 0.0.0.0")
        for flag in ("--port", "--workers"):
            value = option(rest, flag)
            if value is not None and (not value.isdigit() or int(value) < 1):
                problems.append(f"{where}: {flag} {value!r} is not a positive integer")
    return problems


def all_commands() -> list[tuple[str, list[str]]]:
    """Every command the artefacts run, with where it comes from."""
    found = [("Dockerfile CMD", dockerfile_cmd()), ("Dockerfile HEALTHCHECK", dockerfile_healthcheck())]
    for name, service in services().items():
        if "command" in service and name in APP_SERVICES:
            found.append((f"compose {name}", service_command(name)))
        test = service.get("healthcheck", {}).get("test")
        if name in APP_SERVICES and test and test[0] == "CMD":
            found.append((f"compose {name} healthcheck", test[1:]))
    for where, container in k8s_containers():
        found.append((f"k8s {where}", container["command"]))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command:
                found.append((f"k8s {where} {probe}", command))
    return found


# =========================================================================== structure
def test_setting_names_come_from_load_settings() -> None:
    names = setting_names()
    assert {"DATABASE_URL", "XRATES_API_TOKEN", "XRATES_AUTO_MIGRATE", "XRATES_POOL_SIZE"} <= names
    assert {f"XRATES_{feed.upper()}_URL" for feed in sources.FEEDS} <= names
    assert all(SETTING_NAME.match(name) for name in names), names


def test_commands_name_real_files_and_flags() -> None:
    problems = []
    for where, argv in all_commands():
        if argv[1:2] == ["updater.py"]:
            continue  # test_updater_commands
        problems += command_problems(argv, where)
    assert not problems, "\n".join(problems)
    assert service_command("migrate") == ["python", "admin.py", "migrate"]
    assert [argv for where, argv in all_commands() if where == "k8s Job/xrates-migrate"] == [
        ["python", "admin.py", "migrate"]]


def test_updater_commands() -> None:
    commands = [(where, argv) for where, argv in all_commands() if argv[1:2] == ["updater.py"]]
    wanted = {("compose updater", ("python", "updater.py")),
              ("compose updater healthcheck", ("python", "updater.py", "--check")),
              ("k8s Deployment/xrates-updater", ("python", "updater.py")),
              ("k8s Deployment/xrates-updater livenessProbe", ("python", "updater.py", "--check"))}
    assert {(where, tuple(argv)) for where, argv in commands} == wanted
    if not UPDATER.exists():
        pytest.skip("updater.py does not exist yet: its flags (--check) cannot be verified")
    problems = [p for where, argv in commands for p in command_problems(argv, where)]
    assert not problems, "\n".join(problems)


def test_environment_names_are_real_settings() -> None:
    used: dict[str, set[str]] = {}
    for name in APP_SERVICES:
        for key in service_environment(name):
            used.setdefault(key, set()).add(f"compose {name}")
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            used.setdefault(match.group(1), set()).add(".env.example")
    for doc in k8s("ConfigMap") + k8s("Secret"):
        for key in {**doc.get("data", {}), **doc.get("stringData", {})}:
            used.setdefault(key, set()).add(f"k8s {doc['__file__']}")
    for where, container in k8s_containers():
        for item in container.get("env", []):
            used.setdefault(item["name"], set()).add(f"k8s {where}")
    unknown = {name: sorted(where) for name, where in used.items()
               if SETTING_NAME.match(name) and name not in setting_names()}
    assert not unknown, f"not read by util.load_settings: {unknown}"
    # The other names of .env.example are compose's own variables, and compose uses them.
    others = {name for name, where in used.items()
              if ".env.example" in where and not SETTING_NAME.match(name)}
    assert others <= compose_variables(), others - compose_variables()
    # Everything compose interpolates is documented in .env.example.
    assert compose_variables() <= set(used), compose_variables() - set(used)


def test_every_setting_is_documented() -> None:
    example = ENV_EXAMPLE.read_text()
    missing = [name for name in documented_setting_names() - {"DATABASE_URL"}
               if not re.search(rf"^#?\s*{name}=", example, re.M)]
    assert not missing, f".env.example does not document {missing}"
    assert "DATABASE_URL" in example
    for required in ("XRATES_API_TOKEN", "POSTGRES_PASSWORD"):
        assert re.search(rf"^{required}=", example, re.M), f"{required} must be an active line"
    guide = OPERATIONS.read_text()
    table = {m.group(1) for m in re.finditer(r"^\|\s*`([A-Z][A-Z0-9_<>]*)`", guide, re.M)}
    feeds = {f"XRATES_{feed.upper()}_URL" for feed in sources.FEEDS}
    # Backfill overrides, one per source with a multi-day endpoint: one row, like the URLs.
    feeds |= {f"XRATES_{feed.upper()}_HISTORY_URL" for feed in util.HISTORY_SOURCES}
    missing = documented_setting_names() - feeds - table
    assert not missing, f"docs/operations.md configuration table lacks {sorted(missing)}"
    assert "XRATES_<SOURCE>_URL" in table and all(f"`{name}`" in guide for name in feeds)


def test_compose_topology() -> None:
    spec, svc = compose(), services()
    assert set(svc) == {"postgres", "migrate", "updater", "api", "lb"}
    postgres = svc["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    volume = next(v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data"))
    assert volume.split(":")[0] in spec["volumes"], "PostgreSQL data needs a named volume"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert svc["updater"]["deploy"]["replicas"] == 2
    assert svc["api"]["deploy"]["replicas"] == 3
    # --scale api=N: no fixed host port or container name on the API.
    assert "ports" not in svc["api"] and "container_name" not in svc["api"]
    for name in APP_SERVICES:
        service, env = svc[name], service_environment(name)
        assert "build" in service, name
        assert env.get("XRATES_AUTO_MIGRATE") == "0", f"{name}: XRATES_AUTO_MIGRATE must be 0"
        assert interpolate(env["DATABASE_URL"]).startswith("postgresql://"), name
        assert "@postgres:5432/" in env["DATABASE_URL"], name
        assert re.fullmatch(r"\$\{XRATES_API_TOKEN:\?[^}]+\}", env["XRATES_API_TOKEN"]), \
            f"{name}: XRATES_API_TOKEN must be required (${{XRATES_API_TOKEN:?...}})"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        if name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == \
                "service_completed_successfully", name
    assert svc["migrate"]["restart"] == "no"
    assert svc["migrate"]["healthcheck"] == {"disable": True}, \
        "migrate runs no HTTP server: the Dockerfile's /health check must be off"
    # The updater runs no HTTP server either: it must replace the Dockerfile's check.
    assert svc["updater"]["healthcheck"]["test"][:3] == ["CMD", "python", "updater.py"]
    lb = svc["lb"]
    assert str(lb["image"]).startswith("haproxy:")
    mount = next(v for v in lb["volumes"] if "haproxy.cfg" in v)
    source, target = mount.split(":")[:2]
    assert (ROOT / source).resolve() == HAPROXY_CFG.resolve()
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"


def test_dockerfile() -> None:
    assert dockerfile_one("FROM") == "python:3.11-slim"
    user = dockerfile_one("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    installs = [rest for kw, rest in dockerfile() if kw == "RUN" and "pip install" in rest]
    assert installs and all("-r requirements.txt" in r and "-c constraints.txt" in r
                            for r in installs), installs
    for kw, rest in dockerfile():
        if kw == "COPY":
            for source in [p for p in rest.split() if not p.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
    # The image holds the whole application and no secrets, VCS or virtualenv.
    for path in [*sorted(ROOT.glob("*.py")), ROOT / "triggers.sql"]:
        assert not dockerignored(path.name), f".dockerignore excludes {path.name}"
    for path in (".env", ".git", ".venv", ".data", "tests/conftest.py"):
        assert dockerignored(path), f".dockerignore must exclude {path}"
    assert not command_problems(dockerfile_cmd(), "Dockerfile CMD")


def test_health_checks_hit_real_routes() -> None:
    routes = get_routes()
    assert {"/health", "/ready"} <= routes, routes
    probe = " ".join(dockerfile_healthcheck())
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/.-]*)", probe)
    assert url and url.group(2) in routes, probe
    assert url.group(2) == "/health", "the container health check is liveness: /health"
    checks = [line for line in haproxy_sections()["backend api"] if line.startswith("option httpchk")]
    assert checks == ["option httpchk GET /ready"], checks
    assert "http-check expect status 200" in haproxy_sections()["backend api"]
    for where, container in k8s_containers():
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container.get(kind, {}).get("httpGet", {}).get("path")
            if path is not None:
                assert path in routes, f"{where} {kind}: {path} is not a route"
    api = next(c for where, c in k8s_containers() if where == "Deployment/xrates-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"


def test_ports_line_up() -> None:
    port = int(option(service_command("api"), "--port"))
    assert int(option(dockerfile_cmd(), "--port")) == port
    assert dockerfile_one("EXPOSE") == str(port)
    assert re.search(rf"127\.0\.0\.1:{port}/", " ".join(dockerfile_healthcheck()))
    assert [str(p) for p in services()["api"]["expose"]] == [str(port)]
    host, lb_port = haproxy_api_servers()
    assert (host, lb_port) == ("api", port), "HAProxy must point at the compose service api"
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in services()["lb"]["ports"]}
    assert set(haproxy_bind_ports().values()) == container_ports
    deployment = k8s("Deployment", "xrates-api")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert int(option(container["command"], "--port")) == port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(named.values()) == [port]
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") in (None, str(port))
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe_port = container.get(kind, {}).get("httpGet", {}).get("port")
        if probe_port is not None:
            assert named.get(probe_port, probe_port) == port, kind
    service = k8s("Service", "xrates-api")[0]
    for item in service["spec"]["ports"]:
        assert named.get(item["targetPort"], item["targetPort"]) == port


def test_kubernetes_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.yaml" not in kustomization["resources"], "the Secret is a template only"
    image_names = {i["name"] for i in kustomization.get("images", [])}

    configmaps = {d["metadata"]["name"]: d for d in k8s("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in k8s("Secret")}
    for name, cm in configmaps.items():
        for key, value in cm["data"].items():
            assert isinstance(value, str), f"ConfigMap {name}: {key} must be a string"
    assert any(cm["data"].get("XRATES_AUTO_MIGRATE") == "0" for cm in configmaps.values())
    for secret in secrets.values():
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"Secret template holds a real-looking {key}"
    assert {"DATABASE_URL", "XRATES_API_TOKEN"} <= {
        k for s in secrets.values() for k in s["stringData"]}

    for doc in k8s("Deployment") + k8s("Job"):
        spec = doc["spec"]["template"]["spec"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if doc["kind"] == "Deployment":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["image"] in image_names, container["image"]
            refs = container.get("envFrom", [])
            assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= set(configmaps)
            assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= set(secrets)
            assert refs, f"{doc['metadata']['name']}: no configuration"
    updater = k8s("Deployment", "xrates-updater")[0]
    assert updater["spec"]["replicas"] == 2
    api = k8s("Deployment", "xrates-api")[0]
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    service = k8s("Service", "xrates-api")[0]
    assert service["spec"]["selector"].items() <= api_labels.items()
    hpa = k8s("HorizontalPodAutoscaler")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "xrates-api"}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert api["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"], \
        "CPU utilisation targets need a CPU request"
    job = k8s("Job", "xrates-migrate")[0]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    # The documented install order selects the ConfigMap and the Job by component label.
    components = {d["metadata"]["labels"].get("app.kubernetes.io/component")
                  for d in k8s("ConfigMap") + k8s("Job")}
    assert components == {"config", "migrate"}


def test_kustomization_builds() -> None:
    """`kubectl kustomize deploy/k8s` renders every manifest with the pinned image."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize build is not checked here")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Job",
                     "PodDisruptionBudget", "Service"], kinds
    image = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"][0]
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert container["image"] == f"{image['newName']}:{image['newTag']}"


# =========================================================================== processes
@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    """Debian's haproxy, installed here if missing (skipped only where it cannot be)."""
    return debian.binary("haproxy", ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"),
                         "the topology test")


def local_haproxy_config(api_ports: list[int], bind_ports: dict[int, int]) -> str:
    """deploy/haproxy.cfg with only the server-template and the bind ports rewritten."""
    out, templates = [], 0
    for line in HAPROXY_CFG.read_text().splitlines():
        code = line.split("#", 1)[0].strip()
        indent = line[: len(line) - len(line.lstrip())]
        if code.startswith("server-template "):
            templates += 1
            words = code.split()
            prefix, params, skip = words[1], [], False
            for word in words[4:]:  # drop the DNS discovery options, keep the rest
                if skip:
                    skip = False
                elif word in ("resolvers", "init-addr", "resolve-prefer", "resolve-opts"):
                    skip = True
                else:
                    params.append(word)
            out += [f"{indent}server {prefix}{i} 127.0.0.1:{port} {' '.join(params)}".rstrip()
                    for i, port in enumerate(api_ports, 1)]
        elif code.startswith("bind "):
            port = int(code.split()[1].rsplit(":", 1)[1])
            out.append(f"{indent}bind 127.0.0.1:{bind_ports[port]}")
        else:
            out.append(line)
    assert templates == 1
    return "\n".join(out) + "\n"


def test_haproxy_config_is_valid(haproxy_bin: str, tmp_path: Path) -> None:
    for path in (HAPROXY_CFG, tmp_path / "local.cfg"):
        if path != HAPROXY_CFG:
            ports = {port: util.free_port() for port in haproxy_bind_ports().values()}
            path.write_text(local_haproxy_config([1111, 2222, 3333], ports))
        done = subprocess.run([haproxy_bin, "-c", "-f", str(path)], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, f"{path.name}:\n{done.stdout}{done.stderr}"


class Process:
    """A child in its own process group, logging to a file, stopped by its PID."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self.kill()
        self._log.close()


def start_updater(db_url: str, log_dir: Path, n: int) -> Process:
    env = {**_clean_env(), "DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0",
           "XRATES_SOURCES": "demo", "XRATES_INTERVAL": "1"}
    return Process([sys.executable, "updater.py"], log_dir / f"updater-{n}.log", env)


def updater_unrunnable() -> str | None:
    """Why `python updater.py` cannot be part of the topology yet, or None."""
    if not UPDATER.exists():
        return "updater.py does not exist yet"
    done = subprocess.run([sys.executable, "updater.py", "--help"], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"`python updater.py --help` fails: {done.stderr.strip()[-500:]}"
    if "--check" not in done.stdout:
        return "updater.py has no --check yet"
    return None


async def lb_servers(client: httpx.AsyncClient, stats_url: str) -> dict[str, dict[str, str]]:
    """HAProxy's view of backend api: server name -> stats row (status, stot, ...)."""
    response = await client.get(stats_url + "/stats;csv")
    rows = csv.DictReader(io.StringIO(response.text.lstrip("# ")))
    return {row["svname"]: row for row in rows
            if row["pxname"] == "api" and row["svname"] not in ("FRONTEND", "BACKEND")}


async def hammer(client: httpx.AsyncClient, paths: list[str], duration_s: float,
                 concurrency: int = 4, max_requests: int = 50_000) -> tuple[Counter, list[str]]:
    """GET `paths` round and round through the LB for a bounded time; (statuses, failures)."""
    statuses: Counter = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + duration_s

    async def worker(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline and sum(statuses.values()) < max_requests:
            path = paths[i % len(paths)]
            i += 1
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                statuses["transport-error"] += 1
                failures.append(f"GET {path}: {type(exc).__name__}: {exc}")
                continue
            statuses[response.status_code] += 1
            if response.status_code != 200:
                failures.append(f"GET {path}: {response.status_code} {response.text[:200]}")

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return statuses, failures


@pytest.mark.slow
async def test_topology_survives_sigkill_of_the_leader_and_an_api(
        pg, template, start_api, haproxy_bin, tmp_path) -> None:
    why_no_updater = updater_unrunnable()
    db_url = await fresh_database(pg, template)
    sql = await asyncpg.connect(db_url)
    # A role lives in the session's throwaway cluster (conftest `pg`), like the databases.
    role = f"xrates_deploy_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    await sql.execute(f"CREATE ROLE {role} LOGIN")
    await sql.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    await sql.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    # Instance C connects as its own role: revoking its LOGIN makes its /ready 503 for real.
    db_url_c = db_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    updaters: list[Process] = []
    lb: Process | None = None
    api_env = {"XRATES_API_TOKEN": TOKEN}
    client = httpx.AsyncClient(timeout=10.0)
    try:
        if why_no_updater is None:
            updaters = [start_updater(db_url, tmp_path, n) for n in (1, 2)]
        else:  # the API/LB part still runs; rates come from SQL
            await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) VALUES "
                              "('EUR','USD',1.08,'manual',now()), ('EUR','JPY',162.9,'manual',now())")
        apis: list[ApiProcess] = await asyncio.gather(
            start_api(db_url, api_env, wait=False), start_api(db_url, api_env, wait=False),
            start_api(db_url_c, api_env, wait=False))
        await asyncio.gather(*(api.wait_ready() for api in apis))
        api_a, api_b, api_c = apis

        bind = {port: util.free_port() for port in haproxy_bind_ports().values()}
        config = tmp_path / "haproxy.cfg"
        config.write_text(local_haproxy_config([api.port for api in apis], bind))
        lb = Process([haproxy_bin, "-db", "-f", str(config)], tmp_path / "haproxy.log", os.environ.copy())
        lb_url = f"http://127.0.0.1:{bind[haproxy_bind_ports()['frontend xrates']]}"
        stats_url = f"http://127.0.0.1:{bind[haproxy_bind_ports()['frontend stats']]}"
        client.base_url = httpx.URL(lb_url)

        async def all_up() -> bool:
            assert lb.proc.poll() is None, f"haproxy exited:\n{lb.log()}"
            with contextlib.suppress(httpx.TransportError):
                servers = await lb_servers(client, stats_url)
                return len(servers) == 3 and all(s["status"] == "UP" and s["check_status"] == "L7OK"
                                                 for s in servers.values())
            return False

        await wait_for(all_up, 15, 0.1, "haproxy to see three healthy API instances")

        async def rates_present() -> bool:
            return await sql.fetchval("SELECT count(*) FROM rate WHERE base = 'EUR'") >= 2

        await wait_for(rates_present, 15, 0.1, "the first updater run")
        paths = ["/v1/rates/EUR/USD", "/v1/rates/EUR/JPY", "/v1/convert?from=USD&to=JPY&amount=10",
                 "/v1/rates?base=EUR", "/health"]

        # --- SIGKILL the active updater, then one API instance, under client load.
        leader = follower = None
        if updaters:
            async def leader_known() -> Process | None:
                holder = await model.leader(sql)
                if holder is None:
                    return None
                leading = [u for u in updaters if "event=leader_acquired" in u.log()]
                return leading[0] if len(leading) == 1 else None

            leader = await wait_for(leader_known, 15, 0.1, "one updater to lead")
            follower = updaters[1] if leader is updaters[0] else updaters[0]
            old_holder = (await model.leader(sql))["pid"]

        async def kill_later() -> datetime:
            await asyncio.sleep(1.5)
            killed_at = datetime.now(UTC)
            if leader is not None:
                leader.kill()
            await asyncio.sleep(1.5)
            os.killpg(api_b.proc.pid, signal.SIGKILL)
            return killed_at

        (statuses, failures), killed_at = await asyncio.gather(hammer(client, paths, 7.0), kill_later())
        assert api_b.proc.wait(5) == -signal.SIGKILL
        assert not failures, f"{len(failures)} failed requests of {statuses}:\n" + "\n".join(failures[:20])
        assert statuses[200] > 200, statuses
        servers = await lb_servers(client, stats_url)
        assert servers["api2"]["status"].startswith("DOWN"), servers["api2"]
        assert [servers[s]["status"] for s in ("api1", "api3")] == ["UP", "UP"]
        # The kill was felt: HAProxy retried requests elsewhere (httplog's retries field, "+"
        # when redispatched), and no client saw it.
        retried = [line for line in lb.log().splitlines()
                   if (m := re.search(r" [-\w]{4} \d+/\d+/\d+/\d+/\+?(\d+) ", line))
                   and int(m.group(1)) > 0]
        assert retried, f"no retried request in the haproxy log:\n{lb.log()[-3000:]}"

        if updaters:
            async def taken_over() -> bool:
                holder = await model.leader(sql)
                run = await sql.fetchrow("SELECT runner, status FROM update_run WHERE status = "
                                         "'succeeded' ORDER BY id DESC LIMIT 1")
                return (holder is not None and holder["pid"] != old_holder and run is not None
                        and run["runner"].endswith(f":{follower.proc.pid}"))

            await wait_for(taken_over, 10, 0.1, f"the follower to take over:\n{follower.log()}")
            first_run = await sql.fetchval("SELECT min(started_at) FROM update_run WHERE runner = $1",
                                           f"{socket.gethostname()}:{follower.proc.pid}")
            assert (first_run - killed_at).total_seconds() < 3, (first_run, killed_at)
            assert "event=leader_acquired" in follower.log()
            check = await asyncio.create_subprocess_exec(
                sys.executable, "updater.py", "--check", cwd=ROOT,
                env={**_clean_env(), "DATABASE_URL": db_url},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output = (await asyncio.wait_for(check.communicate(), 30))[0].decode()
            assert check.returncode == 0 and output.startswith("ok"), output

        # --- A write through the LB reaches every live instance.
        response = await client.put("/v1/rates/GBP/CHF", json={"rate": "1.1234"},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code in (200, 201), response.text
        version = response.json()["version"]
        for api in (api_a, api_c):
            async def seen(api: ApiProcess = api) -> bool:
                got = await api.client.get("/v1/rates/GBP/CHF")
                return got.status_code == 200 and got.json()["version"] == version

            await wait_for(seen, 5, 0.02, f"{api.base_url} to serve the write")

        # --- Instance C loses its database: /ready 503 takes it out of rotation, then back.
        await sql.execute(f"ALTER ROLE {role} NOLOGIN")
        await sql.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                          role)

        async def c_state(state: str) -> bool:
            return (await lb_servers(client, stats_url))["api3"]["status"].startswith(state)

        await wait_for(lambda: c_state("DOWN"), 10, 0.1, "haproxy to take instance C out of rotation")
        assert (await api_c.client.get("/ready")).status_code == 503
        before = int((await lb_servers(client, stats_url))["api3"]["stot"])
        statuses, failures = await hammer(client, paths, 1.5)
        assert not failures, f"{statuses}:\n" + "\n".join(failures[:20])
        assert int((await lb_servers(client, stats_url))["api3"]["stot"]) == before
        await sql.execute(f"ALTER ROLE {role} LOGIN")
        await wait_for(lambda: c_state("UP"), 15, 0.1, "instance C back in rotation")
    finally:
        await client.aclose()
        if lb is not None:
            lb.stop()
        for updater in updaters:
            updater.stop()
        await sql.close()
    if why_no_updater is not None:
        pytest.skip(f"LB/API part passed; updater part not run: {why_no_updater}")
