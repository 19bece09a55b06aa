"""The deployment files: compose (against the Compose Specification), Dockerfiles, Prometheus, Grafana.

No Docker engine is needed: the compose files are validated against the Compose Specification's JSON
schema, vendored in data/compose-spec.json (see data/README.md for where it came from), every path
they build from or mount is checked to exist, Prometheus' files go through promtool, and the commands
the containers would run (health checks, the weights-init script) are run here against the real code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.metrics import Metrics
from tests.conftest import REPO
from tests.integration.live import LiveServer, free_port, running

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent / "data"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
PROMETHEUS_DIR = REPO / "docker" / "prometheus"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "resnet-serve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "provider.yml"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
# What the brief pins the images to; pyproject's ranges must admit them.
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}


def require_tool(name: str) -> str:
    """The tool's path; skipped where it is missing, except in CI (which installs it): fail there."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH; scripts/install-prometheus.sh installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(REPO / name)
    return data


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def volume_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Every volume entry in the long syntax (the short `src:dst[:mode]` form converted)."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            entry = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        mounts.append(entry)
    return mounts


def mount_at(service: dict[str, Any], target: str) -> dict[str, Any]:
    found = [m for m in volume_mounts(service) if m["target"] == target]
    assert len(found) == 1, f"expected one mount at {target}, got {found}"
    return found[0]


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with the defaults (the tests never set the variables)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


# ---- compose ---------------------------------------------------------------------------------------


def test_vendored_compose_schema_is_a_valid_schema():
    schema = json.loads((DATA / "compose-spec.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_validates_against_the_compose_specification(name):
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose(name)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_everything_compose_builds_from_or_mounts_exists(name):
    spec = compose(name)
    declared_volumes = set(compose()["volumes"])
    checked = 0
    for service_name, service in spec["services"].items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = REPO / build.get("context", ".")
            assert context.is_dir(), f"{service_name}: build context {context} is missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{service_name}: {dockerfile} is missing"
            checked += 1
        for mount in volume_mounts(service):
            if mount["type"] == "bind":
                assert (REPO / mount["source"]).exists(), f"{service_name}: bind source {mount['source']} is missing"
            elif mount["type"] == "volume":
                assert mount["source"] in declared_volumes, f"{service_name}: volume {mount['source']} undeclared"
            checked += 1
        for env_file in service.get("env_file", []):
            assert (REPO / env_file).is_file(), f"{service_name}: env_file {env_file} is missing"
    assert checked


def test_compose_server_service():
    services = compose()["services"]
    server = services["resnet-serve"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert "8080:8080" in server["ports"]
    assert server["restart"] == "unless-stopped"
    assert server["stop_grace_period"] == "40s"
    env = server["environment"]
    assert env["RESNET_SERVE_HOST"] == "0.0.0.0"
    assert env["RESNET_SERVE_WEIGHTS_DIR"] == "/weights"
    assert env["RESNET_SERVE_PORT"] == "8080"
    # SIGKILL must come after the server's own drain deadline and its hung-work exit, which says why.
    from service.server import HUNG_EXIT_MARGIN_S

    assert float(env["RESNET_SERVE_SHUTDOWN_GRACE_S"]) + HUNG_EXIT_MARGIN_S < 40
    weights = mount_at(server, "/weights")
    assert weights["type"] == "volume"
    assert weights["source"] == "weights"
    assert weights["read_only"] is True
    assert "/health/ready" in " ".join(server["healthcheck"]["test"])
    # The read-only volume is filled by the one-shot weights-init service first.
    assert server["depends_on"]["weights-init"]["condition"] == "service_completed_successfully"
    init = services["weights-init"]
    assert mount_at(init, "/weights")["source"] == "weights"
    assert not mount_at(init, "/weights").get("read_only", False)
    assert init["environment"]["RESNET_SERVE_MISSING_WEIGHTS"] == "fetch-or-random"
    assert interpolate(init["environment"]["RESNET_SERVE_MODELS"]) == interpolate(env["RESNET_SERVE_MODELS"])
    assert init["image"] == server["image"]


def test_compose_gpu_override_reserves_nvidia_gpus_for_the_server():
    override = compose("docker-compose.gpu.yml")["services"]
    server = override["resnet-serve"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert server["environment"]["RESNET_SERVE_DEVICE"] == "cuda"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Every overridden service exists in the base file (an override cannot add a half service).
    assert set(override) <= set(compose()["services"])


def test_compose_monitoring_services_are_wired_to_the_config_files():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert "9090:9090" in prometheus["ports"]
    config_mount = mount_at(prometheus, "/etc/prometheus")
    assert (REPO / config_mount["source"]).resolve() == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert "3000:3000" in grafana["ports"]
    assert (REPO / mount_at(grafana, "/etc/grafana/provisioning")["source"]).resolve() == GRAFANA_DIR / "provisioning"
    providers = load_yaml(PROVIDERS)["providers"]
    assert len(providers) == 1
    dashboards_path = providers[0]["options"]["path"]
    assert (REPO / mount_at(grafana, dashboards_path)["source"]).resolve() == DASHBOARD.parent
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards_path)
    assert (DASHBOARD.parent / home.name).is_file()
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_scrapes_the_compose_service():
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["scrape_interval"] == "5s"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["resnet-serve:8080"]
    host, port = targets[0].split(":")
    assert host in compose()["services"]
    assert f"{port}:{port}" in compose()["services"][host]["ports"]
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_datasource_uid_is_the_one_the_dashboard_uses():
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]
    board = dashboard()
    used = {p["datasource"]["uid"] for p in panels(board) if "datasource" in p}
    used |= {t["datasource"]["uid"] for p in panels(board) for t in p.get("targets", []) if "datasource" in t}
    used |= {v["datasource"]["uid"] for v in board["templating"]["list"] if "datasource" in v}
    assert used == {source["uid"]}


def test_weights_init_command_fills_an_empty_directory_and_then_keeps_it(tmp_path):
    """Runs the command the weights-init container runs, against this checkout's service package.

    With `random` instead of the compose file's `fetch-or-random`: tests never leave the machine.
    """
    init = compose()["services"]["weights-init"]
    command = init["command"]
    assert command[:3] == ["resnet-serve", "weights", "ensure"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    env.update({k: interpolate(str(v)) for k, v in init["environment"].items()})
    env.update({"RESNET_SERVE_WEIGHTS_DIR": str(tmp_path), "RESNET_SERVE_MISSING_WEIGHTS": "random"})

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service", *command[1:]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = run()
    written = tmp_path / "resnet18v1.safetensors"
    assert written.is_file()
    assert "random-init seed 0" in first
    stamp = written.stat().st_mtime_ns
    second = run()
    assert "random-init seed 0" in second
    assert written.stat().st_mtime_ns == stamp  # found, not written again


def compose_cli() -> list[str] | None:
    if path := shutil.which("docker-compose"):
        return [path]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["cpu", "cpu+gpu"])
def test_docker_compose_itself_accepts_the_files(files):
    """The real Compose loader, where one is installed (it needs no engine for `config`)."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here (optional; the schema tests above cover the files)")
    flags = [arg for name in files for arg in ("-f", name)]
    done = subprocess.run([*cli, *flags, "config", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- Dockerfiles -----------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path} ends inside a continued line"
    return instructions


def healthcheck_command(path: Path) -> list[str]:
    (check,) = [rest for keyword, rest in dockerfile_instructions(path) if keyword == "HEALTHCHECK"]
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(\[.*\])", check)
    assert match, f"HEALTHCHECK is not `[--options] CMD [exec form]`: {check}"
    command: list[str] = json.loads(match.group(2))
    return command


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile(variant):
    path = DOCKERFILES[variant]
    instructions = dockerfile_instructions(path)
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest)
    args = dict(rest.split("=", 1) for rest in by_keyword["ARG"] if "=" in rest)

    base = args["PYTHON_IMAGE" if variant == "cpu" else "CUDA_IMAGE"]
    assert base.startswith("python:3.11-slim" if variant == "cpu" else "nvidia/cuda:")
    if variant == "cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package, pin in TORCH_PINS.items():
        assert args[f"{package.upper()}_VERSION"] == pin
        (requirement,) = [d for d in dependencies if re.match(rf"{package}\b(?!-)", d)]
        assert Version(pin) in SpecifierSet(requirement[len(package) :]), f"pyproject's {requirement} refuses {pin}"

    runtime_user = by_keyword["USER"][-1]
    assert runtime_user.split(":")[0] not in ("root", "0")
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by_keyword["CMD"][-1]) == ["resnet-serve", "serve"]
    assert by_keyword["EXPOSE"] == ["8080"]
    env = " ".join(by_keyword["ENV"])
    for setting in ("RESNET_SERVE_HOST=0.0.0.0", "RESNET_SERVE_WEIGHTS_DIR=/weights", "RESNET_SERVE_PORT=8080"):
        assert setting in env
    assert "/health/ready" in " ".join(healthcheck_command(path))
    # The health check needs nothing the slim image lacks (no curl or wget).
    assert healthcheck_command(path)[:2] == ["python", "-c"]


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    patterns.discard("")
    for needed in (".venv", "weights", ".pytest_cache", "benchmarks/results", ".git"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    # What the Dockerfiles COPY must stay in the context.
    for kept in ("service", "pyproject.toml", "README.md"):
        assert kept not in patterns


# ---- health checks and commands, run for real ------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("deploy-live")
    with running(directory / "weights", directory / "server.log", "--missing-weights", "random") as server:
        yield server


def healthcheck_commands() -> dict[str, list[str]]:
    commands = {f"Dockerfile ({v})": healthcheck_command(p) for v, p in DOCKERFILES.items()}
    test = compose()["services"]["resnet-serve"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    commands["docker-compose.yml"] = test[1:]
    return commands


@pytest.mark.parametrize("where", ["Dockerfile (cpu)", "Dockerfile (cuda)", "docker-compose.yml"])
def test_healthcheck_passes_on_a_ready_server_and_fails_without_one(where, live):
    command = healthcheck_commands()[where]
    assert command[0] == "python"
    command = [sys.executable, *command[1:]]
    env = {**os.environ, "RESNET_SERVE_PORT": str(live.port)}
    ready = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert ready.returncode == 0, ready.stderr
    env["RESNET_SERVE_PORT"] = str(free_port())  # nothing listens there
    down = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0


def test_install_prometheus_script_is_valid_and_idempotent():
    script = REPO / "scripts" / "install-prometheus.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("prometheus is not installed here; running the script would install it")
    # Installed already: the script must change nothing and say so (no apt-get run).
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout


# ---- Prometheus ------------------------------------------------------------------------------------


def test_promtool_check_config():
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_as_their_unit_tests_say():
    promtool = require_tool("promtool")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DATA, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_severity_summary_and_description():
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    assert {
        "ResnetServeTargetDown",
        "ResnetServeNotReady",
        "ResnetServeHighErrorRatio",
        "ResnetServeP99LatencyHigh",
        "ResnetServeQueueSaturated",
    } <= set(names)
    for group in groups:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# ---- metric names: dashboard and alerts against what the server exposes ----------------------------


def exposed_metric_names() -> set[str]:
    """Every sample name the server can expose, from service.metrics itself."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=8)
    metrics.init_model("m", queue_capacity=8)
    metrics.model_info.labels("m", "resnet18", "cpu", "float32", "random-init seed 0", "onnxruntime 1.32.0").set(1)
    names = {sample.name for family in registry.collect() for sample in family.samples}
    # The CUDA collector's families are only built on a GPU host: read their names from the source.
    source = (REPO / "service" / "metrics.py").read_text()
    names |= {f"resnet_serve_{m}" for m in re.findall(r'f"\{PREFIX\}_(gpu_\w+)"', source)}
    return names


def referenced_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:resnet_serve|process)_\w+", expr))


def test_dashboard_and_alerts_use_only_metrics_the_server_exposes():
    exposed = exposed_metric_names()
    assert {"resnet_serve_gpu_memory_allocated_bytes", "resnet_serve_gpu_utilization_ratio"} <= exposed
    expressions = [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]
    expressions += [r["expr"] for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]]
    unknown = {name for expr in expressions for name in referenced_metric_names(expr)} - exposed
    assert not unknown, f"not exposed by service/metrics.py: {sorted(unknown)}"


# ---- Grafana dashboard -----------------------------------------------------------------------------


def test_every_dashboard_panel_has_a_unit_a_description_and_queries():
    board = dashboard()
    seen_ids = set()
    for panel in panels(board):
        title = panel.get("title", "?")
        assert panel["id"] not in seen_ids, f"duplicate panel id {panel['id']}"
        seen_ids.add(panel["id"])
        assert panel.get("description", "").strip(), f"panel {title!r} has no description"
        assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"panel {title!r} has no unit"
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"panel {title!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), f"panel {title!r} repeats a refId"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, f"panel {title!r} off the grid"


def test_dashboard_covers_the_brief():
    titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
    for topic in (
        "request rate",
        "error ratio",
        "end-to-end latency",
        "queue wait",
        "inference latency",
        "mean batch size",
        "batch size distribution",
        "images per second",
        "queue depth",
        "in-flight",
        "rejections by reason",
        "readiness",
        "process cpu",
        "process memory",
        "gpu memory",
        "gpu utilization",
    ):
        assert topic in titles, f"no panel about {topic}"


def test_dashboard_model_variable_filters_every_per_model_query():
    board = dashboard()
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "model"]
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    assert query == "label_values(resnet_serve_model_info, model)"
    assert variable["includeAll"] and variable["multi"]
    per_model = {
        "resnet_serve_requests_total",
        "resnet_serve_images_total",
        "resnet_serve_rejected_total",
        "resnet_serve_queue_depth",
        "resnet_serve_forward_failures_total",
        "resnet_serve_model_info",
    }
    for panel in panels(board):
        for target in panel.get("targets", []):
            names = referenced_metric_names(target["expr"])
            if names & per_model or any(n.endswith(("_bucket", "_sum", "_count")) for n in names):
                assert 'model=~"$model"' in target["expr"], f"{panel['title']}: {target['expr']}"


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_every_server_setting_in_compose_is_one_the_server_reads(path, monkeypatch):
    """A misspelt RESNET_SERVE_* variable would be silently ignored; the settings refuse extras."""
    for name, service in compose(path)["services"].items():
        variables = {k: interpolate(str(v)) for k, v in service.get("environment", {}).items()}
        for key, value in variables.items():
            if key.startswith("RESNET_SERVE_"):
                assert key.removeprefix("RESNET_SERVE_").lower() in Settings.model_fields, (name, key)
                monkeypatch.setenv(key, value)
        Settings()  # every value parses and validates
        for key in variables:
            monkeypatch.delenv(key, raising=False)
