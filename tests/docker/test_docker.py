"""Static checks of docker/ against the code it deploys: compose services run real entry points
on real queues with settings Clarion reads, and alerts and dashboards use real metric names.
Nothing here needs a Docker engine; the files are parsed, never run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
CLARION_IMAGE = "${CLARION_IMAGE:-clarion:local}"

# The metric names Clarion exports; rules and panels may use these and nothing else.
METRICS = frozenset(
    {
        "clarion_api_requests_total",
        "clarion_api_request_duration_seconds_bucket",
        "clarion_notifications_accepted_total",
        "clarion_deliveries_total",
        "clarion_delivery_latency_seconds_bucket",
        "clarion_rate_limiter_waits_total",
        "clarion_websocket_connections",
        "clarion_websocket_frames_pushed_total",
        "clarion_websocket_send_queue",
        "clarion_websocket_inbox_pending",
        "clarion_websocket_layer_reconnects_total",
        "clarion_queue_depth",
        "clarion_queue_oldest_age_seconds",
        "clarion_dead_letters_open",
        "clarion_circuit_state",
        "clarion_worker_stalls_total",
        "clarion_worker_stalled",
    }
)
# Series Prometheus writes itself, which a rule may use besides Clarion's.
PROMETHEUS_SERIES = {"up": "per-target scrape health, for the target-down alert"}

# Variables a Clarion container may carry that project/settings.py does not read, each with
# the program that does read it.
NON_SETTINGS_ENV = {
    "DJANGO_SETTINGS_MODULE": "Django: which settings module to load",
    "PATH": "the shell: finds the venv's uvicorn and celery",
    "PYTHONUNBUFFERED": "CPython: logs reach `docker logs` at once",
    "PYTHONDONTWRITEBYTECODE": "CPython: no .pyc files in the read-only code folder",
    "PIP_NO_CACHE_DIR": "pip, in the builder stage only: no cache in the layer",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip, in the builder stage only",
}

DATA_SERVICES = {"postgres", "redis", "redis-broker", "rabbitmq", "cassandra"}
# (severity, threshold) of each alert: the seed's numbers (diagrams 11, 13, 14).
EXPECTED_ALERTS = {
    "ClarionDeadLettersHigh": ("critical", 10000.0),
    "ClarionDeliveryErrorRateHigh": ("critical", 0.10),
    "ClarionQueueLagHigh": ("critical", 600.0),
    "ClarionQueueLagRising": ("warning", 300.0),
    "ClarionCircuitOpen": ("warning", 0.0),
    "ClarionWorkerStalled": ("warning", 0.0),
    "ClarionApiLatencyHigh": ("warning", 2.0),
    "ClarionApiErrorsHigh": ("critical", 0.05),
    "ClarionWebSocketConnectionsHigh": ("warning", 8000.0),
    "ClarionTargetDown": ("critical", 0.0),
}
DASHBOARD_ROWS = [
    "Overview",
    "Per channel",
    "Queues",
    "Providers",
    "Dead letters",
    "WebSocket",
    "API",
]


# --- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def clarion_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in services.items() if spec.get("image") == CLARION_IMAGE}


def argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str:
    """The value after `name` in an argument list (or in `name=value`)."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def settings_env_names() -> set[str]:
    """Every environment variable project/settings.py reads, from its source text."""
    source = (ROOT / "project" / "settings.py").read_text()
    names = set(re.findall(r"\benv(?:\.\w+)?\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", source))
    names |= set(re.findall(r"[\"']([A-Z][A-Z0-9_]*)[\"']\s+(?:not\s+)?in\s+env\b", source))
    return names


def env_file_names(path: Path) -> set[str]:
    """Names set in an env file, commented-out examples included."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE))


_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: label matchers, strings, ranges, grouping
    clauses and function calls removed, what is left are series names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    # Not preceded by a digit or a dot: `5m` and `1e3` are numbers, not names.
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for a Markdown file's headings, plus explicit <a id=...>."""
    anchors = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', markdown))
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6}\s+(.+?)\s*#*$", line)
        if heading and not in_code:
            text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.group(1))
            anchors.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
    return anchors


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"unnamed stage: FROM {rest}"
            current = match.group(2)
            stages[current] = [(keyword, match.group(1))]
        elif current is not None:
            stages[current].append((keyword, rest))
    return stages


def alert_rules() -> list[dict[str, Any]]:
    rules = load_yaml(DOCKER / "prometheus" / "alerts.yml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DOCKER / "grafana" / "dashboards" / "clarion.json").read_text())


# --- the checkers check ------------------------------------------------------------------------


def test_metric_names_sees_series_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(foo_bucket{status=~"5.."}[5m])))'
        ' / on (route) group_left bar_total > bool 2 and up{job="x"} offset 5m'
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total", "up"}
    assert metric_names("sum(rate(baz_total[$__rate_interval])) by (channel)") == {"baz_total"}


def test_settings_env_names_reads_both_forms() -> None:
    names = settings_env_names()
    assert {"DATABASE_URL", "SECRET_KEY", "REDIS_URL", "RATE_LIMITS"} <= names
    assert "NOT_A_SETTING" not in names


def test_github_anchors() -> None:
    text = "# Top\n### ClarionQueueLagHigh\n## TLS and proxies\n```\n# not a heading\n```\n"
    assert github_anchors(text) == {"top", "clarionqueuelaghigh", "tls-and-proxies"}


# --- compose ---------------------------------------------------------------------------------


def test_compose_parses_with_the_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {
        *DATA_SERVICES,
        "migrate",
        "delivery-log-schema",
        "api",
        "worker-email",
        "worker-sms",
        "worker-push",
        "worker-web",
        "worker-maintenance",
        "worker-webhooks",
        "relay",
        "beat",
        "flower",
        "prometheus",
        "grafana",
    }
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert services["cassandra"]["profiles"] == ["cassandra"]
    assert services["delivery-log-schema"]["profiles"] == ["cassandra"]


def test_clarion_services_share_one_image_built_from_the_dockerfile(
    services: dict[str, Any],
) -> None:
    clarion = clarion_services(services)
    built = {name for name, spec in services.items() if "build" in spec}
    assert built == set(clarion)
    assert len(clarion) == 12
    for name, spec in clarion.items():
        assert spec["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}, name
    context = (DOCKER / "..").resolve()
    assert context == ROOT
    assert (context / "docker" / "Dockerfile").is_file()


def test_other_services_pin_an_image_tag(services: dict[str, Any]) -> None:
    for name, spec in services.items():
        if spec.get("image") == CLARION_IMAGE:
            continue
        image = spec["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"
        assert "build" not in spec, name


def test_every_command_is_a_real_entry_point(services: dict[str, Any]) -> None:
    manage_commands = set(get_commands())
    for name, spec in clarion_services(services).items():
        args = argv(spec)
        if args[0] == "uvicorn":
            assert args[1] == "project.asgi:application", name
            # Inside its container the API must listen beyond loopback to be reachable at all.
            assert option(args, "--host") == "0.0.0.0"  # noqa: S104
            assert option(args, "--port") == "8000"
        elif args[0] == "celery":
            assert args[1:3] == ["-A", "project"], name
            assert args[3] in {"worker", "beat", "flower"}, name
        else:
            assert args[:2] == ["python", "manage.py"], name
            assert args[2] in manage_commands, f"{name}: no management command {args[2]!r}"
    # The repo's own commands the compose file relies on, found as files.
    for command in ("delivery_log_schema", "deadletters", "create_api_key", "relay"):
        assert list(ROOT.glob(f"*/management/commands/{command}.py")), command


def test_one_worker_pool_per_queue_on_real_queues(services: dict[str, Any]) -> None:
    consumed: dict[str, list[str]] = {}
    for name, spec in clarion_services(services).items():
        args = argv(spec)
        if args[0] != "celery" or args[3] != "worker":
            continue
        queues = option(args, "-Q").split(",")
        for queue in queues:
            assert queue in settings.CELERY_QUEUES, f"{name}: unknown queue {queue!r}"
            consumed.setdefault(queue, []).append(name)
        # One queue per pool, so each is sized and scaled on its own.
        assert len(queues) == 1, name
        assert option(args, "-n") == f"{queues[0]}@%h", name
        assert name == f"worker-{queues[0]}"
    assert consumed == {queue: [f"worker-{queue}"] for queue in settings.CELERY_QUEUES}


def test_each_channel_pool_has_its_own_concurrency_variable(services: dict[str, Any]) -> None:
    variables = {}
    for queue in settings.CHANNEL_QUEUES:
        value = option(argv(services[f"worker-{queue}"]), "--concurrency")
        match = re.fullmatch(r"\$\{([A-Z_]+):-(\d+)\}", value)
        assert match, f"worker-{queue}: --concurrency {value}"
        variables[queue] = match.group(1)
    assert variables == {
        "email": "EMAIL_CONCURRENCY",
        "sms": "SMS_CONCURRENCY",
        "push": "PUSH_CONCURRENCY",
        "web": "WEB_WORKER_CONCURRENCY",
    }


def test_exactly_one_beat(services: dict[str, Any]) -> None:
    beats = [
        name
        for name, spec in clarion_services(services).items()
        if argv(spec)[:4] == ["celery", "-A", "project", "beat"]
    ]
    assert beats == ["beat"]
    assert "scale" not in services["beat"] and "deploy" not in services["beat"]


def test_clarion_environment_is_read_by_settings(services: dict[str, Any]) -> None:
    known = settings_env_names() | set(NON_SETTINGS_ENV)
    for name, spec in clarion_services(services).items():
        unknown = set(spec.get("environment", {})) - known
        assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"
    assert {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "SECRET_KEY"} <= set(
        services["api"]["environment"]
    )


def test_clarion_env_example_names_only_settings() -> None:
    names = env_file_names(DOCKER / "clarion.env.example")
    unknown = names - settings_env_names()
    assert not unknown, f"clarion.env.example names unread variables: {sorted(unknown)}"
    assert {"EMAIL_PROVIDER", "SMS_PROVIDER", "PUSH_PROVIDER", "DELIVERY_LOG_BACKEND"} <= names


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def test_env_example_documents_every_interpolated_variable(compose: dict[str, Any]) -> None:
    interpolated = {
        name for text in strings_in(compose) for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text)
    }
    documented = env_file_names(DOCKER / "env.example")
    assert interpolated == documented


def test_secrets_have_no_default(services: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for secret in (
        "SECRET_KEY",
        "POSTGRES_PASSWORD",
        "FLOWER_BASIC_AUTH",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, secret
        assert all(use.startswith(":?") for use in uses), f"{secret}: {uses}"


def test_data_services_live_on_the_internal_network_only(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    assert compose["networks"]["data"] == {"internal": True}
    for name in DATA_SERVICES:
        assert services[name]["networks"] == ["data"], name
        assert "ports" not in services[name], name
    for name, spec in clarion_services(services).items():
        assert spec["networks"] == ["default", "data"], name


def test_long_running_clarion_services_wait_for_migrations(services: dict[str, Any]) -> None:
    for name, spec in clarion_services(services).items():
        if name in {"migrate", "delivery-log-schema"}:
            continue
        assert spec["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert spec["depends_on"]["redis-broker"] == {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["delivery-log-schema"]["environment"]["CASSANDRA_HOSTS"] == "cassandra"


def test_broker_redis_persists_and_never_evicts(services: dict[str, Any]) -> None:
    broker = services["redis-broker"]["command"]
    assert option(broker, "--appendonly") == "yes"
    assert option(broker, "--maxmemory-policy") == "noeviction"
    cache = services["redis"]["command"]
    assert option(cache, "--appendonly") == "no"
    assert option(cache, "--maxmemory-policy") == "allkeys-lru"
    assert "redis-broker:6379" in services["api"]["environment"]["CELERY_BROKER_URL"]


def test_api_serves_http_and_websocket_on_the_published_port(services: dict[str, Any]) -> None:
    api = services["api"]
    args = argv(api)
    assert option(args, "--workers") == "${WEB_CONCURRENCY:-2}"
    assert api["ports"] == ["${PORT:-8000}:8000"]
    assert "api" in api["environment"]["ALLOWED_HOSTS"].split(",")
    assert "127.0.0.1" in api["environment"]["ALLOWED_HOSTS"].split(",")


def test_flower_behind_basic_auth(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert option(argv(flower), "--port") == "5555"
    assert flower["ports"] == ["127.0.0.1:${FLOWER_PORT:-5555}:5555"]


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_slim_runtime() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "runtime"]
    arg = dict(
        rest.split("=", 1) for keyword, rest in dockerfile_instructions() if keyword == "ARG"
    )
    assert arg["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert stages["runtime"][0] == ("FROM", "${PYTHON_IMAGE}")


def test_dockerfile_installs_requirements_in_the_builder() -> None:
    builder = dockerfile_stages()["builder"]
    assert ("COPY", "requirements.txt /tmp/requirements.txt") in builder
    runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "pip install -r /tmp/requirements.txt" in runs
    runtime = dockerfile_stages()["runtime"]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime


def test_dockerfile_runs_as_a_non_root_user() -> None:
    runtime = dockerfile_stages()["runtime"]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["clarion:clarion"]
    # The last USER wins, and nothing after it switches back to root.
    last_user = max(i for i, (keyword, _) in enumerate(runtime) if keyword == "USER")
    assert all(keyword not in {"RUN", "USER"} for keyword, _ in runtime[last_user + 1 :])


def test_dockerfile_copies_every_package_the_settings_install() -> None:
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in dockerfile_stages()["runtime"]
        if keyword == "COPY" and not rest.startswith("--")
    }
    copied |= {"requirements.txt", "manage.py"}
    local_apps = {app for app in settings.INSTALLED_APPS if (ROOT / app).is_dir()}
    assert local_apps == {"notifications", "workers", "channels_app"}
    assert {"project", "core", "manage.py", *local_apps} <= copied
    for path in copied:
        assert (ROOT / path).exists(), path


def test_dockerfile_environment_is_read_by_someone() -> None:
    names = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            names |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", rest))
    assert names - settings_env_names() - set(NON_SETTINGS_ENV) == set()
    assert "CLARION_VAR_DIR" in names


def test_dockerfile_healthcheck_calls_healthz_on_the_api_port() -> None:
    checks = [rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "http://127.0.0.1:8000/healthz" in checks[0]
    assert "curl" not in checks[0]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var", ".env"} <= patterns


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_loads_the_mounted_rules(services: dict[str, Any]) -> None:
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    mount_source = {target: source for source, target in mounts.items()}["/etc/prometheus"]
    assert (DOCKER / mount_source).resolve() == DOCKER / "prometheus"
    for path in config["rule_files"]:
        assert path.startswith("/etc/prometheus/")
        assert (DOCKER / "prometheus" / path.removeprefix("/etc/prometheus/")).is_file()
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_prometheus_scrapes_the_api_and_every_worker(services: dict[str, Any]) -> None:
    jobs = {
        job["job_name"]: job
        for job in load_yaml(DOCKER / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    api = jobs["clarion-api"]
    assert api["metrics_path"] == "/metrics"
    assert api["static_configs"] == [{"targets": ["api:8000"]}]

    (dns,) = jobs["clarion-workers"]["dns_sd_configs"]
    workers = {name for name in services if name.startswith("worker-")} | {"relay"}
    assert set(dns["names"]) == workers
    ports = {services[name]["environment"]["WORKER_METRICS_PORT"] for name in workers}
    assert ports == {str(dns["port"])}
    for name in workers:
        assert f"127.0.0.1:{dns['port']}/healthz" in services[name]["healthcheck"]["test"][-1]


def test_alerts_use_only_known_metrics_and_carry_severity_and_summary() -> None:
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    rules = alert_rules()
    assert len(rules) == len({rule["alert"] for rule in rules})
    for rule in rules:
        name = rule["alert"]
        used = metric_names(rule["expr"])
        assert used, name
        assert used <= METRICS | set(PROMETHEUS_SERIES), f"{name}: {used - METRICS}"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        doc, _, anchor = annotations["runbook_url"].partition("#")
        assert doc == "docs/operations.md", name
        assert anchor in anchors, f"{name}: docs/operations.md has no #{anchor}"


def test_alert_rules_pass_their_unit_tests_in_promtool() -> None:
    """docker/prometheus/alerts.test.yml, through Prometheus' own evaluator: ClarionWorkerStalled
    fires for a stall healed between two scrapes and for one that lasts, the queue-lag alerts
    at their thresholds. `make test` installs promtool (Debian's prometheus) as root."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: `make tools` installs it (Debian's prometheus)")
        pytest.skip("promtool is missing: `make tools` as root installs it")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run(
            [promtool, *args],
            cwd=DOCKER / "prometheus",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


def test_alerts_carry_the_seed_thresholds() -> None:
    found = {}
    for rule in alert_rules():
        threshold = re.search(r"(?:>|==)\s*([0-9.]+)\s*$", rule["expr"].strip())
        assert threshold, rule["alert"]
        found[rule["alert"]] = (rule["labels"]["severity"], float(threshold.group(1)))
    assert found == EXPECTED_ALERTS


def test_dead_letter_alert_matches_the_setting_default() -> None:
    source = (ROOT / "project" / "settings.py").read_text()
    default = re.search(r'"DEAD_LETTER_ALERT_THRESHOLD",\s*default=([0-9_]+)', source)
    assert default
    assert EXPECTED_ALERTS["ClarionDeadLettersHigh"][1] == int(default.group(1).replace("_", ""))


def test_error_rate_alert_is_retried_plus_dead_over_all_attempts() -> None:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "ClarionDeliveryErrorRateHigh"]
    expr = " ".join(rule["expr"].split())
    numerator, denominator = expr.split(" / ")
    assert 'outcome=~"retried|dead"' in numerator and "[5m]" in numerator
    assert 'outcome=~"sent|retried|dead"' in denominator and "[5m]" in denominator


# --- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(
    services: dict[str, Any],
) -> None:
    (source,) = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["uid"] == "prometheus"
    (provider,) = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "clarion.yaml")[
        "providers"
    ]
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_queries_use_only_known_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names and names <= METRICS, f"{panel['title']}: {names - METRICS}"
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}
            used |= names
    # Every metric has a place on the dashboard.
    assert used == METRICS


def test_dashboard_rows_and_layout(dashboard: dict[str, Any]) -> None:
    panels = list(dashboard_panels(dashboard["panels"]))
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == DASHBOARD_ROWS
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


# --- Docs ------------------------------------------------------------------------------------


def test_operations_doc_covers_every_alert() -> None:
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    assert {name.lower() for name in EXPECTED_ALERTS} <= anchors
