from pathlib import Path

import pytest

from service.config import BUNDLED_MODEL_DIR, load_settings
from service.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_loads_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKESEG_SCP__PORT", "4104")
    monkeypatch.setenv("STROKESEG_STUDY__COMPLETION_TIMEOUT_S", "2.5")
    monkeypatch.setenv(
        "STROKESEG_DESTINATIONS", '[{"name":"a","ae_title":"A","host":"127.0.0.1","port":104}]'
    )
    s = load_settings(REPO / "config" / "strokeseg.example.yaml")
    assert s.scp.port == 4104
    assert s.scp.ae_title == "STROKESEG"
    assert s.study.completion_timeout_s == 2.5
    assert [d.ae_title for d in s.destinations] == ["A"]


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STROKESEG_CONFIG", raising=False)
    s = load_settings(spool_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'strokeseg.sqlite'}"
    assert s.broker_url.startswith("sqla+sqlite:///")
    assert s.embedded_broker
    assert s.model_dir == BUNDLED_MODEL_DIR
    assert s.scp.port == 11112 and s.worker.queue == "gpu"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scp:\n  ae_title: ROUTER1\n  allowed_calling_aets: [MRI1]\n")
    monkeypatch.setenv("STROKESEG_CONFIG", str(cfg))
    s = load_settings()
    assert s.scp.ae_title == "ROUTER1"
    assert s.scp.allowed_calling_aets == ["MRI1"]


@pytest.mark.parametrize(
    "text",
    ["scp:\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "scp:\n  port: 70000\n", "unknown_key: 1\n"],
)
def test_invalid_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_example_config_documents_the_assess_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The annotated example states the defaults for the assess section and derive.core_scope."""
    monkeypatch.delenv("STROKESEG_CONFIG", raising=False)
    example = load_settings(REPO / "config" / "strokeseg.example.yaml")
    defaults = load_settings()
    assert example.assess == defaults.assess
    assert example.assess.outside_range_policy == "deliver"
    assert example.derive.core_scope == defaults.derive.core_scope == "lesion"


def test_network_allow_list_entries_are_checked_and_metrics_stay_local_by_default() -> None:
    from pydantic import ValidationError

    from service.config import ScpSettings, Settings

    assert ScpSettings(allowed_networks=["10.1.2.0/24", "192.168.0.7", "fd00::/8"]).allowed_networks
    with pytest.raises(ValidationError, match="10.1.2.300/24"):
        ScpSettings(allowed_networks=["10.1.2.300/24"])
    assert Settings().metrics.host == "127.0.0.1"
