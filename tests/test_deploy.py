"""The deployment files, checked by the real tools (no mocks).

* the Helm chart (``deploy/helm/strokeseg``): ``helm lint --strict`` and ``helm template`` with
  the default values (embedded: one ``strokeseg serve`` pod) and with
  ``examples/split-gpu.yaml`` (SCP + GPU workers, PostgreSQL/Redis, an Orthanc destination
  with Storage Commitment, model routes); every rendered manifest validated by
  kubernetes-validate against the chart's oldest and the newest Kubernetes it knows; the
  rendered config file, with each container's environment, loaded by strokeseg's own
  ``load_settings``, so the chart cannot ship a config the service refuses;
* ``docker/Dockerfile`` (CPU) and ``docker/Dockerfile.gpu`` (onnxruntime-gpu on NVIDIA's CUDA
  cuDNN runtime): hadolint; the install line compared with the README's run command
  (``docker build`` cannot run here, so the image must install the way the tests do); two
  stages on one base; user, ports and spool as the chart has them; the GPU builder's check that
  onnxruntime-gpu's CUDA major is the base image's; the HEALTHCHECK script
  (``docker/healthcheck.py``) run against a real ``strokeseg serve``.

helm comes from ``scripts/test.sh`` (a real binary out of an npm package, see STACK-NOTES);
hadolint and kubernetes-validate from the ``test`` extra. A missing tool fails the test with
what to run: CI installs them, so a skip would hide a broken install.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings, load_settings
from service.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "strokeseg"
SPLIT_VALUES = CHART / "examples" / "split-gpu.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
GPU_DOCKERFILE = REPO / "docker" / "Dockerfile.gpu"
DOCKERFILES = (DOCKERFILE, GPU_DOCKERFILE)
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
INSTALL_HINT = "run `bash scripts/test.sh` (the README's test command), which installs it"

Manifest = dict[str, Any]


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    """Path of a deployment tool: the venv's bin first (where scripts/test.sh puts helm)."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed: {INSTALL_HINT}")


def _run(args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def helm() -> str:
    path = _tool("helm")
    version = _run([path, "version", "--short"])
    assert version.returncode == 0 and version.stdout.startswith("v3."), (
        f"{path} is not a working helm v3: {version.stdout}{version.stderr}; {INSTALL_HINT}"
    )
    return path


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed: {INSTALL_HINT}")
    return kubernetes_validate


def _kubernetes_versions(kubernetes_validate: Any) -> list[str]:
    """The chart's minimum Kubernetes (Chart.yaml kubeVersion) and the newest one known."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", chart["kubeVersion"])
    assert match, f"unexpected kubeVersion {chart['kubeVersion']!r}"
    return [match.group(1), kubernetes_validate.latest_version()]


# --------------------------------------------------------------------------- rendering


def _template(
    helm: str, *, release: str, values: Path | None = None, sets: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = [helm, "template", release, str(CHART)]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return _run(args)


def _render(helm: str, **kwargs: Any) -> list[Manifest]:
    out = _template(helm, **kwargs)
    assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def embedded(helm: str) -> list[Manifest]:
    return _render(helm, release="site")


@pytest.fixture(scope="module")
def split(helm: str) -> list[Manifest]:
    return _render(helm, release="strokeseg", values=SPLIT_VALUES)


@pytest.fixture(params=["embedded", "split"])
def manifests(request: pytest.FixtureRequest) -> list[Manifest]:
    return request.getfixturevalue(request.param)


def _of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def _named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in _of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _deployment(manifests: list[Manifest], component: str) -> Manifest:
    found = [
        d
        for d in _of_kind(manifests, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    assert len(found) == 1, f"expected one {component} Deployment, found {len(found)}"
    return found[0]


def _containers(manifests: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    for deployment in _of_kind(manifests, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def _ports(container: Manifest) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _mount(container: Manifest, volume: str) -> str:
    paths = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    assert len(paths) == 1, (
        f"container {container['name']} mounts volume {volume} {len(paths)} times"
    )
    return str(paths[0])


def _pod_settings(
    manifests: list[Manifest],
    deployment: Manifest,
    container: Manifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """What ``load_settings`` returns inside this container: the ConfigMap's file at the path the
    container's args name, plus the container's env and the env of the Secrets it imports."""
    pod = deployment["spec"]["template"]["spec"]
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_path.parent == Path(_mount(container, "config"))
    configmap = _named(manifests, "ConfigMap", config_volume["configMap"]["name"])
    config_file = tmp_path / f"{container['name']}-{config_path.name}"
    config_file.write_text(configmap["data"][config_path.name])

    env: dict[str, str] = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert env.get("STROKESEG_CONFIG") == str(config_path), (
        "kubectl exec strokeseg ... must find the config"
    )
    del env["STROKESEG_CONFIG"]  # the test loads the copy in tmp_path
    for source in container.get("envFrom", []):
        secret = _named(manifests, "Secret", source["secretRef"]["name"])
        env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})

    for name in [n for n in os.environ if n.startswith("STROKESEG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config_file)


# --------------------------------------------------------------------------- helm lint / validate


@pytest.mark.parametrize("values", [None, SPLIT_VALUES], ids=["default-values", "split-gpu"])
def test_helm_lint_strict_passes(helm: str, values: Path | None) -> None:
    args = [helm, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    out = _run(args)
    assert out.returncode == 0, f"helm lint failed:\n{out.stdout}{out.stderr}"


def test_every_rendered_manifest_validates(
    manifests: list[Manifest], kubernetes_validate: Any
) -> None:
    versions = _kubernetes_versions(kubernetes_validate)
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: checked by test_monitoring_objects_ship_the_tested_rules
        for version in versions:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{manifest['kind']} {manifest['metadata']['name']} is invalid for "
                    f"Kubernetes {version}: {exc.message} at {list(exc.path)}"
                )


def test_embedded_and_split_render_the_expected_workloads(
    embedded: list[Manifest], split: list[Manifest]
) -> None:
    serve = _deployment(embedded, "serve")
    assert serve["spec"]["template"]["spec"]["containers"][0]["args"][0] == "serve"
    assert serve["spec"]["replicas"] == 1 and serve["spec"]["strategy"]["type"] == "Recreate"
    assert not _of_kind(embedded, "Secret"), "embedded mode has no URLs to keep secret"
    assert _of_kind(embedded, "PersistentVolumeClaim")[0]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]

    scp, worker = _deployment(split, "scp"), _deployment(split, "worker")
    assert scp["spec"]["template"]["spec"]["containers"][0]["args"][0] == "scp"
    assert scp["spec"]["replicas"] == 1, "one SCP: its assembler decides when a study is complete"
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    assert (
        worker["spec"]["replicas"] == yaml.safe_load(SPLIT_VALUES.read_text())["worker"]["replicas"]
    )
    assert _of_kind(split, "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    with pytest.raises(AssertionError):
        _deployment(split, "serve")


# --------------------------------------------------------------------------- the config strokeseg reads


def test_rendered_config_loads_in_every_container(
    manifests: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    containers = list(_containers(manifests))
    assert containers
    for deployment, container in containers:
        settings = _pod_settings(manifests, deployment, container, tmp_path, monkeypatch)
        assert settings.spool_dir == Path(_mount(container, "spool"))
        ports = _ports(container)
        if "dicom" in ports:
            assert ports["dicom"] == settings.scp.port
        if container["args"][0] == "worker":
            assert ports.get("metrics", 0) == settings.metrics.worker_port
        else:
            assert ports.get("metrics", 0) == settings.metrics.scp_port
        if container["args"][0] == "serve":
            assert ports.get("worker-metrics", 0) == settings.metrics.worker_port
            # Embedded: SQLite database and broker on the spool volume.
            assert settings.embedded_broker
            assert settings.database_url == f"sqlite:///{settings.spool_dir / 'strokeseg.sqlite'}"


def test_split_config_passes_every_setting_through(
    split: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = yaml.safe_load(SPLIT_VALUES.read_text())
    for component in ("scp", "worker"):
        deployment = _deployment(split, component)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        s = _pod_settings(split, deployment, container, tmp_path, monkeypatch)
        # URLs come from the Secret (env), not from the ConfigMap.
        assert s.database_url == values["urls"]["database"]
        assert s.broker_url == values["urls"]["broker"] and not s.embedded_broker
        assert "change-me" not in yaml.safe_dump(_of_kind(split, "ConfigMap"))
        # Free-form config keys reach strokeseg unchanged.
        assert [(d.ae_title, d.port, d.storage_commitment) for d in s.destinations] == [
            ("ORTHANC", 4242, True)
        ]
        assert s.destinations[0].send == ["SEG", "SR", "OVERLAY"] and s.overlay_enabled
        assert s.delivery.commitment_max_attempts == 5
        assert s.delivery.commitment_timeout_s == 120
        assert s.derive.core_min_cluster_ml == 0.5
        assert s.derive.core_volume_cutoffs_ml == [21, 31, 51, 70]
        assert s.scp.allowed_calling_aets == ["MR1", "ORTHANC"]
        assert [(r.manufacturer, r.model_dir) for r in s.model_routes] == [
            ("GE", Path("/models/unet2d-site-ge/1.0.0"))
        ]
        # Every routed model lies on a volume the container mounts.
        mounts = [Path(m["mountPath"]) for m in container["volumeMounts"]]
        for route in s.model_routes:
            assert any(route.model_dir.is_relative_to(m) for m in mounts), route


def test_a_config_strokeseg_refuses_is_caught(
    helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above bites: a misspelt key renders fine but strokeseg refuses it."""
    manifests = _render(helm, release="site", sets=("config.derive.core_min_cluster=0.5",))
    deployment, container = next(_containers(manifests))
    with pytest.raises(ConfigError, match="core_min_cluster"):
        _pod_settings(manifests, deployment, container, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("split.enabled=true",), "needs a shared Celery broker"),
        (
            ("split.enabled=true", "urls.broker=redis://redis:6379/0"),
            "needs a shared database",
        ),
        (("config.spool_dir=/data",), "must equal spool.mountPath"),
    ],
    ids=["split-without-broker", "split-without-database", "spool-dir-elsewhere"],
)
def test_chart_refuses_values_strokeseg_cannot_run_with(
    helm: str, sets: tuple[str, ...], message: str
) -> None:
    out = _template(helm, release="site", sets=sets)
    assert out.returncode != 0 and message in out.stderr, out.stderr


# --------------------------------------------------------------------------- GPU, Service, probes


def test_worker_requests_the_gpus_from_values(
    embedded: list[Manifest], split: list[Manifest]
) -> None:
    gpu = yaml.safe_load(SPLIT_VALUES.read_text())["worker"]["gpu"]
    assert gpu["enabled"]
    worker = _deployment(split, "worker")["spec"]["template"]["spec"]["containers"][0]
    resources = worker["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == gpu["count"]
    assert resources["requests"]["nvidia.com/gpu"] == gpu["count"]  # must equal the limit
    assert resources["requests"]["memory"] == "6Gi"  # the values' own resources are kept
    scp = _deployment(split, "scp")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in yaml.safe_dump(scp), "the SCP needs no GPU"
    assert "nvidia.com/gpu" not in yaml.safe_dump(embedded), "GPUs are off by default"


@pytest.mark.parametrize(
    ("fixture", "component", "service_port"),
    [("embedded", "serve", 11112), ("split", "scp", 104)],
)
def test_dicom_service_exposes_the_scp_port(
    request: pytest.FixtureRequest, fixture: str, component: str, service_port: int
) -> None:
    manifests: list[Manifest] = request.getfixturevalue(fixture)
    (service,) = _of_kind(manifests, "Service")
    dicom = next(p for p in service["spec"]["ports"] if p["name"] == "dicom")
    assert dicom["port"] == service_port and dicom["protocol"] == "TCP"
    # The Service selects exactly the SCP pods, whose named port is the config's scp.port.
    selected = [
        d
        for d in _of_kind(manifests, "Deployment")
        if service["spec"]["selector"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert [
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for d in selected
    ] == [component]
    container = selected[0]["spec"]["template"]["spec"]["containers"][0]
    assert dicom["targetPort"] == "dicom" and "dicom" in _ports(container)
    config = yaml.safe_load(_of_kind(manifests, "ConfigMap")[0]["data"]["config.yaml"])
    assert _ports(container)["dicom"] == config["scp"]["port"]


def test_probes_exist_and_point_at_real_ports(manifests: list[Manifest]) -> None:
    for _, container in _containers(manifests):
        kind = container["args"][0]
        wanted = {"startupProbe", "livenessProbe"} | (
            {"readinessProbe"} if kind != "worker" else set()
        )
        assert wanted <= container.keys(), f"{container['name']} lacks {wanted - container.keys()}"
        for probe in wanted:
            action = container[probe].get("tcpSocket") or container[probe].get("httpGet")
            assert action and action["port"] in _ports(container), (container["name"], probe)
        if kind != "worker":
            assert container["readinessProbe"]["tcpSocket"]["port"] == "dicom"


# --------------------------------------------------------------------------- Dockerfiles


def _dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), " ".join(m.group(2).split()))
        for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)
    ]


def _dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ENV the Dockerfile sets (the runtime stage's win: it comes last)."""
    return dict(
        word.split("=", 1)
        for kind, rest in _dockerfile_instructions(path)
        if kind == "ENV"
        for word in shlex.split(rest)
    )


def _pip_install_args(command: str) -> list[str]:
    """The arguments after ``pip install`` in a ``&&`` chain (pip or a venv's .../bin/pip)."""
    for part in command.split("&&"):
        words = shlex.split(part)
        if len(words) >= 2 and re.fullmatch(r"(\S*/)?pip3?", words[0]) and words[1] == "install":
            return words[2:]
    raise AssertionError(f"no pip install in {command!r}")


def _readme_install_args() -> tuple[str, list[str]]:
    """The README's run command and its pip install arguments."""
    readme = (REPO / "README.md").read_text()
    run_section = readme.split("## Run it", 1)[1].split("\n## ", 1)[0]
    (run_command,) = re.findall(r"^python3 -m venv .*$", run_section, re.MULTILINE)
    return run_command, _pip_install_args(run_command)


def _dockerfile_install_args(path: Path) -> tuple[str, list[str]]:
    """The Dockerfile's one RUN with ``pip install`` and its arguments, build ARGs resolved."""
    instructions = _dockerfile_instructions(path)
    args = {
        name: default
        for kind, rest in instructions
        if kind == "ARG"
        for name, _, default in [rest.partition("=")]
    }
    pip_runs = [rest for kind, rest in instructions if kind == "RUN" and "pip install" in rest]
    assert len(pip_runs) == 1, pip_runs
    docker_args = [
        re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], word)
        for word in _pip_install_args(pip_runs[0])
        if word != "--no-cache-dir"  # image size only; installs the same thing
    ]
    return pip_runs[0], docker_args


def _stages(path: Path) -> list[str]:
    """The base image of each FROM (``AS name`` dropped)."""
    return [rest.split()[0] for kind, rest in _dockerfile_instructions(path) if kind == "FROM"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_on_the_dockerfile(dockerfile: Path) -> None:
    out = _run([_tool("hadolint"), "--no-color", str(dockerfile)])
    assert out.returncode == 0 and not out.stdout.strip(), f"hadolint:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [(DOCKERFILE, "cpu"), (GPU_DOCKERFILE, "gpu")], ids=["cpu", "gpu"]
)
def test_dockerfile_installs_like_the_readme_run_command(dockerfile: Path, extra: str) -> None:
    run_command, readme_args = _readme_install_args()
    # The GPU image installs the gpu extra where the README (a CPU machine) names cpu.
    wanted = [arg.replace("[cpu]", f"[{extra}]") for arg in readme_args]
    pip_run, docker_args = _dockerfile_install_args(dockerfile)
    assert docker_args == wanted, f"{dockerfile.name} installs {docker_args}, README {readme_args}"
    # ... with pip from a venv made the README's way, first on PATH in the image.
    assert "python3 -m venv .venv" in pip_run
    assert "python3 -m venv .venv" in run_command
    instructions = _dockerfile_instructions(dockerfile)
    workdir = next(rest for kind, rest in instructions if kind == "WORKDIR")
    assert _dockerfile_env(dockerfile)["PATH"].startswith(f"{workdir}/.venv/bin:")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_and_ships_the_builders_venv(dockerfile: Path) -> None:
    """The runtime stage copies the builder's /opt/strokeseg (venv + the sources its editable
    install points at, same path) onto the same base, so the venv's python is there."""
    instructions = _dockerfile_instructions(dockerfile)
    stages = _stages(dockerfile)
    assert len(stages) == 2 and stages[0] == stages[1], stages
    builder = next(rest for kind, rest in instructions if kind == "FROM").split()
    assert builder[1:] == ["AS", "builder"], builder
    workdir = next(rest for kind, rest in instructions if kind == "WORKDIR")
    assert f"--from=builder {workdir} {workdir}" in [rest for kind, rest in instructions if kind == "COPY"]
    # The install happens in the builder only (the one pip RUN comes before the second FROM).
    kinds = [kind for kind, _ in instructions]
    second_from = kinds.index("FROM", 1)
    pip_at = next(i for i, (kind, rest) in enumerate(instructions) if kind == "RUN" and "pip install" in rest)
    assert pip_at < second_from


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_matches_pyproject_and_chart(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {
        src for kind, rest in instructions if kind == "COPY" for src in shlex.split(rest)[:-1]
    }
    # What `pip install .` reads: pyproject, its readme, every package folder.
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package} is not copied into the image"
    # The base image's Python satisfies requires-python.
    required = re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert required
    python = _base_python(_stages(dockerfile)[0])
    assert python >= tuple(map(int, required.groups())), (dockerfile.name, python)
    # The image's numeric user is the chart's runAsUser/fsGroup; the exposed ports the config's.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (user,) = [rest for kind, rest in instructions if kind == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["fsGroup"]
    exposed = [int(port) for kind, rest in instructions if kind == "EXPOSE" for port in rest.split()]
    assert exposed[0] == values["config"]["scp"]["port"]
    metrics = values["config"]["metrics"]
    assert {metrics["scp_port"], metrics["worker_port"]} <= set(exposed)
    assert _dockerfile_env(dockerfile)["STROKESEG_SPOOL_DIR"] == values["spool"]["mountPath"]


def _base_python(base: str) -> tuple[int, int]:
    """The Python a base image brings: python:X.Y-..., or the distribution's python3."""
    if match := re.match(r"python:(\d+)\.(\d+)", base):
        return int(match.group(1)), int(match.group(2))
    distribution_python3 = {"ubuntu24.04": (3, 12), "ubuntu22.04": (3, 10)}
    distribution = base.rsplit("-", 1)[-1]
    assert distribution in distribution_python3, f"which python3 does {base} have?"
    return distribution_python3[distribution]


def test_the_dockerignore_files_agree() -> None:
    """BuildKit reads <Dockerfile>.dockerignore next to each Dockerfile: one list for both."""
    ignores = [path.with_name(path.name + ".dockerignore") for path in DOCKERFILES]
    texts = {path.name: path.read_text() for path in ignores}
    assert len(set(texts.values())) == 1, f"{list(texts)} differ"
    patterns = [ln for ln in texts[ignores[0].name].splitlines() if ln and not ln.startswith("#")]
    assert {".venv", ".git", "runs", "var", ".env"} <= set(patterns)


# --------------------------------------------------------------------------- the GPU image

# What onnxruntime-gpu 1.31.1 (the newest release when Dockerfile.gpu was written) declares
# about CUDA in its wheel's METADATA.
ONNXRUNTIME_GPU_METADATA = """\
Metadata-Version: 2.1
Name: onnxruntime-gpu
Version: 1.31.1
Requires-Dist: numpy>=1.21.6
Provides-Extra: cuda
Requires-Dist: nvidia-cuda-nvrtc~=13.0; extra == "cuda"
Requires-Dist: nvidia-cuda-runtime~=13.0; extra == "cuda"
Provides-Extra: cudnn
Requires-Dist: nvidia-cudnn-cu13~=9.0; extra == "cudnn"
"""


def test_gpu_image_runs_cuda_with_cudnn_on_the_runtime_base() -> None:
    for base in _stages(GPU_DOCKERFILE):
        match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
        assert match, f"{base}: not an nvidia/cuda cuDNN *runtime* image"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("onnxruntime-gpu") for req in extras["gpu"])
    assert not any(req.startswith("onnxruntime-gpu") for req in extras["cpu"])


def _cuda_check_command() -> str:
    """The Dockerfile.gpu RUN that compares onnxruntime-gpu's CUDA with the base's."""
    (run,) = [
        rest for kind, rest in _dockerfile_instructions(GPU_DOCKERFILE)
        if kind == "RUN" and "CUDA_VERSION" in rest
    ]
    words = shlex.split(run)
    assert words[:2] == ["python", "-c"], words
    return words[2]


@pytest.mark.parametrize("matches", [True, False], ids=["same-cuda-major", "other-cuda-major"])
def test_gpu_build_stops_when_onnxruntime_gpu_wants_another_cuda(tmp_path: Path, matches: bool) -> None:
    """The builder's check, run on onnxruntime-gpu 1.31.1's metadata: it passes with the base's
    CUDA version and stops the build with another major."""
    dist = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(ONNXRUNTIME_GPU_METADATA)
    base_cuda = re.search(r":(\d+\.\d+\.\d+)-", _stages(GPU_DOCKERFILE)[0])
    assert base_cuda
    major, rest = base_cuda.group(1).split(".", 1)
    cuda = base_cuda.group(1) if matches else f"{int(major) - 1}.{rest}"
    out = subprocess.run(
        [sys.executable, "-c", _cuda_check_command()], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VERSION": cuda},
    )
    if matches:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0 and "change the FROM lines" in out.stderr, out.stderr


# --------------------------------------------------------------------------- the HEALTHCHECK


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_runs_the_shipped_script_with_the_venv_python(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    (healthcheck,) = [rest for kind, rest in instructions if kind == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert {"--interval", "--timeout", "--start-period", "--retries"} <= {
        opt.split("=")[0] for opt in options.split()
    }
    python, script = json.loads(command)
    workdir = next(rest for kind, rest in instructions if kind == "WORKDIR")
    assert python == f"{workdir}/.venv/bin/python"
    assert f"docker/healthcheck.py {script}" in [rest for kind, rest in instructions if kind == "COPY"]
    assert HEALTHCHECK.is_file()


def _healthcheck(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--pid", str(pid)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_healthcheck_is_unhealthy_for_a_process_that_is_not_strokeseg() -> None:
    out = _healthcheck(os.getpid())  # pytest
    assert out.returncode == 1 and "is not strokeseg" in out.stdout, out.stdout + out.stderr


@pytest.mark.network
@pytest.mark.parametrize("metrics_port", [True, False], ids=["metrics-port", "metrics-off"])
def test_healthcheck_asks_a_running_strokeseg(tmp_path: Path, metrics_port: bool) -> None:
    """The image's HEALTHCHECK script against a real ``strokeseg serve``: it reads the settings
    that process reads (its --config, its environment) and asks /healthz on its metrics port,
    or with the metrics port off connects to the DICOM port; once the process is gone it is
    unhealthy."""
    from tests.conftest import free_port
    from tests.peers import Strokeseg, echo_ok, wait_for, write_config

    port, scp_metrics, worker_metrics = free_port(), free_port(), free_port()
    metrics = {"scp_port": scp_metrics, "worker_port": worker_metrics} if metrics_port else {}
    config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                          destinations=[], metrics=metrics)
    with Strokeseg("serve", config) as serve:
        assert serve.proc is not None
        pid = serve.proc.pid

        def passes() -> subprocess.CompletedProcess[str] | None:
            out = _healthcheck(pid)
            return out if out.returncode == 0 else None

        wait_for(lambda: echo_ok(port), 60, "serve to start")
        out = wait_for(passes, 30, "the healthcheck to pass")
        expected = f":{scp_metrics}/healthz answered 200" if metrics_port else f"DICOM port {port} accepts"
        assert expected in out.stdout, out.stdout
        assert serve.stop() == 0, serve.output()
    out = _healthcheck(pid)
    assert out.returncode == 1, out.stdout + out.stderr


def test_network_policy_limits_dicom_and_metrics_to_the_listed_peers(
    embedded: list[Manifest], split: list[Manifest]
) -> None:
    assert _of_kind(embedded, "NetworkPolicy") == []  # opt-in
    (policy,) = _of_kind(split, "NetworkPolicy")
    dicom, metrics = policy["spec"]["ingress"]
    (container,) = [c for d, c in _containers(split) if d["spec"]["template"]["metadata"]["labels"]
                    ["app.kubernetes.io/component"] == "scp"]
    assert [p["port"] for p in dicom["ports"]] == [_ports(container)["dicom"]]
    assert dicom["from"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert {p["port"] for p in metrics["ports"]} == {9100, 9101}
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "strokeseg"



def test_monitoring_objects_ship_the_tested_rules_and_dashboard(
    embedded: list[Manifest], split: list[Manifest]
) -> None:
    """The PrometheusRule holds exactly the rules promtool tests; the dashboard ConfigMap the JSON
    Prometheus is queried with (tests/test_ops.py); the monitors scrape ports that exist."""
    import json

    assert not [m for m in embedded if m["apiVersion"].startswith("monitoring.coreos.com/")]  # opt-in
    (rule,) = _of_kind(split, "PrometheusRule")
    rules_file = REPO / "deploy" / "prometheus" / "strokeseg-alerts.yml"
    assert rule["spec"] == yaml.safe_load(rules_file.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = _of_kind(split, "ServiceMonitor")
    service = _named(split, "Service", "strokeseg-dicom")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    (pods,) = _of_kind(split, "PodMonitor")
    worker = _deployment(split, "worker")
    assert pods["spec"]["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] in _ports(container)
    dashboard = _named(split, "ConfigMap", "strokeseg-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["strokeseg.json"])
    assert shipped == json.loads((REPO / "deploy" / "grafana" / "dashboards" / "strokeseg.json").read_text())
