"""A real Orthanc (Debian package) as the test PACS, on free loopback ports.

Orthanc is the peer our users most often try first and one of the few free
PACS that implements the Storage Commitment SCP, so delivery tests run
against it rather than a mock.  :class:`Orthanc` writes a configuration
directory with temporary storage and index folders, lists the modalities
(our AE) it may talk back to, starts ``Orthanc --no-jobs <cfgdir>``, waits for
its REST API, and stops it on exit.  Its log is kept in the work folder and
its tail is shown when start-up fails.

Orthanc 1.10 has no DICOM bind-address option: it listens on all interfaces,
on the port we pick.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


def orthanc_binary() -> str:
    """Path of the Orthanc server (Debian package ``orthanc``)."""
    for candidate in ORTHANC_BINARIES:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Orthanc is not installed (apt-get install orthanc)")


@dataclass(frozen=True, slots=True)
class Modality:
    """A remote AE Orthanc knows (and may open associations to)."""

    name: str
    ae_title: str
    port: int
    host: str = "127.0.0.1"
    allow_storage_commitment: bool = True

    def as_config(self) -> dict[str, Any]:
        return {
            "AET": self.ae_title,
            "Host": self.host,
            "Port": self.port,
            "AllowStorageCommitment": self.allow_storage_commitment,
        }


class Orthanc:
    """``Orthanc --no-jobs <cfgdir>`` with its own storage, ports and modalities."""

    def __init__(
        self,
        workdir: Path,
        *,
        modalities: Sequence[Modality] = (),
        ae_title: str = "ORTHANC",
        http_port: int = 0,
        dicom_port: int = 0,
        scu_timeout_s: int = 10,
        start_timeout_s: float = 30.0,
        verbose: bool = False,
        lua: str = "",
        extra_config: dict[str, object] | None = None,
    ) -> None:
        """Ports 0 (the default) are picked free at each start; give fixed ones to
        e.g. configure a destination before its PACS is up ("down, then up").
        ``lua`` is a Lua script Orthanc runs (``LuaScripts``), e.g. an
        ``OnStoredInstance`` callback that misbehaves on purpose."""
        self.workdir = workdir
        self.modalities = list(modalities)
        self.ae_title = ae_title
        self.scu_timeout_s = scu_timeout_s
        self.start_timeout_s = start_timeout_s
        self.verbose = verbose
        self.lua = lua
        self.extra_config = dict(extra_config or {})
        self.fixed_ports = (http_port, dicom_port)
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0

    # -- life cycle ---------------------------------------------------------------------
    def _write_config(self) -> Path:
        cfg_dir = self.workdir / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        (self.workdir / "index").mkdir(exist_ok=True)
        config = {
            "Name": "strokeseg-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomScuTimeout": self.scu_timeout_s,
            "DicomModalities": {m.name: m.as_config() for m in self.modalities},
            "DicomModalitiesInDatabase": False,
            "Plugins": [],
            "SaveJobs": False,
            "OverwriteInstances": True,
            "StorageCompression": False,
        }
        config.update(self.extra_config)
        if self.lua:
            script = self.workdir / "script.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        (cfg_dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        return cfg_dir

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # A free port can be taken between probing and binding: try a few times.
        for _attempt in range(3):
            self.http_port = self.fixed_ports[0] or free_port()
            self.dicom_port = self.fixed_ports[1] or free_port()
            cfg_dir = self._write_config()
            args = [orthanc_binary()]
            if self.verbose:
                args.append("--verbose")
            args += ["--no-jobs", str(cfg_dir)]
            with self.log_path.open("ab") as log_fh:
                self.proc = subprocess.Popen(args, stdout=log_fh, stderr=subprocess.STDOUT)
            if self._wait_ready(started + self.start_timeout_s):
                self.start_s = time.monotonic() - started
                return self
            self.stop()
        raise AssertionError(f"Orthanc did not start; log tail:\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                system = self.get("/system")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
                continue
            return bool(system.get("DicomAet") == self.ae_title)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def delete(self, path: str) -> None:
        request = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def orthanc_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's own id of the instance with this SOP Instance UID (None: not stored)."""
        matches = self.post("/tools/lookup", sop_instance_uid.encode())
        return next((str(m["ID"]) for m in matches if m.get("Type") == "Instance"), None)

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Delete a stored instance through the REST API (``DELETE /instances/{id}``)."""
        orthanc_id = self.orthanc_id(sop_instance_uid)
        assert orthanc_id is not None, f"Orthanc does not have {sop_instance_uid}"
        self.delete(f"/instances/{orthanc_id}")

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The DICOM file Orthanc stores for this SOP Instance UID."""
        orthanc_id = self.orthanc_id(sop_instance_uid)
        assert orthanc_id is not None, f"Orthanc does not have {sop_instance_uid}"
        with urllib.request.urlopen(f"{self.url}/instances/{orthanc_id}/file", timeout=30) as response:
            return bytes(response.read())

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc has stored (``/instances?expand``)."""
        return {
            str(item["MainDicomTags"]["SOPInstanceUID"])
            for item in self.get("/instances?expand")
        }

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether Orthanc stores the instance (``/tools/lookup``)."""
        matches = self.post("/tools/lookup", sop_instance_uid.encode())
        return any(m.get("Type") == "Instance" for m in matches)

    # -- for the code under test --------------------------------------------------------
    def destination(self, name: str = "orthanc") -> dict[str, Any]:
        """This Orthanc as a strokeseg ``destinations`` entry."""
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.dicom_port}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
