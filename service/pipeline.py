"""The one place that wires the stages: assemble -> preprocess -> infer -> derive -> deliver.

Used by the Celery task (:func:`run_job`) and by ``strokeseg segment``
(:func:`segment_files`), so the network path and the offline path are the
same code.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path

from pydicom import dcmread

from service import metrics
from service.assess import Assessment, AssessOptions, RestrictionLimits, ValidityLimits, assess
from service.backoff import backoff_delay_s
from service.commitment_reports import report_handlers
from service.config import AssessSettings, DeriveSettings, Destination, Settings
from service.db import Database, JobStore, JobSummary, validity_fields
from service.db.commitment import CommitmentStore
from service.db.models import utcnow
from service.deliver import StoreOutcome, record_store_attempt, store_objects
from service.deliver.commitment import CommitmentRequest, request_commitment
from service.derive import (
    AlgorithmInfo,
    DerivationSources,
    DeriveOptions,
    GridGeometry,
    LesionFindings,
    LesionMask,
    OverlayOptions,
    compute_lesion_findings,
    write_results,
)
from service.domain import (
    DiffusionStudy,
    DomainOfValidity,
    JobState,
    LesionSegmentation,
    ResultObject,
)
from service.errors import (
    DeliveryError,
    GeometryError,
    RetriableError,
    StudyRefused,
    as_strokeseg_error,
)
from service.inference import LoadedModel, ModelRouter, segment_lesion
from service.intake import load_study
from service.preprocess import HARMONISING_PROFILES, ProfileOptions, brain_mask
from service.storage import Spool, atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class StudyResult:
    study: DiffusionStudy
    segmentation: LesionSegmentation
    objects: list[ResultObject]
    inference_s: float
    validity: DomainOfValidity | None = None
    findings: LesionFindings | None = None


def algorithm_of(model: LoadedModel) -> AlgorithmInfo:
    return AlgorithmInfo(
        name=model.card.name,
        version=model.card.version,
        preprocessing_profile=model.card.preprocessing_profile,
    )


def assess_options(settings: AssessSettings, derive: DeriveSettings, model: LoadedModel) -> AssessOptions:
    """The assess stage's options from the config sections and the model's profile."""
    restriction = settings.restriction
    validity = settings.validity
    return AssessOptions(
        restriction=RestrictionLimits(
            max_mean_adc=restriction.max_mean_adc,
            max_relative_adc=restriction.max_relative_adc,
            min_mean_adc=restriction.min_mean_adc,
            enabled=restriction.enabled,
        ),
        validity=ValidityLimits(
            b_value_range=validity.b_value_range,
            slice_spacing_range_mm=validity.slice_spacing_range_mm,
            min_coverage_mm=validity.min_coverage_mm,
            min_snr=validity.min_snr,
            adc_median_range=validity.adc_median_range,
            max_lesion_brain_fraction=validity.max_lesion_brain_fraction,
            symmetric_min_ml=validity.symmetric_min_ml,
            symmetric_fraction=validity.symmetric_fraction,
        ),
        adc_core_threshold=derive.adc_core_threshold,
        harmonised=model.card.preprocessing_profile in HARMONISING_PROFILES,
    )


def segment_files(
    paths: Sequence[Path],
    model: LoadedModel | ModelRouter,
    out_dir: Path,
    options: ProfileOptions | None = None,
    derive: DeriveSettings | None = None,
    *,
    overlay: bool = False,
    previous_reports: Sequence[Path] = (),
    assess_settings: AssessSettings | None = None,
) -> StudyResult:
    """Segment one study's files and write SEG + SR (+ overlay) into ``out_dir``.

    ``model`` is one model, or a :class:`ModelRouter` that picks the model for
    the DWI series' Manufacturer (vendor-specific fine-tuned models).
    Raises :class:`StudyRefused` (with its reason) when the input is unusable.
    """
    derive = derive or DeriveSettings()
    study = load_study(paths)
    analysis = analyse_study(study, model, options, derive, assess_settings)
    model, assessment, findings = analysis.model, analysis.assessment, analysis.findings
    try:
        objects = write_results(
            DerivationSources.from_study(study),
            LesionMask.from_segmentation(assessment.segmentation),
            findings,
            algorithm_of(model),
            out_dir,
            DeriveOptions(
                core_volume_cutoffs_ml=derive.core_volume_cutoffs_ml,
                overlay=OverlayOptions(label=derive.overlay.label) if overlay else None,
                previous_reports=previous_reports,
            ),
        )
    except ValueError as exc:  # highdicom/derive refuse sources they cannot reference
        raise GeometryError(f"cannot encode the result on these source images: {exc}") from exc
    return StudyResult(
        study, assessment.segmentation, objects, analysis.inference_s, assessment.validity, findings
    )


@dataclass(frozen=True, slots=True, eq=False)
class StudyAnalysis:
    """What the pipeline concluded about one study before anything is written."""

    model: LoadedModel
    network: LesionSegmentation  # the network's mask, before the guard
    assessment: Assessment  # the guarded mask, the mimics and the domain of validity
    findings: LesionFindings  # what the SR reports
    inference_s: float


def analyse_study(
    study: DiffusionStudy,
    model: LoadedModel | ModelRouter,
    options: ProfileOptions | None = None,
    derive: DeriveSettings | None = None,
    assess_settings: AssessSettings | None = None,
) -> StudyAnalysis:
    """Segment and assess one loaded study: the numbers the SR will carry, nothing written.

    Split from :func:`segment_files` so that experiments on a study changed in memory (another
    b-value, say) measure exactly what the service would report.
    Raises :class:`GeometryError` when the findings cannot be placed on the source grid.
    """
    derive = derive or DeriveSettings()
    if isinstance(model, ModelRouter):
        model = model.select(study.manufacturer)
    started = time.perf_counter()
    network = segment_lesion(study, model, options)
    inference_s = time.perf_counter() - started
    metrics.INFERENCE_SECONDS.labels(model=model.card.name, provider=model.provider).observe(
        inference_s
    )
    with metrics.stage("assess"):
        assessment = assess(
            study, network, brain_mask(study.dwi),
            assess_options(assess_settings or AssessSettings(), derive, model),
        )
        try:
            findings = _findings(study, assessment, derive)
        except ValueError as exc:
            raise GeometryError(f"cannot encode the result on these source images: {exc}") from exc
    return StudyAnalysis(model, network, assessment, findings, inference_s)


def _findings(study: DiffusionStudy, assessment: Assessment, derive: DeriveSettings) -> LesionFindings:
    """The lesion findings the SR reports (count, per-lesion numbers, ADC core, quality)."""
    segmentation = assessment.segmentation
    return compute_lesion_findings(
        segmentation.mask,
        segmentation.probability,
        study.adc.voxels,
        assessment.brain_mask,
        GridGeometry.from_volume(study.dwi),
        input_quality="; ".join(study.notes),
        adc_core_threshold=assessment.validity.adc_core_threshold,
        core_min_cluster_ml=derive.core_min_cluster_ml,
        mimics=assessment.mimics,
        validity=assessment.validity,
        core_region=segmentation.mask if derive.core_scope == "lesion" else None,
    )


def model_router(settings: Settings) -> ModelRouter:
    """The :class:`ModelRouter` described by ``model_dir`` and ``model_routes``."""
    return ModelRouter.of(
        settings.model_dir,
        [(route.manufacturer, route.model_dir) for route in settings.model_routes],
        intra_op_threads=settings.worker.intra_op_threads,
    )


@dataclass
class WorkerContext:
    """What a worker process holds: settings, DB, spool and the warm model."""

    settings: Settings
    db: Database
    store: JobStore
    spool: Spool
    commitments: CommitmentStore
    #: Who holds a job's lease while this process runs it (host, pid, and a random part).
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        db = Database(settings.database_url, lock_timeout_s=settings.database_lock_timeout_s)
        return cls(
            settings=settings,
            db=db,
            store=JobStore(db),
            spool=Spool(settings.spool_dir),
            commitments=CommitmentStore(db),
        )

    @cached_property
    def router(self) -> ModelRouter:
        """Vendor -> model routing from the settings; models load once per process."""
        return model_router(self.settings)


def _deliver(ctx: WorkerContext, job_id: int, objects: list[ResultObject]) -> list[str]:
    """Send to every destination; returns the list of problems (empty = all stored)."""
    problems: list[str] = []
    for destination in ctx.settings.destinations:
        already = ctx.store.stored_at(job_id, destination.name)
        wanted = [obj for obj in objects if obj.kind in destination.send and obj.sop_instance_uid not in already]
        if not wanted:
            log.info("job %d: destination %s already stored every result; not sent again",
                     job_id, destination.name, extra={"job_id": job_id})
            continue
        try:
            outcomes: list[StoreOutcome] = store_objects(
                destination, wanted, calling_ae_title=ctx.settings.scp.ae_title
            )
        except DeliveryError as exc:
            problems.append(str(exc))
            record_store_attempt(ctx.store, job_id, destination.name, wanted, None, error=str(exc))
            continue
        record_store_attempt(ctx.store, job_id, destination.name, wanted, outcomes)
        if all(o.stored for o in outcomes):
            _observe_result_latency(ctx, job_id, destination.name)
        problems += [
            f"destination {destination.name}: {o.obj.kind} not stored ({o.detail})"
            for o in outcomes
            if not o.stored
        ]
        stored = [o.obj for o in outcomes if o.stored]
        if stored and destination.storage_commitment:
            _request_commitment(ctx, job_id, destination, stored)
    return problems


def _observe_result_latency(ctx: WorkerContext, job_id: int, destination: str) -> None:
    """Last image received -> results stored at ``destination`` (the clinical latency)."""
    summary = ctx.store.job(job_id)
    received = ctx.store.last_received_at(summary.study_instance_uid) if summary else None
    if received is not None:
        metrics.RESULT_LATENCY_SECONDS.labels(destination=destination).observe(
            max(0.0, (utcnow() - received).total_seconds()))


def _request_commitment(
    ctx: WorkerContext, job_id: int, destination: Destination, objects: list[ResultObject]
) -> None:
    """N-ACTION for the stored objects; the report is recorded by the SCP's handler.

    The transaction is in the DB before the request goes out, because the
    PACS may report on another association before our N-ACTION returns.  A
    missing report is flagged later by the assembler (commitment_timeout_s).
    """
    request = CommitmentRequest.for_objects(objects)
    calling = ctx.settings.scp.ae_title
    ctx.commitments.record_request(
        request.transaction_uid,
        request.references,
        destination=destination.name,
        destination_ae_title=destination.ae_title,
        calling_ae_title=calling,
        job_id=job_id,
    )
    action = request_commitment(
        destination,
        request,
        calling_ae_title=calling,
        evt_handlers=report_handlers(ctx.commitments),
        wait_for_report_s=5.0,
        report_arrived=lambda: ctx.commitments.is_reported(request.transaction_uid),
    )
    ctx.commitments.record_action(
        request.transaction_uid,
        status_code=action.status_code,
        accepted=action.accepted,
        detail=action.detail,
    )
    metrics.COMMITMENT_REQUESTS.labels(
        destination=destination.name, accepted=str(action.accepted).lower()
    ).inc()


#: Written (atomically) into a job's result folder once every result object is on disk.
RESULTS_COMPLETE = "results.complete"


def _mark_results_complete(result_dir: Path, objects: Sequence[ResultObject]) -> None:
    atomic_write(result_dir / RESULTS_COMPLETE,
                 "".join(f"{obj.kind} {obj.path.name}\n" for obj in objects).encode())


def _existing_results(result_dir: Path) -> list[ResultObject]:
    """Result objects a previous attempt of this job wrote completely (SEG, SR, overlays).

    Only a set that was finished counts (its ``results.complete`` list): an attempt that
    died between writing the SEG and the SR must not have its SEG sent alone. Its files
    are removed and the results written again. A folder from before the list existed
    counts when it holds both a SEG and an SR.
    """
    marker = result_dir / RESULTS_COMPLETE
    if marker.is_file():
        listed = [line.split(" ", 1) for line in marker.read_text().splitlines() if line.strip()]
        return [ResultObject.of(kind, result_dir / name, dcmread(result_dir / name, stop_before_pixels=True))
                for kind, name in listed]
    found = {kind: sorted(result_dir.glob(f"{kind}_*.dcm")) for kind in ("SEG", "SR", "OVERLAY")}
    if found["SEG"] and found["SR"]:
        return [ResultObject.of(kind, path, dcmread(path, stop_before_pixels=True))
                for kind, paths in found.items() for path in paths]
    for path in (*found["SEG"], *found["SR"], *found["OVERLAY"]):
        log.warning("discarding %s: its attempt did not finish writing the results", path.name)
        path.unlink(missing_ok=True)
    return []


def _finish(ctx: WorkerContext, job_id: int, state: JobState, reason: str = "",
            fields: dict[str, object] | None = None) -> JobState | None:
    """Record the job's end, only while this worker still holds its lease."""
    if not ctx.store.transition(job_id, state, reason, fields=fields, expect=(JobState.RUNNING,),
                                lease_owner=ctx.worker_id):
        log.warning("job %d: this worker no longer holds its lease (another worker took it over); "
                    "its outcome %s is not recorded", job_id, state.value, extra={"job_id": job_id})
        return None
    retrying = state is JobState.FAILED and (fields or {}).get("next_attempt_at") is not None
    metrics.JOBS_FINISHED.labels(state="retrying" if retrying else state.value).inc()
    return state


class LeaseKeeper:
    """Renews a worker's lease on its job every third of the lease, until the job ends.

    Without it a job whose worker died would stay ``running`` until someone restarted
    the SCP; with it the SCP's scheduler sees the lease run out and queues the job again.
    A database hiccup costs one renewal, not the lease: two more tries remain before it
    expires.
    """

    def __init__(self, store: JobStore, job_id: int, owner: str, lease_s: float) -> None:
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-job-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        extra = {"job_id": self.job_id}
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.owner, self.lease_s):
                    self.lost = True
                    log.error("job %d: lease lost (the job was queued again)", self.job_id, extra=extra)
                    return
            except Exception as exc:
                log.warning("job %d: could not renew the lease (%s); trying again",
                            self.job_id, type(exc).__name__, extra=extra)


def _next_attempt(ctx: WorkerContext, summary: JobSummary) -> datetime | None:
    """Exponential backoff (initial, doubling, capped) while the job is younger than max age."""
    policy = ctx.settings.delivery
    now = utcnow()
    if (now - summary.created_at).total_seconds() >= policy.retry_max_age_s:
        return None
    delay = backoff_delay_s(
        summary.attempts, initial_s=policy.retry_initial_s, max_interval_s=policy.retry_max_interval_s
    )
    return now + timedelta(seconds=delay)


def _retry_later(ctx: WorkerContext, summary: JobSummary, reason: str) -> tuple[str, dict[str, object]]:
    """The reason and job fields of a failure that an automatic retry (with backoff) may cure."""
    next_attempt = _next_attempt(ctx, summary)
    if next_attempt is None:
        return reason + "; no more automatic retries (delivery.retry_max_age_s); use `strokeseg retry`", {}
    return (reason + f"; automatic retry at {next_attempt.isoformat(timespec='seconds')} UTC",
            {"next_attempt_at": next_attempt})


def hold_reason(job_id: int, validity: DomainOfValidity) -> str:
    """Why a job is held, and what the operator can do about it (``strokeseg jobs`` shows it)."""
    return (
        f"held: outside validated range ({'; '.join(validity.reasons)}); "
        f"release with `strokeseg release {job_id}`"
    )


def run_job(ctx: WorkerContext, job_id: int) -> JobState | None:
    """Process one queued job to a final state; None if another worker has it.

    A job that already produced its SEG and SR (and then failed to deliver)
    re-sends those same objects, so a retry never creates a second version of
    one result in PACS.

    With ``assess.outside_range_policy: hold`` a result outside the model's
    validated range is written to the spool but not sent: the job ends
    ``held`` with the reasons, and ``strokeseg release`` queues it again; the
    released attempt (``released_at`` set) delivers the results already
    written, flagged in the SR and overlay as outside the validated range.
    """
    extra = {"job_id": job_id}
    lease_s = ctx.settings.worker.lease_s
    if not ctx.store.claim(job_id, ctx.worker_id, lease_s):
        log.info("job %d is not queued (taken by a live worker, or finished); skipping", job_id, extra=extra)
        return None
    started = time.perf_counter()
    with LeaseKeeper(ctx.store, job_id, ctx.worker_id, lease_s), metrics.collect_stages() as stages:
        state = _run_claimed(ctx, job_id)
    log.info("job %d: %.2f s from claim to %s (%s)", job_id, time.perf_counter() - started,
             state.value if state else "not recorded",
             ", ".join(f"{name} {seconds:.3f} s" for name, seconds in stages.items()), extra=extra)
    return state


def _run_claimed(ctx: WorkerContext, job_id: int) -> JobState | None:
    """The body of :func:`run_job` once this worker holds the job's lease."""
    extra = {"job_id": job_id}
    started = time.perf_counter()
    summary = ctx.store.job(job_id)
    assert summary is not None  # claimed above
    result_dir = ctx.spool.result_dir(job_id)
    fields: dict[str, object] = {"result_dir": str(result_dir)}
    held: DomainOfValidity | None = None
    try:
        objects, held = _produce_results(ctx, summary, result_dir, fields)
    except StudyRefused as exc:
        log.warning("job %d refused: %s", job_id, exc.reason, extra=extra)
        metrics.REFUSALS.labels(kind=type(exc).__name__).inc()
        return _finish(ctx, job_id, JobState.REFUSED, exc.reason)
    except Exception as exc:
        known = as_strokeseg_error(exc)
        if isinstance(known, RetriableError):
            log.warning("job %d: temporary failure during processing: %s", job_id, known, extra=extra)
            reason, retry_fields = _retry_later(ctx, summary, f"temporary failure: {known}")
            return _finish(ctx, job_id, JobState.FAILED, reason, {**fields, **retry_fields})
        log.exception("job %d failed during processing", job_id, extra=extra)
        return _finish(ctx, job_id, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        metrics.JOB_SECONDS.observe(time.perf_counter() - started)

    if held is not None:
        reason = hold_reason(job_id, held)
        log.warning("job %d %s", job_id, reason, extra=extra)
        return _finish(ctx, job_id, JobState.HELD, reason, fields)
    if not ctx.settings.destinations:
        reason = "no destinations configured; results kept in the spool"
        log.warning("job %d: %s", job_id, reason, extra=extra)
        return _finish(ctx, job_id, JobState.DELIVERED, reason, fields)
    with metrics.stage("deliver"):
        problems = _deliver(ctx, job_id, objects)
    if problems:
        reason, retry_fields = _retry_later(ctx, summary, "delivery failed: " + "; ".join(problems))
        log.warning("job %d %s", job_id, reason, extra=extra)
        return _finish(ctx, job_id, JobState.FAILED, reason, {**fields, **retry_fields})
    state = _finish(ctx, job_id, JobState.DELIVERED, "", fields)
    if state is None:
        return None
    for older in ctx.store.supersede(job_id):
        log.info("job %d: result superseded by job %d", older, job_id, extra=extra)
    return state


def _produce_results(
    ctx: WorkerContext, summary: JobSummary, result_dir: Path, fields: dict[str, object]
) -> tuple[list[ResultObject], DomainOfValidity | None]:
    """The job's result objects: those a previous attempt completed, or new ones.

    Adds what the job row records (volume, model, validity) to ``fields``; returns the
    validity too when the site policy holds this result back.
    """
    job_id, extra = summary.id, {"job_id": summary.id}
    objects = _existing_results(result_dir)
    if objects:
        log.info("job %d: re-delivering the results of its previous attempt", job_id, extra=extra)
        return objects, None
    paths = [Path(p) for p in ctx.store.instance_paths(summary.study_instance_uid)]
    previous = ctx.store.previous_result(job_id)
    previous_reports = (
        sorted(Path(previous.result_dir).glob("SR_*.dcm")) if previous and previous.result_dir else []
    )
    result = segment_files(
        paths,
        ctx.router,
        result_dir,
        ctx.settings.preprocess.profile_options(),
        ctx.settings.derive,
        overlay=ctx.settings.overlay_enabled,
        previous_reports=previous_reports,
        assess_settings=ctx.settings.assess,
    )
    _mark_results_complete(result_dir, result.objects)
    fields.update(
        lesion_volume_ml=result.segmentation.lesion_volume_ml,
        model_name=result.segmentation.model_name,
        model_version=result.segmentation.model_version,
    )
    held = None
    if result.validity is not None:
        fields.update(validity_fields(result.validity.status, result.validity.reasons))
        if (
            not result.validity.within
            and ctx.settings.assess.outside_range_policy == "hold"
            and summary.released_at is None
        ):
            held = result.validity
    log.info(
        "job %d: lesion volume %.2f mL (inference %.2f s)",
        job_id, result.segmentation.lesion_volume_ml, result.inference_s, extra=extra,
    )
    return result.objects, held
