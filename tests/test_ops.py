"""Alert rules and the Grafana dashboard with the real Prometheus tools, against a running strokeseg.

promtool (Debian package ``prometheus``, installed by scripts/test.sh) checks and unit-tests
the rules; a live ``strokeseg serve`` processes a study and every metric name the rules use
must be on its /metrics pages: a misspelt name fails here, not silently in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.peers import StoreSCP, Strokeseg, echo_ok, storescu, wait_for, write_config

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "strokeseg-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "strokeseg-alerts.test.yml"
RUNBOOK = REPO / "docs" / "operations.md"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed (Debian package prometheus; scripts/test.sh installs it)")
    return tool


def _alerts() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    checked = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_and_a_runbook_entry() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    runbook = RUNBOOK.read_text()
    for alert in _alerts():
        assert alert in tested and alert in fired, f"{alert}: no promtool test that fires it"
        assert f"### {alert}\n" in runbook, f"{alert}: no runbook entry in docs/operations.md"


@pytest.mark.network
@pytest.mark.slow
def test_every_metric_the_rules_use_is_exported_by_a_running_service(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    used = {name for expr in _alerts().values() for name in re.findall(r"\bstrokeseg_[a-z_]+", expr)}
    port, scp_metrics, worker_metrics = free_port(), free_port(), free_port()
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[peer.destination()], completion_timeout_s=1.0,
                              metrics={"scp_port": scp_metrics, "worker_port": worker_metrics})
        with Strokeseg("serve", config) as serve:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, phantom_cases[0] / "dicom")
            wait_for(lambda: len(peer.received()) >= 2, 120, "the study's results")

            def pages() -> str:
                return "".join(
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode()
                    for p in (scp_metrics, worker_metrics)
                )

            def exported() -> set[str]:
                names = set(re.findall(r"^# TYPE (strokeseg_[a-z_]+) ", pages(), re.MULTILINE))
                # counters are typed without their _total suffix; samples carry it
                return names | {n + "_total" for n in names}

            missing = wait_for(lambda: not (used - exported()), 30, "every metric the rules use") and set()
            assert not missing, used - exported()
            # the job is recorded delivered just after the PACS has the objects
            wait_for(lambda: re.search(r'^strokeseg_jobs\{state="delivered"\} 1\.0$', pages(), re.MULTILINE),
                     30, "the delivered job on /metrics")
            text = pages()
            assert re.search(r"^strokeseg_result_latency_seconds_count\{destination=\"pacs\"\} 1\.0$", text,
                             re.MULTILINE), text
            assert re.search(r'^strokeseg_model_info\{name="unet2d-realanat",provider="CPUExecutionProvider",version="0.7.0"\} 1\.0$',
                             text, re.MULTILINE), text
            assert serve.stop() == 0, serve.output()


DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "strokeseg.json"


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def _query(prometheus_port: int, expr: str) -> list[object]:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


@pytest.mark.network
@pytest.mark.slow
def test_a_real_prometheus_returns_data_for_every_dashboard_and_rule_query(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """Prometheus scrapes a running strokeseg; a study is delivered and committed, another refused;
    then every dashboard query, and every metric selector of every alert rule, returns data."""
    from tests.orthanc import Modality, Orthanc
    from tests.test_e2e import _non_diffusion_study

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed (Debian package prometheus; scripts/test.sh installs it)")
    port, scp_metrics, worker_metrics, prom_port = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "strokeseg", "static_configs": [
            {"targets": [f"127.0.0.1:{scp_metrics}", f"127.0.0.1:{worker_metrics}"]}]}],
    }))
    checked = subprocess.run([_promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    server = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with Orthanc(tmp_path / "orthanc", modalities=[Modality("strokeseg", "STROKESEG", port)]) as pacs:
            destination = {**pacs.destination(), "name": "orthanc", "storage_commitment": True}
            config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                                  destinations=[destination], completion_timeout_s=1.0,
                                  metrics={"scp_port": scp_metrics, "worker_port": worker_metrics})
            with Strokeseg("serve", config) as serve:
                wait_for(lambda: echo_ok(port), 60, "serve to start")
                wait_for(lambda: len(_query(prom_port, 'up{job="strokeseg"} == 1')) == 2, 60,
                         "Prometheus scraping both strokeseg processes")
                storescu(port, phantom_cases[0] / "dicom")
                _non_diffusion_study(tmp_path / "t1")
                storescu(port, tmp_path / "t1")
                wait_for(lambda: _query(prom_port, 'strokeseg_commitment_transactions{state="committed"} > 0'),
                         120, "a committed result, scraped")
                wait_for(lambda: _query(prom_port, 'strokeseg_jobs{state="refused"} > 0'), 60,
                         "the refusal, scraped")
                time.sleep(3)  # a few more scrapes after the last change
                empty = [expr for expr in _dashboard_queries() if not _query(prom_port, expr)]
                assert not empty, f"dashboard queries without data: {empty}"
                for alert, expr in _alerts().items():
                    for selector in set(re.findall(r"\bstrokeseg_[a-z_]+(?:\{[^}]*\})?", expr)):
                        name = selector.split("{", 1)[0]
                        # a selector on a state that did not occur (e.g. failed commitments) still
                        # needs its metric to exist
                        assert _query(prom_port, selector) or _query(prom_port, name), (alert, selector)
                assert serve.stop() == 0, serve.output()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.network
@pytest.mark.slow
def test_with_no_worker_a_study_raises_the_watchdog_and_the_missing_result_alert_fires(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """The drill ops need to trust: the worker is stopped (split mode, only the SCP runs), a study
    arrives, and the missing-result watchdog rises and its alert fires in a real Prometheus.

    The rules are the shipped file with only StrokesegMissingResult's ``for:`` shortened from
    5m to 1s (promtool's unit test covers the 5 minutes), and the watchdog set to 3 s.
    """
    import uuid

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed (Debian package prometheus; scripts/test.sh installs it)")
    rules = yaml.safe_load(RULES.read_text())
    (missing_rule,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "StrokesegMissingResult"]
    assert missing_rule["for"] == "5m"
    missing_rule["for"] = "1s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    port, scp_metrics, prom_port = free_port(), free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": "strokeseg", "static_configs": [
            {"targets": [f"127.0.0.1:{scp_metrics}"]}]}],
    }))
    server = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        config = write_config(
            tmp_path / "scp.yaml", scp_port=port, spool=tmp_path / "spool", destinations=[],
            completion_timeout_s=1.0, broker_url="redis://127.0.0.1:6379/12",
            worker={"queue": f"no-worker-{uuid.uuid4().hex[:8]}"},
            metrics={"scp_port": scp_metrics, "missing_result_after_s": 3.0},
        )
        with Strokeseg("scp", config) as scp:
            wait_for(lambda: echo_ok(port), 60, "the SCP to start")
            wait_for(lambda: _query(prom_port, 'up{job="strokeseg"} == 1'), 60, "Prometheus scraping the SCP")
            assert _query(prom_port, "strokeseg_missing_results == 0"), "no study yet: nothing missing"
            storescu(port, phantom_cases[0] / "dicom")
            wait_for(lambda: _query(prom_port, 'strokeseg_jobs{state="queued"} > 0'), 60,
                     "the study queued, with no worker to take it")
            wait_for(lambda: _query(prom_port, "strokeseg_missing_results > 0"), 60,
                     "the missing-result watchdog to rise")
            wait_for(lambda: _query(prom_port, 'ALERTS{alertname="StrokesegMissingResult",alertstate="firing"}'),
                     60, "StrokesegMissingResult firing")
            worker_down = _query(prom_port, 'ALERTS{alertname="StrokesegWorkerDown"}')
            assert worker_down, "no worker heartbeat at all: WorkerDown is at least pending"
            assert scp.proc is not None and scp.proc.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
