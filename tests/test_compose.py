"""docker-compose.yml and the files it mounts, checked with the real tools (Docker cannot run here).

* The compose file, and the GPU override ``deploy/compose/gpu.yml``, against the Compose
  Specification's JSON schema, as written and after interpolation with their defaults; copies
  with a misspelt key or a wrong value are rejected. The schema is compose-spec's own
  ``schema/compose-spec.json`` as vendored (with its licence) by the PyPI package
  check-jsonschema (test extra; ``--builtin-schema vendor.compose-spec``): nothing is fetched
  at test time.
* What the schema cannot see: every bind-mounted file exists, every named volume is declared,
  ``depends_on`` names services that have a healthcheck where it waits for one, published
  ports differ, every ``${VAR}`` has a default (``docker compose up`` needs no .env), and the
  database password is the same on both sides.
* strokeseg's config (``deploy/compose/strokeseg.yaml``) loaded by strokeseg's own
  ``load_settings`` with each strokeseg container's environment (the image's ENV, then the
  compose file's): split mode on PostgreSQL and Redis by service name, the spool on the shared
  volume, Orthanc as the committed destination.
* ``deploy/compose/prometheus.yml``: ``promtool check config`` in a folder laid out the way the
  container sees it (from the compose file's volumes), so the rule file must resolve; its
  targets are the strokeseg services on the metrics ports the strokeseg config sets.
* ``deploy/compose/orthanc.json``: the real Orthanc (Debian packages ``orthanc`` and
  ``orthanc-webviewer``) started with it, storage, ports and plugin folder moved to the test's.
  Its REST API must refuse anonymous requests and report the strokeseg modality (strokeseg's
  AE title, the SCP's service and port, Storage Commitment allowed) and the web viewer.
* Grafana provisioning (there is no grafana binary here): the keys Grafana reads, the
  datasource URL naming the prometheus service, the dashboards folder a mount of
  deploy/grafana/dashboards.
* The README's "Try the whole stack" gives the ports and logins the compose file sets, and the
  README describes every dashboard panel and every alert.

A missing tool fails the test with what to run (scripts/test.sh installs them all).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.config import Settings, load_settings
from tests.orthanc import Orthanc
from tests.test_deploy import INSTALL_HINT, _dockerfile_env, _dockerfile_instructions, _run, _tool

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "deploy" / "compose" / "gpu.yml"
STROKESEG_SERVICES = {"strokeseg-scp": "scp", "strokeseg-worker": "worker"}
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "strokeseg.json"
RULES = REPO / "deploy" / "prometheus" / "strokeseg-alerts.yml"
# Plugin folders of the jodogne/orthanc-plugins image -> the Debian packages' folder.
DEBIAN_ORTHANC_PLUGINS = "/usr/share/orthanc/plugins"

Compose = dict[str, Any]


# --------------------------------------------------------------------------- reading the files


_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR:+alt}``, ``$$``) applied to every string in ``value``."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        is_set = name in env and (env[name] != "" or not op.startswith(":"))
        if op.endswith("-"):
            return env[name] if is_set else arg
        if op.endswith("?"):
            assert is_set, f"${{{name}}} is required: {arg}"
            return env[name]
        if op.endswith("+"):
            return arg if is_set else ""
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def _compose(env: dict[str, str] | None = None) -> Compose:
    """docker-compose.yml as ``docker compose config`` sees it: YAML merge keys applied,
    variables interpolated from ``env`` (default: none set, so every default applies)."""
    return dict(_interpolate(yaml.safe_load(COMPOSE.read_text()), env or {}))


def _service(compose: Compose, name: str) -> dict[str, Any]:
    assert name in compose["services"], f"no service {name} in docker-compose.yml"
    return dict(compose["services"][name])


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, container path) of each volume in the short syntax ``SRC:DST[:MODE]``."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"use the short volume syntax: {volume}"
        source, target = volume.split(":")[:2]
        mounts.append((source, target))
    return mounts


def _bind_source(service: dict[str, Any], target: str) -> Path:
    """The repository file or folder bind-mounted at ``target``."""
    sources = [src for src, dst in _mounts(service) if dst == target and src.startswith(".")]
    assert len(sources) == 1, f"{target} is bind-mounted {len(sources)} times"
    return (REPO / sources[0]).resolve()


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) of ``ADDRESS:HOST:CONTAINER`` entries."""
    published = {}
    for entry in service.get("ports", []):
        address, host, container = str(entry).rsplit(":", 2)
        published[int(container)] = (address, int(host))
    return published


def _load_jsonc(text: str) -> Any:
    """JSON with ``//`` and ``/* */`` comments, as Orthanc reads its configuration."""
    out, i, in_string = [], 0, False
    while i < len(text):
        char = text[i]
        if in_string:
            out.append(char)
            if char == "\\":
                out.append(text[i + 1])
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", i):
            i = text.find("\n", i) - 1 if "\n" in text[i:] else len(text)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 1
        else:
            out.append(char)
        i += 1
    return json.loads("".join(out))


def _container_settings(
    compose: Compose, name: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """What ``load_settings`` returns in the container of service ``name``: the image's ENV,
    then the service's environment, and the config file bind-mounted at STROKESEG_CONFIG."""
    service = _service(compose, name)
    dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
    env = {k: v for k, v in _dockerfile_env(dockerfile).items() if k.startswith("STROKESEG_")}
    env.update({k: str(v) for k, v in service["environment"].items()})
    config_file = _bind_source(service, env.pop("STROKESEG_CONFIG"))
    for variable in [n for n in os.environ if n.startswith("STROKESEG_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return load_settings(config_file)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, Settings]:
    """Each strokeseg service's settings, by service name."""
    compose = _compose()
    return {name: _container_settings(compose, name, monkeypatch) for name in STROKESEG_SERVICES}


# --------------------------------------------------------------------------- the schema


def _check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    return _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                 *map(str, files)])


def test_compose_files_validate_against_the_compose_specification(tmp_path: Path) -> None:
    out = _check_jsonschema(COMPOSE, GPU_OVERRIDE)
    assert out.returncode == 0, f"{out.stdout}{out.stderr}"
    # ... and what Compose validates after interpolation (defaults, then values a user may set).
    for env in ({}, {"PUBLISH_ADDRESS": "0.0.0.0", "STROKESEG_DICOM_PORT": "104"}):
        interpolated = tmp_path / "docker-compose.interpolated.yml"
        interpolated.write_text(yaml.safe_dump(_compose(env)))
        out = _check_jsonschema(interpolated)
        assert out.returncode == 0, f"{env}: {out.stdout}{out.stderr}"


def _misspell_restart(compose: Compose) -> None:
    compose["services"]["strokeseg-worker"]["restartt"] = "unless-stopped"


def _bad_condition(compose: Compose) -> None:
    compose["services"]["strokeseg-worker"]["depends_on"]["redis"]["condition"] = "service_up"


def _misspell_top_level(compose: Compose) -> None:
    compose["volume"] = compose.pop("volumes")


def _port_as_mapping(compose: Compose) -> None:
    compose["services"]["orthanc"]["ports"] = [{"published": "8042", "target": "8042", "mode": 1}]


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (_misspell_restart, "restartt"),
        (_bad_condition, "service_up"),
        (_misspell_top_level, "volume"),
        (_port_as_mapping, "mode"),
    ],
    ids=["service-key", "depends-on-condition", "top-level-key", "port-mode"],
)
def test_the_schema_check_rejects_a_broken_compose_file(
    tmp_path: Path, mutate: Any, complaint: str
) -> None:
    """The validation bites: each mutated copy of docker-compose.yml is refused, saying why."""
    compose = copy.deepcopy(yaml.safe_load(COMPOSE.read_text()))
    mutate(compose)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    out = _check_jsonschema(broken)
    assert out.returncode != 0 and complaint in out.stdout, f"{out.stdout}{out.stderr}"


# --------------------------------------------------------------------------- cross-references


def test_every_reference_in_the_compose_file_resolves() -> None:
    compose = _compose()
    services = compose["services"]
    declared_volumes = set(compose.get("volumes", {}))
    used_volumes = set()
    for name, service in services.items():
        for source, target in _mounts(service):
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
                assert not source.startswith("/"), f"{name}: {source}: keep bind mounts in the repository"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
            assert PurePosixPath(target).is_absolute(), (name, target)
        if "build" in service:
            dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), f"{name}: pin the image tag"
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services, f"{name} depends on unknown service {needed}"
            if how["condition"] == "service_healthy":
                assert _has_healthcheck(services[needed]), f"{name} waits for {needed}, which has no healthcheck"
    assert used_volumes == declared_volumes, f"unused volumes: {declared_volumes - used_volumes}"
    # Every service has a healthcheck (its own or its image's) and restarts.
    for name, service in services.items():
        assert _has_healthcheck(service), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    # Host ports differ; each is published on ${PUBLISH_ADDRESS:-127.0.0.1}.
    host_ports = [host for s in services.values() for _, host in _published(s).values()]
    assert len(host_ports) == len(set(host_ports)), host_ports
    assert {address for s in services.values() for address, _ in _published(s).values()} == {"127.0.0.1"}


def _has_healthcheck(service: dict[str, Any]) -> bool:
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    if "build" not in service:
        return False
    dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
    return any(kind == "HEALTHCHECK" for kind, _ in _dockerfile_instructions(dockerfile))


def test_every_variable_has_a_demo_default() -> None:
    """`docker compose up` works without a .env; every password is a ${VAR:-demo} to override."""
    text = COMPOSE.read_text() + GPU_OVERRIDE.read_text()
    variables = [m for m in _VARIABLE.finditer(text) if m.group(0) != "$$"]
    assert variables
    without_default = [m.group(0) for m in variables if m["op"] != ":-"]
    assert not without_default, f"variables without a default: {without_default}"
    for secret in ("POSTGRES_PASSWORD", "ORTHANC_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{secret}:-" in text, f"{secret} must be overridable from the environment"


@pytest.mark.parametrize("env", [{}, {"POSTGRES_PASSWORD": "not-the-demo"}], ids=["default", "overridden"])
def test_strokeseg_reaches_postgres_and_redis_by_service_name(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _compose(env)
    postgres = _service(compose, "postgres")["environment"]
    redis = _service(compose, "redis")
    for name in STROKESEG_SERVICES:
        s = _container_settings(compose, name, monkeypatch)
        url = urllib.parse.urlsplit(s.database_url)
        assert url.scheme == "postgresql+psycopg" and url.hostname == "postgres" and url.port == 5432
        assert (url.username, url.password, url.path) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], "/" + postgres["POSTGRES_DB"]
        )
        broker = urllib.parse.urlsplit(s.broker_url)
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
        assert not s.embedded_broker
        assert "--appendonly" in redis["command"], "the broker keeps its messages over a restart"
    if env:
        assert postgres["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]


def test_strokeseg_config_loads_in_both_containers(settings: dict[str, Settings]) -> None:
    compose = _compose()
    for name, role in STROKESEG_SERVICES.items():
        service, s = _service(compose, name), settings[name]
        assert service["command"] == [role]
        # One spool, shared: the volume both mount where the config puts spool_dir.
        assert ("spool", str(s.spool_dir)) in _mounts(service)
        assert s.metrics.host == "0.0.0.0", "Prometheus scrapes from its own container"
        assert s.metrics.scp_port and s.metrics.worker_port
        # Results go to the demo PACS, with Storage Commitment.
        (destination,) = s.destinations
        assert destination.host in compose["services"] and destination.host == "orthanc"
        assert destination.storage_commitment and {"SEG", "SR"} <= set(destination.send)
    scp = settings["strokeseg-scp"]
    assert _published(_service(compose, "strokeseg-scp"))[scp.scp.port][1] == 11112
    assert "ports" not in _service(compose, "strokeseg-worker"), "the worker listens for no one"
    # The GPU override only swaps the worker's image and reserves a GPU.
    override = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]
    assert set(override) == {"strokeseg-worker"}
    gpu = override["strokeseg-worker"]
    assert (REPO / gpu["build"]["context"] / gpu["build"]["dockerfile"]) == REPO / "docker" / "Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_passes_promtool_as_the_container_sees_it(
    tmp_path: Path, settings: dict[str, Settings]
) -> None:
    compose = _compose()
    prometheus = _service(compose, "prometheus")
    root = tmp_path / "container"
    for source, target in _mounts(prometheus):
        if source.startswith("."):
            placed = root / target.lstrip("/")
            placed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, placed)
    (config_arg,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config_path = root / config_arg.split("=", 1)[1].lstrip("/")
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(f"promtool is not installed (Debian package prometheus): {INSTALL_HINT}")
    out = subprocess.run([promtool, "check", "config", str(config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout + out.stderr, out.stdout + out.stderr
    # The rules it loads are the promtool-tested ones (tests/test_ops.py).
    assert _bind_source(prometheus, "/etc/prometheus/rules/strokeseg-alerts.yml") == RULES

    # Its targets are the strokeseg services on the metrics ports strokeseg listens on.
    config = yaml.safe_load(config_path.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type") == "A", "compose's DNS answers A records, one per container"
            targets |= {(host, int(dns["port"])) for host in dns["names"]}
    assert targets == {
        ("strokeseg-scp", settings["strokeseg-scp"].metrics.scp_port),
        ("strokeseg-worker", settings["strokeseg-worker"].metrics.worker_port),
    }
    assert _published(prometheus) and 9090 in _published(prometheus)


# --------------------------------------------------------------------------- Orthanc


class _ComposeOrthanc(Orthanc):
    """The real Orthanc reading docker-compose's orthanc.json, comments and all, as the tests'
    helper runs Orthanc: storage in the work folder, free ports, the Debian plugin folder
    (each value replaced in the text); REST with the login."""

    def __init__(self, workdir: Path, text: str, login: tuple[str, str],
                 strokeseg_at: tuple[str, int] | None = None) -> None:
        """``strokeseg_at``: (host, port) where the ``strokeseg`` modality really listens here
        (in the compose network it is strokeseg-scp:11112)."""
        super().__init__(workdir, ae_title=_load_jsonc(text)["DicomAet"])
        self.text = text
        self.login = login
        self.strokeseg_at = strokeseg_at

    def _write_config(self) -> Path:
        cfg_dir = self.workdir / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        values: dict[str, Any] = {
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "Plugins": [DEBIAN_ORTHANC_PLUGINS],
        }
        if self.strokeseg_at is not None:
            values["Host"], values["Port"] = self.strokeseg_at
        text, expected = self.text, _load_jsonc(self.text)
        for key, value in values.items():
            text, count = _set_json_value(text, key, value)
            assert count == 1, f"orthanc.json sets {key} {count} times"
            if key in ("Host", "Port"):
                expected["DicomModalities"]["strokeseg"][key] = value
            else:
                expected[key] = value
        assert _load_jsonc(text) == expected  # nothing else changed
        (cfg_dir / "orthanc.json").write_text(text)
        return cfg_dir

    def __enter__(self) -> _ComposeOrthanc:
        self.start()
        return self

    def request(self, path: str, *, authenticated: bool = True) -> Any:
        request = urllib.request.Request(self.url + path)
        if authenticated:
            token = b64encode(":".join(self.login).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def get(self, path: str) -> Any:
        return self.request(path)


def _set_json_value(text: str, key: str, value: Any) -> tuple[str, int]:
    """``"key": <string, number or list>`` set to ``value`` in JSON text, comments kept."""

    def replace(match: re.Match[str]) -> str:
        return match.group(1) + json.dumps(value)

    return re.subn(rf'("{key}"\s*:\s*)("[^"]*"|\d+|\[[^\]]*\])', replace, text)


def _orthanc_config(monkeypatch: pytest.MonkeyPatch) -> tuple[str, tuple[str, str]]:
    """The compose Orthanc's config file (text) and login; the login variables set as the
    compose file sets them (Orthanc substitutes ${ORTHANC_*} from its environment)."""
    orthanc_service = _service(_compose(), "orthanc")
    text = _bind_source(orthanc_service, "/etc/orthanc/orthanc.json").read_text()
    environment = {k: str(v) for k, v in orthanc_service["environment"].items()}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return text, (environment["ORTHANC_USERNAME"], environment["ORTHANC_PASSWORD"])


def test_orthanc_runs_with_the_compose_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Settings]
) -> None:
    compose = _compose()
    orthanc_service = _service(compose, "orthanc")
    text, login = _orthanc_config(monkeypatch)
    config = _load_jsonc(text)
    # Only the image's plugin folder is swapped for Debian's (orthanc-webviewer installs there).
    assert config["Plugins"] == ["/usr/local/share/orthanc/plugins"]
    assert Path(DEBIAN_ORTHANC_PLUGINS, "libOrthancWebViewer.so").exists(), (
        f"the Orthanc Web Viewer plugin is not installed (Debian package orthanc-webviewer): {INSTALL_HINT}"
    )
    scp = settings["strokeseg-scp"]
    (destination,) = scp.destinations

    # strokeseg's destination is this Orthanc: AE title, DICOM port (the container port), host.
    assert (destination.ae_title, destination.port) == (config["DicomAet"], config["DicomPort"])
    assert destination.host == "orthanc"
    assert {config["HttpPort"], config["DicomPort"]} <= set(_published(orthanc_service))
    assert ("orthanc-db", config["StorageDirectory"]) in _mounts(orthanc_service)
    # The worker delivers from its own container with the SCP's AE title.
    assert config["DicomCheckModalityHost"] is False

    with _ComposeOrthanc(tmp_path / "orthanc", text, login) as pacs:
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            pacs.request("/system", authenticated=False)
        assert anonymous.value.code == 401, "the web UI and REST API need the login"
        system = pacs.get("/system")
        assert system["DicomAet"] == destination.ae_title and system["Name"] == config["Name"]
        assert "web-viewer" in pacs.get("/plugins"), pacs.log_tail()
        modalities = pacs.get("/modalities?expand")
        (strokeseg,) = [m for m in modalities.values() if m["AET"] == scp.scp.ae_title]
        # Orthanc sends the commitment report to the SCP container, on the port it listens on.
        assert strokeseg["Host"] == "strokeseg-scp" and strokeseg["Host"] in compose["services"]
        assert strokeseg["Port"] == scp.scp.port
        assert strokeseg["AllowNAction"] and strokeseg["AllowEventReport"], "Storage Commitment"
        assert not scp.scp.allowed_calling_aets or config["DicomAet"] in scp.scp.allowed_calling_aets


@pytest.mark.network
@pytest.mark.slow
def test_results_reach_the_compose_orthanc_and_are_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phantom_cases: list[Path]
) -> None:
    """The compose stack's routing, with its own two configs: strokeseg (deploy/compose/
    strokeseg.yaml) receives a study and delivers SEG, SR and overlay to Orthanc (orthanc.json,
    login on), which commits them and reports back to strokeseg's AE. Only addresses, ports and
    the embedded database/broker differ from the containers (``strokeseg serve``, one process)."""
    from tests.conftest import free_port
    from tests.peers import Strokeseg, echo_ok, storescu, wait_for

    text, login = _orthanc_config(monkeypatch)
    strokeseg_config = yaml.safe_load((REPO / "deploy" / "compose" / "strokeseg.yaml").read_text())
    port, scp_metrics = free_port(), free_port()
    with _ComposeOrthanc(tmp_path / "orthanc", text, login, strokeseg_at=("127.0.0.1", port)) as pacs:
        (destination,) = strokeseg_config["destinations"]
        destination.update(host="127.0.0.1", port=pacs.dicom_port)
        strokeseg_config["scp"].update(host="127.0.0.1", port=port)
        strokeseg_config["study"]["completion_timeout_s"] = 1.0
        strokeseg_config["spool_dir"] = str(tmp_path / "spool")
        strokeseg_config["metrics"] = {"host": "127.0.0.1", "scp_port": scp_metrics,
                                       "worker_port": free_port()}
        config_file = tmp_path / "strokeseg.yaml"
        config_file.write_text(yaml.safe_dump(strokeseg_config))
        for variable in [n for n in os.environ if n.startswith("STROKESEG_")]:
            monkeypatch.delenv(variable)
        with Strokeseg("serve", config_file) as serve:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, phantom_cases[0] / "dicom")

            def committed() -> bool:
                page = urllib.request.urlopen(f"http://127.0.0.1:{scp_metrics}/metrics", timeout=10).read()
                return re.search(rb'^strokeseg_commitment_transactions\{destination="orthanc",'
                                 rb'state="committed"\} [1-9]', page, re.MULTILINE) is not None

            wait_for(committed, 180, "Orthanc's Storage Commitment report: committed")
            series = {pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality")
                      for s in pacs.get("/series")}
            assert {"SEG", "SR"} <= series and len(series) >= 3, series  # + the overlay (OT/SC)
            assert serve.stop() == 0, serve.output()


# --------------------------------------------------------------------------- Grafana

# Keys Grafana's file provisioning reads (grafana.com docs, "Provision Grafana").
DATASOURCE_KEYS = {
    "name", "type", "uid", "access", "orgId", "url", "user", "database", "basicAuth",
    "basicAuthUser", "withCredentials", "isDefault", "jsonData", "secureJsonData", "version",
    "editable",
}
PROVIDER_KEYS = {
    "name", "orgId", "folder", "folderUid", "type", "disableDeletion", "updateIntervalSeconds",
    "allowUiUpdates", "options",
}


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    compose = _compose()
    grafana = _service(compose, "grafana")
    provisioning = _bind_source(grafana, "/etc/grafana/provisioning")  # Grafana's default paths.provisioning
    mounted = {target: _bind_source(grafana, target) for source, target in _mounts(grafana)
               if source.startswith(".")}

    datasources = [d for f in sorted((provisioning / "datasources").glob("*.y*ml"))
                   for d in _provisioning(f, "datasources")]
    assert datasources and sum(bool(d.get("isDefault")) for d in datasources) == 1
    prometheus = _service(compose, "prometheus")
    for datasource in datasources:
        assert set(datasource) <= DATASOURCE_KEYS, set(datasource) - DATASOURCE_KEYS
        assert datasource["type"] == "prometheus" and datasource["access"] == "proxy"
        url = urllib.parse.urlsplit(datasource["url"])
        assert url.hostname == "prometheus" and url.port in _published(prometheus), datasource["url"]

    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in _provisioning(f, "providers")]
    assert providers
    for provider in providers:
        assert set(provider) <= PROVIDER_KEYS, set(provider) - PROVIDER_KEYS
        assert provider["type"] == "file" and set(provider["options"]) <= {"path", "foldersFromFilesStructure"}
        folder = mounted.get(provider["options"]["path"])
        assert folder == DASHBOARD.parent, f"{provider['options']['path']} is not a mount of {DASHBOARD.parent}"
    dashboards = sorted(DASHBOARD.parent.glob("*.json"))
    assert DASHBOARD in dashboards
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and board["panels"], path
        variables = [v for v in board.get("templating", {}).get("list", []) if v["type"] == "datasource"]
        assert all(v["query"] in {d["type"] for d in datasources} for v in variables), path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_folder, home_file = home.rsplit("/", 1)
    assert mounted[home_folder] / home_file == DASHBOARD


def _provisioning(path: Path, key: str) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    assert document["apiVersion"] == 1, path
    assert set(document) <= {"apiVersion", key, f"delete{key[0].upper()}{key[1:]}"}, path
    return list(document[key])


# --------------------------------------------------------------------------- README


def _readme_section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    assert f"\n## {title}\n" in readme, f"README has no section {title!r}"
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_try_the_whole_stack_matches_the_compose_file() -> None:
    section = _readme_section("Try the whole stack")
    assert "docker compose up -d --build" in section
    assert "deploy/compose/gpu.yml" in section and COMPOSE.name in section
    compose = _compose()
    for name, service in compose["services"].items():
        for _, host_port in _published(service).values():
            assert str(host_port) in section, f"README does not give {name}'s port {host_port}"
    orthanc = _service(compose, "orthanc")["environment"]
    grafana = _service(compose, "grafana")["environment"]
    for user, password in [(orthanc["ORTHANC_USERNAME"], orthanc["ORTHANC_PASSWORD"]),
                           (grafana["GF_SECURITY_ADMIN_USER"], grafana["GF_SECURITY_ADMIN_PASSWORD"])]:
        assert f"{user}/{password}" in section, f"README does not give the demo login {user}/{password}"
    scp = _service(compose, "strokeseg-scp")
    assert "storescu -aet MYSCANNER -aec STROKESEG" in section and "11112" in section
    assert scp["command"] == ["scp"]


def test_readme_describes_every_panel_and_alert() -> None:
    readme = (REPO / "README.md").read_text()
    panels = [panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]
              if panel.get("type") != "row"]
    missing = [title for title in panels if f"| {title} |" not in readme]
    assert not missing, f"README describes no panel {missing}"
    alerts = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule]
    missing = [alert for alert in alerts
               if f"| [{alert}](docs/operations.md#{alert.lower()}) |" not in readme]
    assert not missing, f"README describes no alert {missing} (with its runbook link)"
