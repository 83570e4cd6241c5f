"""Typed settings: a YAML file plus ``STROKESEG_<SECTION>__<KEY>`` environment overrides.

Precedence (highest first): explicit keyword arguments, environment variables,
the YAML file (``--config`` or ``STROKESEG_CONFIG``), defaults.  Defaults give
the embedded deployment: SQLite database, a server-less Celery broker on
SQLite, the bundled model, all under ``spool_dir``.
"""

from __future__ import annotations

import ipaddress
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.errors import ConfigError
from service.preprocess.profiles import ProfileOptions, VendorWindow, VendorWindows, Window

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "zoo" / "unet2d-realanat" / "0.7.0"

_config_file: ContextVar[Path | None] = ContextVar("strokeseg_config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScpTlsSettings(_Section):
    """DICOM TLS (PS3.15 Annex B) for the SCP: a second listener, beside or instead of the plain one."""

    enabled: bool = False
    port: int = Field(2762, ge=0, le=65535, description="TLS port (2762 is DICOM's registered TLS port).")
    cert_file: Path | None = Field(None, description="Our certificate (PEM), with its chain.")
    key_file: Path | None = Field(None, description="Its private key (PEM).")
    ca_file: Path | None = Field(
        None, description="CA certificates (PEM) that client certificates must chain to."
    )
    require_client_cert: bool = Field(
        False, description="Refuse TLS peers without a certificate from ca_file (mutual TLS)."
    )
    plain: bool = Field(True, description="Also listen without TLS on scp.port; false = TLS only.")

    @model_validator(mode="after")
    def _complete(self) -> ScpTlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("scp.tls.enabled needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("scp.tls.require_client_cert needs ca_file (the CA client certificates chain to)")
        return self


class DestinationTls(_Section):
    """DICOM TLS to one destination."""

    enabled: bool = False
    ca_file: Path | None = Field(
        None, description="CA certificates (PEM) the destination's certificate must chain to; "
        "empty = the system's trust store."
    )
    cert_file: Path | None = Field(None, description="Our client certificate (PEM), if the peer asks.")
    key_file: Path | None = Field(None, description="Its private key (PEM).")
    server_name: str = Field(
        "", description="Name the destination's certificate must carry; empty = its host."
    )
    verify: bool = Field(True, description="Check the destination's certificate (keep true outside tests).")


class ScpSettings(_Section):
    ae_title: str = "STROKESEG"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(
        default_factory=list, description="Empty: accept any calling AE title."
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="IP addresses or CIDR networks allowed to connect (e.g. 10.1.2.0/24); empty = any. "
        "Others are disconnected before any DICOM is read; logged and counted.",
    )
    max_associations: int = Field(10, ge=1)
    max_pdu_size: int = Field(0, ge=0, description="0 = unlimited (fastest receive).")
    tls: ScpTlsSettings = ScpTlsSettings()
    min_free_mb: float = Field(
        1024.0, ge=0,
        description="Free space the spool's file system keeps: a C-STORE that would leave less is "
        "answered 0xA700 (out of resources: the sender keeps the image and retries later); 0 = off.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("ae_title")
    @classmethod
    def _valid_ae(cls, value: str) -> str:
        if not 0 < len(value.strip()) <= 16 or "\\" in value:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return value.strip()


class OverlaySettings(_Section):
    enabled: bool | Literal["auto"] = Field(
        "auto", description="Write the colour overlay series; auto = when a destination sends OVERLAY."
    )
    label: str = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


class DeriveSettings(_Section):
    adc_core_threshold: float = Field(620.0, gt=0, description="ADC core threshold, 1e-6 mm2/s.")
    core_volume_cutoffs_ml: list[float] = Field(
        default_factory=list,
        description="Report 'ADC core volume below X mL' comparisons (e.g. 21, 31, 51, 70); empty = off.",
    )
    core_min_cluster_ml: float = Field(
        0.3,
        ge=0,
        description="ADC core counts only 6-connected low-ADC clusters of at least this volume "
        "(mL; removes noise voxels before the cut-off comparisons); 0 = every voxel.",
    )
    core_scope: Literal["lesion", "brain"] = Field(
        "lesion",
        description="Where the ADC core is counted: lesion = inside the reported (restricted-"
        "diffusion) lesion; brain = every brain voxel (whole-brain ADC < threshold counts "
        "normal white-matter tracts and skull-base voxels on real scans).",
    )
    overlay: OverlaySettings = OverlaySettings()


class RestrictionGuardSettings(_Section):
    """The restricted-diffusion guard: a predicted component counts as lesion only if its
    ADC is low in absolute terms *and* relative to normal-appearing brain.

    Defaults: acute infarcts have a mean ADC of about 400-600 x 1e-6 mm2/s and a relative
    ADC (rADC) of about 0.5-0.75 (Schlaug 1997; Fiebach 2002; Purushotham 2015, whose voxel
    thresholds are ADC < 620 and rADC < 0.62).  A component's *mean* includes partial-volume
    voxels at its edge, so the component limits sit above those voxel thresholds; normal grey
    and white matter (rADC ~0.9-1.1), T2 shine-through and chronic lesions (rADC >= 1) fail.
    """

    enabled: bool = True
    max_mean_adc: float = Field(
        750.0, gt=0, description="A lesion's mean ADC must be below this (1e-6 mm2/s)."
    )
    max_relative_adc: float = Field(
        0.85, gt=0, description="A lesion's mean ADC / normal-appearing brain median ADC must be below this."
    )
    min_mean_adc: float = Field(
        200.0, ge=0,
        description="A lesion's mean ADC must be at least this (1e-6 mm2/s): fat (scalp, orbit) and "
        "fit failures are DWI-bright with ADC ~0-150; acute infarct cores stay above ~250.",
    )


class ValiditySettings(_Section):
    """The range the served model was validated on; a result outside it says so."""

    b_value_range: tuple[float, float] = Field(
        (900.0, 1600.0), description="Acquired b-values (s/mm2) validated on real scans."
    )
    slice_spacing_range_mm: tuple[float, float] = Field(
        (1.5, 7.0), description="Centre-to-centre slice spacing (mm) validated."
    )
    min_coverage_mm: float = Field(
        80.0, ge=0, description="Slab extent along the slice normal (mm) below which the brain is not covered."
    )
    min_snr: float = Field(
        6.0, ge=0, description="Brain median over the noise estimate of the high-b trace."
    )
    adc_median_range: tuple[float, float] = Field(
        (600.0, 1100.0),
        description="Plausible median ADC of the brain at b=1000 (1e-6 mm2/s); scaled for other b.",
    )
    max_lesion_brain_fraction: float = Field(
        0.25, gt=0, le=1, description="A lesion covering more of the brain than this is implausible."
    )
    symmetric_min_ml: float = Field(
        5.0, ge=0, description="Bilateral symmetric pattern check applies from this lesion volume (mL)."
    )
    symmetric_fraction: float = Field(
        0.5, gt=0, le=1,
        description="Share of the lesion mirrored by lesion across the midline that marks a "
        "symmetric (ribbon/artefact) pattern.",
    )


class AssessSettings(_Section):
    """Checks on every result before it is written: the guard and the domain of validity."""

    restriction: RestrictionGuardSettings = RestrictionGuardSettings()
    validity: ValiditySettings = ValiditySettings()
    outside_range_policy: Literal["deliver", "hold"] = Field(
        "deliver",
        description="deliver = send out-of-range results flagged; hold = keep them back "
        "(job state held) until an operator releases them.",
    )


class DeliverySettings(_Section):
    retry_initial_s: float = Field(30.0, gt=0, description="First automatic retry after a failed delivery.")
    retry_max_interval_s: float = Field(600.0, gt=0, description="Backoff doubles up to this interval.")
    retry_max_age_s: float = Field(
        6 * 3600.0, ge=0, description="No automatic retry once the job is this old (0 = never retry)."
    )
    commitment_timeout_s: float = Field(
        300.0, gt=0, description="A commitment request with no report after this is flagged timed_out."
    )
    commitment_max_attempts: int = Field(
        3,
        ge=1,
        description="Storage Commitment requests per result object and destination: instances a "
        "report lists as failed (or never reported) are re-sent and re-requested until this many "
        "requests were made, then recorded failed with the reason (1 = never re-request).",
    )


class StudySettings(_Section):
    completion_timeout_s: float = Field(10.0, gt=0, description="Idle time that closes a study.")
    early_completion: bool = Field(
        True, description="Close a study once its DWI and ADC/b0 look complete (content-aware)."
    )
    early_completion_grace_s: float = Field(
        2.0, gt=0, description="Content-aware completion waits this long after the last image."
    )
    incomplete_extra_wait_s: float = Field(
        20.0,
        ge=0,
        description="A study that still looks incomplete at the idle timeout (a hole in the DWI, "
        "an ADC or b0 with slices the DWI lacks) waits this much longer, once, before it is "
        "processed; intake then refuses what is still missing (0 = no extra wait).",
    )
    open_association_hold_s: float = Field(
        60.0,
        ge=0,
        description="A study is not closed while the association delivering it is still open and "
        "its latest image (of this study) came less than this long ago: a sender stalled "
        "mid-study under load would otherwise get half a study processed and the rest refused. "
        "A sender that keeps one association open for many studies holds each only until it "
        "moves on to the next (0 = close on idle time alone).",
    )
    stale_job_after_s: float = Field(
        900.0, gt=0, description="A running job older than this is re-queued on start."
    )


class RetentionSettings(_Section):
    """How long a finished study's files stay in the spool (the database keeps its history)."""

    delivered_days: float = Field(
        7.0, gt=0, description="Remove a study's images and results this long after its last job "
        "was delivered (and every Storage Commitment is settled).",
    )
    failed_days: float = Field(
        30.0, gt=0, description="Remove a study whose last job was refused or failed for good this "
        "long after it ended: longer, so an operator can look at what came in.",
    )
    sweep_every_s: float = Field(
        3600.0, ge=0, description="The SCP process sweeps this often (0 = only `strokeseg gc`)."
    )


ResultKind = Literal["SEG", "SR", "OVERLAY"]


class Destination(_Section):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    storage_commitment: bool = Field(
        False, description="Request Storage Commitment (N-ACTION) after C-STORE."
    )
    send: list[ResultKind] = Field(
        default_factory=lambda: list[ResultKind](("SEG", "SR")),
        description="Which result objects this destination receives.",
    )
    tls: DestinationTls = DestinationTls()


class ModelRoute(_Section):
    """Serve a vendor-specific (e.g. fine-tuned) model for one scanner manufacturer.

    The seeds' central finding is that a model loses Dice on another vendor's
    scanner and regains it after fine-tuning on that vendor: a site that has
    fine-tuned a model for its GE scanners routes GE studies to it here.
    """

    manufacturer: str = Field(
        min_length=1,
        description="Case-insensitive prefix of the DWI series' Manufacturer (0008,0070), "
        "e.g. 'GE' matches 'GE MEDICAL SYSTEMS'. The longest matching prefix wins.",
    )
    model_dir: Path = Field(description="Folder with model.onnx + model.yaml for this vendor.")


class WorkerSettings(_Section):
    queue: str = "gpu"
    concurrency: int = Field(1, ge=1)
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = library default.")
    lease_s: float = Field(
        60.0, ge=3.0,
        description="A worker's claim on a job lasts this long and is renewed every third of it; "
        "when it runs out (the worker died) the SCP's scheduler queues the job again.",
    )
    lost_dispatch_after_s: float = Field(
        90.0, gt=0,
        description="A queued job that no worker took this long after it was handed to the broker "
        "is handed over again (the message may be lost); workers' claims make a second copy harmless.",
    )


class WindowSettings(_Section):
    dwi: tuple[float, float] = Field(description="DWI window (low, high) in stored-value units")
    adc: tuple[float, float] = Field(description="ADC window (low, high) in 1e-6 mm2/s")


class PreprocessSettings(_Section):
    vendor_windows: dict[str, WindowSettings] = Field(
        default_factory=dict,
        description="Per-Manufacturer windows for the alis-window-v1 profile; key 'default' = fallback.",
    )

    def profile_options(self) -> ProfileOptions:
        def window(w: WindowSettings) -> VendorWindow:
            return VendorWindow(dwi=Window(*w.dwi), adc=Window(*w.adc))

        by_vendor = {k: window(v) for k, v in self.vendor_windows.items() if k.lower() != "default"}
        default = next(
            (window(v) for k, v in self.vendor_windows.items() if k.lower() == "default"), None
        )
        if default is None:
            return ProfileOptions(VendorWindows(by_manufacturer=by_vendor))
        return ProfileOptions(VendorWindows(by_manufacturer=by_vendor, default=default))


class MetricsSettings(_Section):
    host: str = Field(
        "127.0.0.1", description="Address /metrics listens on: localhost by default; 0.0.0.0 where "
        "Prometheus scrapes from another host or pod (then restrict it, e.g. a NetworkPolicy).",
    )
    scp_port: int = Field(0, ge=0, le=65535, description="Prometheus port of the SCP; 0 = off.")
    missing_result_after_s: float = Field(
        900.0, gt=0, description="strokeseg_missing_results counts studies received longer ago than "
        "this that have no final state yet (the missing-result watchdog).",
    )
    worker_port: int = Field(0, ge=0, le=65535, description="Prometheus port of a worker; 0 = off.")


class Settings(BaseSettings):
    """Everything a strokeseg process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="STROKESEG_", env_nested_delimiter="__", extra="forbid"
    )

    scp: ScpSettings = ScpSettings()
    study: StudySettings = StudySettings()
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliverySettings = DeliverySettings()
    retention: RetentionSettings = RetentionSettings()
    derive: DeriveSettings = DeriveSettings()
    assess: AssessSettings = AssessSettings()
    spool_dir: Path = Path("var/strokeseg")
    database_url: str = ""
    database_lock_timeout_s: float = Field(
        10.0, gt=0, description="A database statement waits at most this long for a lock (PostgreSQL: "
        "lock_timeout; statement_timeout is 3x): a locked database gets C-STORE a bounded 0xA700.",
    )
    broker_url: str = ""
    model_dir: Path = BUNDLED_MODEL_DIR
    model_routes: list[ModelRoute] = Field(
        default_factory=list,
        description="Per-manufacturer models; studies of other vendors use model_dir.",
    )
    worker: WorkerSettings = WorkerSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: str = "INFO"

    @property
    def overlay_enabled(self) -> bool:
        enabled = self.derive.overlay.enabled
        if enabled == "auto":
            return any("OVERLAY" in d.send for d in self.destinations)
        return bool(enabled)

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if self.derive.overlay.enabled is False and any("OVERLAY" in d.send for d in self.destinations):
            raise ValueError("a destination sends OVERLAY but derive.overlay.enabled is false")
        self.spool_dir = self.spool_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.spool_dir / 'strokeseg.sqlite'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.spool_dir / 'broker.sqlite'}"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(("sqla+sqlite", "filesystem", "memory"))


def load_settings(config_file: Path | str | None = None, **overrides: object) -> Settings:
    """Settings from ``config_file`` (or ``$STROKESEG_CONFIG``), the environment and overrides."""
    path = config_file or os.environ.get("STROKESEG_CONFIG") or None
    resolved = Path(path).expanduser().resolve() if path else None
    if resolved is not None and not resolved.is_file():
        raise ConfigError(f"config file not found: {resolved}")
    token = _config_file.set(resolved)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    finally:
        _config_file.reset(token)
