"""The images' HEALTHCHECK: does the strokeseg process in this container answer?

Docker runs this beside the service process, as the same user. It finds the strokeseg process
(``strokeseg serve|scp|worker``: PID 1, or the child of an init such as ``docker run --init``),
reads the settings that process reads (its ``--config`` file or ``STROKESEG_CONFIG``, its
``STROKESEG_*`` environment) with strokeseg's own loader, and asks ``/healthz`` on that
process's metrics port (``metrics.scp_port`` for serve/scp, ``metrics.worker_port`` for a
worker) with python's urllib: the slim image has no curl. With the metrics port off (0,
strokeseg's default) it does what the Helm chart's probes do: serve/scp must accept a TCP
connection on the DICOM port; a worker is healthy while it runs.

Exit status 0 = healthy, 1 = unhealthy (Docker's convention); the one line printed says why
(``docker inspect`` shows it). ``--pid PID`` checks that process instead of searching.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

ROLES = ("serve", "scp", "worker")
TIMEOUT_S = 5.0


def _argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [word.decode(errors="replace") for word in raw.split(b"\0") if word]


def _role(argv: list[str]) -> str | None:
    """``serve``/``scp``/``worker`` when ``argv`` runs ``strokeseg ROLE ...`` (the console
    script, or ``python -m service.cli`` as serve starts its worker), else None."""
    for i, word in enumerate(argv[:-1]):
        if os.path.basename(word) == "strokeseg" or (word == "service.cli" and argv[i - 1:i] == ["-m"]):
            return argv[i + 1] if argv[i + 1] in ROLES else None
    return None


def find_process() -> int | None:
    """The lowest PID running a strokeseg role (serve's own worker child comes after it)."""
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            if _role(_argv(pid)):
                return pid
        except OSError:  # gone, or not ours
            continue
    return None


def _config_file(argv: list[str], environ: dict[str, str]) -> str | None:
    for i, word in enumerate(argv):
        if word in ("--config", "-c") and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return environ.get("STROKESEG_CONFIG") or None


def _process_settings(pid: int, argv: list[str]) -> Settings:
    """load_settings as process ``pid`` ran it: its STROKESEG_* environment, its config file."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    environ = dict(
        item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
    )
    for name in [n for n in os.environ if n.startswith("STROKESEG_")]:
        del os.environ[name]
    os.environ.update({k: v for k, v in environ.items() if k.startswith("STROKESEG_")})
    config = _config_file(argv, environ)
    if config is not None:
        config = os.path.join(os.readlink(f"/proc/{pid}/cwd"), config)  # as the process resolved it
    from service.config import load_settings

    return load_settings(config)


def _local(host: str) -> str:
    """Where to reach a listener bound to ``host`` from inside the container."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def probe(pid: int) -> tuple[bool, str]:
    argv = _argv(pid)
    role = _role(argv)
    if role is None:
        return False, f"process {pid} is not strokeseg serve/scp/worker: {argv}"
    settings = _process_settings(pid, argv)
    port = settings.metrics.worker_port if role == "worker" else settings.metrics.scp_port
    if port:
        host = _local(settings.metrics.host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                return response.status == 200, f"strokeseg {role}: {url} answered {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            return False, f"strokeseg {role}: {url} did not answer ({exc})"
    if role == "worker":
        return True, "strokeseg worker runs (metrics.worker_port is 0: no /healthz to ask)"
    tls = settings.scp.tls
    dicom_port = tls.port if tls.enabled and not tls.plain else settings.scp.port
    try:
        with socket.create_connection((_local(settings.scp.host), dicom_port), timeout=TIMEOUT_S):
            pass
    except OSError as exc:
        return False, f"strokeseg {role}: DICOM port {dicom_port} refuses connections ({exc})"
    return True, f"strokeseg {role}: DICOM port {dicom_port} accepts connections (metrics port off)"


def main(args: list[str]) -> int:
    pid = int(args[args.index("--pid") + 1]) if "--pid" in args else find_process()
    if pid is None:
        print("no strokeseg serve/scp/worker process in this container")
        return 1
    try:
        healthy, why = probe(pid)
    except Exception as exc:  # a broken config or a vanished process is unhealthy, not a crash
        healthy, why = False, f"cannot check process {pid}: {type(exc).__name__}: {exc}"
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
