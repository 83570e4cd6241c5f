"""DICOM TLS (PS3.15 Annex B) both ways, against dcmtk's echoscu/storescu/storescp with ``+tls``.

Certificates are made here with the openssl command: a test CA, a server certificate for
127.0.0.1/localhost, a client certificate from the same CA, and a client certificate from
another CA that must be refused when client certificates are required.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest

from service.config import Destination, DestinationTls, ScpTlsSettings
from service.db import Database, JobStore
from service.deliver import store_objects
from service.domain import ResultObject
from service.errors import DeliveryError
from service.scp import StorageSCP
from service.storage import Spool
from tests.conftest import dcmtk_tool, free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.peers import wait_for

pytestmark = pytest.mark.network


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=folder)


def _issued(folder: Path, ca: str, name: str, *, san: str = "") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates (Debian package openssl)")
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    _issued(folder, "ca", "server", san="DNS:localhost,IP:127.0.0.1")
    _issued(folder, "ca", "client")
    _issued(folder, "rogue-ca", "rogue")
    return folder


def _tls_client(pki: Path, who: str = "client") -> list[str]:
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"), "-pw", "+cf", str(pki / "ca.pem")]


def _scp(tmp_path: Path, pki: Path, *, require_client_cert: bool) -> tuple[StorageSCP, Spool, Database]:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    spool = Spool(tmp_path / "spool")
    tls = ScpTlsSettings(enabled=True, port=free_port(), cert_file=pki / "server.pem",
                         key_file=pki / "server.key", ca_file=pki / "ca.pem",
                         require_client_cert=require_client_cert, plain=False)
    scp = StorageSCP(ae_title="STROKESEG", host="127.0.0.1", port=0, spool=spool, store=JobStore(db), tls=tls)
    scp.start()
    return scp, spool, db


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk_tool(tool), *args], capture_output=True, text=True, timeout=60)


def test_scp_accepts_tls_with_a_trusted_client_certificate(tmp_path: Path, pki: Path) -> None:
    scp, spool, db = _scp(tmp_path, pki, require_client_cert=True)
    try:
        port = str(scp.tls_port)
        echo = _run("echoscu", *_tls_client(pki), "-aec", "STROKESEG", "127.0.0.1", port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        files = write_series(make_dwi_series(3, 16, 16), tmp_path / "in")
        sent = _run("storescu", *_tls_client(pki), "-aec", "STROKESEG", "127.0.0.1", port, *map(str, files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(list(spool.incoming.rglob("*.dcm"))) == 3
        # plain DICOM to the TLS port, and a certificate from another CA, get nowhere
        assert _run("echoscu", "-aec", "STROKESEG", "-to", "5", "127.0.0.1", port).returncode != 0
        rogue = _run("echoscu", *_tls_client(pki, "rogue"), "-aec", "STROKESEG", "127.0.0.1", port)
        assert rogue.returncode != 0
        # a client that connects and never speaks does not stall the others (lazy handshake)
        with socket.create_connection(("127.0.0.1", scp.tls_port)):
            again = _run("echoscu", *_tls_client(pki), "-aec", "STROKESEG", "-to", "10", "127.0.0.1", port)
            assert again.returncode == 0, again.stdout + again.stderr
    finally:
        scp.stop()
        db.dispose()


def test_delivery_over_tls_to_dcmtk_storescp(tmp_path: Path, pki: Path) -> None:
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    peer = subprocess.Popen(
        [dcmtk_tool("storescp"), "+tls", str(pki / "server.key"), str(pki / "server.pem"), "-pw",
         "+cf", str(pki / "ca.pem"), "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _run("echoscu", *_tls_client(pki), "-aec", "PACS", "127.0.0.1", str(port)).returncode == 0,
                 20, "storescp +tls to listen")
        files = write_series(make_dwi_series(2, 16, 16), tmp_path / "objs")
        objects = [ResultObject.of("SEG", p, pydicom.dcmread(p)) for p in files]
        secure = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                             tls=DestinationTls(enabled=True, ca_file=pki / "ca.pem",
                                                cert_file=pki / "client.pem", key_file=pki / "client.key"))
        outcomes = store_objects(secure, objects, calling_ae_title="STROKESEG")
        assert [o.stored for o in outcomes] == [True, True]
        assert len(list(out.iterdir())) == 2
        # the destination's certificate must chain to the configured CA
        wrong_ca = secure.model_copy(update={"tls": DestinationTls(enabled=True, ca_file=pki / "rogue-ca.pem")})
        with pytest.raises(DeliveryError):
            store_objects(wrong_ca, objects, calling_ae_title="STROKESEG")
    finally:
        peer.terminate()
        peer.wait(timeout=10)


def test_delivery_over_mutual_tls_to_orthanc(tmp_path: Path, pki: Path) -> None:
    """Orthanc (Debian's build has DICOM TLS) requires our client certificate and stores the objects."""
    from tests.orthanc import Orthanc

    pacs = Orthanc(tmp_path / "orthanc", extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki / "server.pem"),
        "DicomTlsPrivateKey": str(pki / "server.key"),
        "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    })
    with pacs:
        files = write_series(make_dwi_series(2, 16, 16), tmp_path / "objs")
        objects = [ResultObject.of("SEG", p, pydicom.dcmread(p)) for p in files]
        secure = Destination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port,
                             tls=DestinationTls(enabled=True, ca_file=pki / "ca.pem",
                                                cert_file=pki / "client.pem", key_file=pki / "client.key"))
        outcomes = store_objects(secure, objects, calling_ae_title="STROKESEG")
        assert [o.stored for o in outcomes] == [True, True]
        assert {o.obj.sop_instance_uid for o in outcomes} <= pacs.sop_instance_uids()
        plain = secure.model_copy(update={"tls": DestinationTls()})
        with pytest.raises(DeliveryError):  # Orthanc's DICOM port speaks TLS only
            store_objects(plain, objects, calling_ae_title="STROKESEG", timeout_s=5)
