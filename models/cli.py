"""``strokeseg train | finetune | export | evaluate``: the model life cycle on the command line.

These commands need the ``train`` extra (PyTorch, onnx, matplotlib); the
service itself does not, so nothing here imports torch until a command runs,
and a missing extra is reported plainly instead of with a traceback.

Data are *case folders*: ``CASE/dicom/*.dcm`` (the study as the scanner sent
it: DWI with b0/b-high and ADC, any vendor convention the service accepts)
and ``CASE/truth/mask.npy`` (the lesion mask on the DWI grid, slices ascending
along the slice normal; see docs/training-data.md).  A DATA argument is a case
folder or a folder of case folders.  ``strokeseg phantom --domain A`` writes
such folders from the phantom generator.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from models.training.dataset import CaseArrays
    from service.preprocess import ModelGrid

log = logging.getLogger("strokeseg")

DataArgument = Annotated[
    list[Path],
    typer.Argument(
        exists=True, file_okay=False,
        help="Case folders (CASE/dicom/ + CASE/truth/mask.npy or mask.nii.gz), or folders of them.",
    ),
]


def find_cases(paths: list[Path]) -> list[Path]:
    """Every case folder under ``paths``; a bad path is a usage error."""
    from models.casefolder import find_cases as find

    try:
        return find(paths)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _need_training_extra() -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        typer.echo(
            f"error: this command needs the training extra ({exc.name} is missing): "
            "pip install 'strokeseg[train]'",
            err=True,
        )
        raise typer.Exit(2) from exc


def _command_line() -> str:
    return "strokeseg " + shlex.join(sys.argv[1:])


def _load_arrays(
    cases: list[Path], grid: ModelGrid, profile: str, cache_dir: Path | None
) -> CaseArrays:
    from models.training.dataset import load_case_arrays

    typer.echo(f"reading {len(cases)} studies through service intake + preprocessing ({profile})")
    return load_case_arrays(cases, grid, profile, cache_dir=cache_dir)


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("models").setLevel(logging.INFO)


def train(
    data: DataArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: best.pt, last.pt, training.json.")],
    architecture: Annotated[str, typer.Option("--arch", help="unet2d (bundled CPU model), res-convlstm (Alis 2020) or preact3d (Noh 2023).")] = "unet2d",
    width: Annotated[int, typer.Option(min=2, help="Channels at full resolution (doubles per level).")] = 8,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    lr: Annotated[float, typer.Option(help="Adam learning rate (peak; warm-up then cosine decay).")] = 2e-3,
    batch_size: Annotated[int, typer.Option(min=2, help="Slices per step (unet2d).")] = 16,
    slab: Annotated[int, typer.Option(min=2, help="Neighbouring slices per step (sequence models).")] = 8,
    crop: Annotated[int, typer.Option(help="Training crop in pixels (multiple of 16).")] = 96,
    seed: Annotated[int, typer.Option(help="Seed: same data + seed + threads = same model.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Last fraction of the studies of each DATA folder held out for validation.")] = 0.1,
    val_data: Annotated[list[Path] | None, typer.Option(help="Validation case folders instead of --val-fraction.")] = None,
    tversky_alpha: Annotated[float, typer.Option(help="Tversky weight of false positives.")] = 0.5,
    tversky_beta: Annotated[float, typer.Option(help="Tversky weight of false negatives.")] = 0.5,
    bce_weight: Annotated[float, typer.Option(help="Weight of the BCE term added to Tversky (0 = Tversky only).")] = 1.0,
    per_slice_dice_weight: Annotated[float, typer.Option(help="Weight of a soft Dice per lesion slice, so small lesions weigh as much as large ones (0 = off).")] = 0.0,
    patience: Annotated[int, typer.Option(min=1, help="Early stop after this many epochs without validation gain.")] = 8,
    min_steps_per_epoch: Annotated[int, typer.Option(min=1, help="At least this many steps per epoch (small data sets).")] = 20,
    augment: Annotated[bool, typer.Option(help="Rotation, elastic, flip, bias field, gamma on the fly.")] = True,
    profile: Annotated[str, typer.Option(help="Preprocessing profile (service.preprocess).")] = "dwi-median-adc-fixed-v1",
    matrix: Annotated[int, typer.Option(help="Model grid matrix (square).")] = 128,
    spacing: Annotated[float, typer.Option(help="Model grid pixel spacing, mm.")] = 1.8,
    max_cases: Annotated[int | None, typer.Option(help="Use only the first N training studies (training-size curves).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 2,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of preprocessed arrays (default: var/model-input-cache).")] = Path("var/model-input-cache"),
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt when it exists.")] = True,
    progress: Annotated[bool, typer.Option(help="Progress bar per epoch.")] = True,
) -> None:
    """Train a lesion segmentation network (Tversky loss, Adam, validation Dice per epoch, best checkpoint, early stopping)."""
    _need_training_extra()
    _logging()
    _fit(
        data, out, None, architecture=architecture, width=width, epochs=epochs, lr=lr,
        warmup_fraction=0.05, batch_size=batch_size, slab=slab, crop=crop, seed=seed,
        val_fraction=val_fraction, val_data=val_data, tversky_alpha=tversky_alpha,
        tversky_beta=tversky_beta, bce_weight=bce_weight, per_slice_dice_weight=per_slice_dice_weight,
        patience=patience, augment=augment,
        min_steps_per_epoch=min_steps_per_epoch,
        profile=profile, matrix=matrix, spacing=spacing, max_cases=max_cases, threads=threads,
        cache_dir=cache_dir, resume=resume, progress=progress,
    )


def finetune(
    data: DataArgument,
    from_checkpoint: Annotated[Path, typer.Option("--from", exists=True, dir_okay=False, help="Checkpoint to adapt (best.pt of a training run).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder for the fine-tuned model.")],
    cases: Annotated[int | None, typer.Option(help="Use only the first N target-domain studies (Noh: 50-1000; Alis: ~10 % of the source set).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate, lower than training (Alis: 1e-6 at their scale).")] = 3e-4,
    batch_size: Annotated[int, typer.Option(min=2)] = 16,
    slab: Annotated[int, typer.Option(min=2)] = 8,
    crop: Annotated[int, typer.Option()] = 96,
    seed: Annotated[int, typer.Option()] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    val_data: Annotated[list[Path] | None, typer.Option(help="Validation case folders instead of --val-fraction.")] = None,
    patience: Annotated[int, typer.Option(min=1)] = 8,
    min_steps_per_epoch: Annotated[int, typer.Option(min=1)] = 20,
    per_slice_dice_weight: Annotated[float | None, typer.Option(help="Weight of the per-lesion-slice soft Dice during fine-tuning (default: the checkpoint's own).")] = None,
    tversky_alpha: Annotated[float | None, typer.Option(help="Tversky weight of false positives during fine-tuning (default: the checkpoint's own).")] = None,
    tversky_beta: Annotated[float | None, typer.Option(help="Tversky weight of false negatives during fine-tuning (default: the checkpoint's own; Alis 2020: 0.7 with alpha 0.3).")] = None,
    augment: Annotated[bool, typer.Option()] = True,
    threads: Annotated[int, typer.Option(min=1)] = 2,
    cache_dir: Annotated[Path | None, typer.Option()] = Path("var/model-input-cache"),
    resume: Annotated[bool, typer.Option()] = True,
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Fine-tune a trained model on a few target-domain (e.g. another vendor's) studies."""
    _need_training_extra()
    _logging()
    import torch

    record = torch.load(from_checkpoint, map_location="cpu", weights_only=False)
    settings = record.get("settings", {})
    meta = record.get("meta", {})
    _fit(
        data, out, from_checkpoint, architecture=record.get("architecture", "unet2d"),
        width=int(settings.get("width", 8)), epochs=epochs, lr=lr, warmup_fraction=0.0,
        batch_size=batch_size, slab=slab, crop=crop, seed=seed, val_fraction=val_fraction,
        val_data=val_data,
        tversky_alpha=float(settings.get("tversky_alpha", 0.5)) if tversky_alpha is None else tversky_alpha,
        tversky_beta=float(settings.get("tversky_beta", 0.5)) if tversky_beta is None else tversky_beta,
        bce_weight=float(settings.get("bce_weight", 1.0)),
        per_slice_dice_weight=(
            float(settings.get("per_slice_dice_weight", 0.0)) if per_slice_dice_weight is None else per_slice_dice_weight
        ),
        patience=patience, augment=augment,
        min_steps_per_epoch=min_steps_per_epoch,
        profile=str(meta.get("preprocessing_profile", "dwi-median-adc-fixed-v1")),
        matrix=int(meta.get("grid", {}).get("matrix", [128])[0]),
        spacing=float(meta.get("grid", {}).get("pixel_spacing_mm", [1.8])[0]),
        max_cases=cases, threads=threads, cache_dir=cache_dir, resume=resume, progress=progress,
    )


def _fit(
    data: list[Path],
    out: Path,
    init_checkpoint: Path | None,
    *,
    val_fraction: float,
    val_data: list[Path] | None,
    profile: str,
    matrix: int,
    spacing: float,
    max_cases: int | None,
    cache_dir: Path | None,
    resume: bool,
    progress: bool,
    **settings: Any,
) -> None:
    from models.training.trainer import TrainSettings, fit
    from service.preprocess import PROFILES, ModelGrid

    if profile not in PROFILES:
        raise typer.BadParameter(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    try:
        train_settings = TrainSettings(**settings)
    except TypeError as exc:
        raise typer.BadParameter(str(exc)) from exc
    val_cases_dirs = find_cases(val_data) if val_data else []
    cases = []
    for folder in data:  # hold out the last fraction of *each* DATA argument (each vendor)
        found = find_cases([folder])
        n_val = max(1, round(val_fraction * len(found))) if val_fraction > 0 and not val_data else 0
        if n_val >= len(found):
            raise typer.BadParameter(f"{folder}: {len(found)} studies leave none for training after validation")
        cases += found[: len(found) - n_val]
        val_cases_dirs += found[len(found) - n_val :]
    if max_cases is not None:
        cases = cases[:max_cases]
    if not val_cases_dirs:
        raise typer.BadParameter("no validation studies: give --val-data or --val-fraction > 0")
    grid = ModelGrid(matrix=(matrix, matrix), pixel_spacing_mm=(spacing, spacing))
    arrays = _load_arrays(cases + val_cases_dirs, grid, profile, cache_dir)
    train_idx = list(range(len(cases)))
    val_idx = list(range(len(cases), len(cases) + len(val_cases_dirs)))
    meta = {
        "command": _command_line(),
        "mode": "finetune" if init_checkpoint else "train",
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "training_studies": [str(p) for p in cases],
        "validation_studies": [str(p) for p in val_cases_dirs],
        "training_domains": sorted(_domains(cases)),
        "grid": {"matrix": [matrix, matrix], "pixel_spacing_mm": [spacing, spacing]},
        "preprocessing_profile": profile,
    }
    try:
        fit(
            arrays, train_idx, val_idx, out, train_settings, init_checkpoint=init_checkpoint,
            resume=resume, meta=meta, progress=progress,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _domains(cases: list[Path]) -> set[str]:
    """Vendor/domain names recorded in the cases' truth.json (phantoms); empty if none."""
    found: set[str] = set()
    for case in cases:
        truth = case / "truth" / "truth.json"
        if truth.is_file():
            record = json.loads(truth.read_text())
            name = record.get("domain") or record.get("manufacturer")
            if name:
                found.add(str(name))
    return found


def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="best.pt of a training or fine-tuning run.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder: model.onnx, model.yaml, SHA256SUMS.")],
    name: Annotated[str, typer.Option(help="Model name on the card (and in the SR).")] = "unet2d-realanat",
    version: Annotated[str, typer.Option(help="Model version on the card.")] = "0.1.0",
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    min_component_peak: Annotated[float, typer.Option(min=0.0, max=0.99, help="Keep a predicted component only if its peak probability reaches this (0 = all; choose it with models.experiments.component_rules on calibration data).")] = 0.0,
    metrics: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="JSON of measured metrics for the card (e.g. from evaluate).")] = None,
    training_data: Annotated[str | None, typer.Option(help="Card text describing the training data.")] = None,
    reproduce: Annotated[str | None, typer.Option(help="Card text: the commands that reproduce this model.")] = None,
    include_checkpoint: Annotated[bool, typer.Option(help="Ship the PyTorch checkpoint in the bundle (checkpoint.pt) so sites can fine-tune it.")] = False,
    report: Annotated[list[Path] | None, typer.Option(exists=True, dir_okay=False, help="report.json of `strokeseg evaluate` runs of this model: their summaries go on the card (repeatable).")] = None,
    test_time_augmentation: Annotated[list[str] | None, typer.Option("--test-time-augmentation", help="Serve the network with this test-time augmentation (repeatable): flip_columns = mean of the slices and their left-right mirror. Evaluate the bundle after export: the card's figures must be measured with it.")] = None,
    profile: Annotated[str | None, typer.Option(help="Serve with this preprocessing profile instead of the checkpoint's: only one that gives the training studies the same input (b1000eq-...-v2 -> v3 when every training study is b~1000). Evaluate the bundle after export.")] = None,
) -> None:
    """Export a checkpoint to ONNX (dynamic slice count; parity with PyTorch checked) as a model bundle."""
    _need_training_extra()
    _logging()
    from service.inference.card import TEST_TIME_AUGMENTATIONS

    unknown = sorted(set(test_time_augmentation or ()) - set(TEST_TIME_AUGMENTATIONS))
    if unknown:
        typer.echo(f"error: unknown test-time augmentation {', '.join(unknown)} "
                   f"(known: {', '.join(TEST_TIME_AUGMENTATIONS)})", err=True)
        raise typer.Exit(2)
    from models.export import write_bundle
    from models.training.trainer import load_checkpoint
    from service.preprocess import PROFILES

    if profile is not None and profile not in PROFILES:
        typer.echo(f"error: unknown preprocessing profile {profile!r} (known: {', '.join(sorted(PROFILES))})", err=True)
        raise typer.Exit(2)
    net, record = load_checkpoint(checkpoint)
    training_json = checkpoint.parent / "training.json"
    training = json.loads(training_json.read_text()) if training_json.is_file() else {}
    measured: dict[str, Any] | None = json.loads(metrics.read_text()) if metrics else None
    if report:
        measured = {**(measured or {}), "evaluation": {
            path.parent.name: card_summary(json.loads(path.read_text())) for path in report
        }}
    try:
        write_bundle(
            net, out, name=name, version=version, record=record, training=training,
            metrics=measured, threshold=threshold, min_component_peak=min_component_peak,
            training_data=training_data,
            reproduce=reproduce or " && ".join(
                [str(record.get("meta", {}).get("command", "")), _command_line()]
            ),
            checkpoint=checkpoint if include_checkpoint else None,
            test_time_augmentation=tuple(test_time_augmentation or ()),
            profile=profile,
        )
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {out}")


def card_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The model-card digest of one ``strokeseg evaluate`` report (overall figures)."""
    overall = report["summary"]["overall"]
    agreement = overall.get("bland_altman") or {}

    def r(value: Any, digits: int) -> Any:
        return round(float(value), digits) if isinstance(value, int | float) else value

    return {
        "data": report.get("context", {}).get("command", ""),
        "studies": overall.get("n"),
        "studies_with_lesion": overall.get("n_with_lesion"),
        "dice_median": r(overall.get("dice_median"), 3),
        "dice_iqr": [r(overall.get("dice_q1"), 3), r(overall.get("dice_q3"), 3)],
        "abs_volume_error_ml_median": r(overall.get("abs_volume_difference_ml_median"), 2),
        "lesion_f1_pooled": r(overall.get("lesion_f1_pooled"), 3),
        "false_positive_lesions": overall.get("lesion_fp"),
        "volume_bias_ml": r(agreement.get("bias"), 2),
        "volume_loa_ml": [r(agreement.get("loa_low"), 2), r(agreement.get("loa_high"), 2)],
        "false_positive_ml_lesion_free_max": r(overall.get("false_positive_ml_lesion_free_max"), 2),
    }


def evaluate(
    data: DataArgument,
    model: Annotated[Path, typer.Option("--model", "-m", exists=True, file_okay=False, help="Model bundle folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.json, report.md, bland_altman.png.")],
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    compare_to: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Another report.json on the same or other studies: Wilcoxon (paired, same cases) or Mann-Whitney U on Dice.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0 = default).")] = 0,
) -> None:
    """Evaluate a bundle on case folders: Dice, sensitivity, precision, lesion F1, volume error, by volume class and vendor."""
    _logging()
    from models.evaluation.report import write_report
    from models.evaluation.runner import CaseFailure, evaluate_case_dirs

    cases = find_cases(data)
    failures: list[CaseFailure] = []
    results = evaluate_case_dirs(model, cases, threads=threads, failures=failures)
    comparisons: dict[str, tuple[list[float], list[float], str]] = {}
    if compare_to is not None:
        other = json.loads(compare_to.read_text())
        other_dice = {row["case"]: row["dice"] for row in other.get("cases", [])}
        mine = {r.case: r.dice for r in results}
        shared = sorted(set(other_dice) & set(mine))
        label = f"Dice: {model} vs {compare_to.parent}"
        if len(shared) == len(mine) == len(other_dice):
            comparisons[label] = ([mine[c] for c in shared], [other_dice[c] for c in shared], "wilcoxon")
        else:
            comparisons[label] = (list(mine.values()), list(other_dice.values()), "mann-whitney")
    report = write_report(
        results, out, title=title or f"Evaluation of {model}",
        comparisons=comparisons or None,
        context={
            "model": str(model),
            "command": _command_line(),
            "failures": [f"{f.case} ({f.stage}): {f.reason}" for f in failures],
        },
    )
    overall = report["summary"]["overall"]

    def fmt(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    typer.echo(
        f"{len(results)} studies: median Dice {fmt(overall.get('dice_median'), 3)}, "
        f"median |volume error| {fmt(overall.get('abs_volume_difference_ml_median'), 2)} mL; "
        f"report in {out}"
    )
    for failure in failures:
        typer.echo(f"failed\t{failure.case}\t{failure.stage}\t{failure.reason}", err=True)
    raise typer.Exit(1 if failures else 0)


def insert(
    sources: Annotated[
        list[Path],
        typer.Argument(exists=True, file_okay=False,
                       help="Folders of real diffusion studies of healthy subjects (one study each, "
                       "DICOM as the scanner wrote it: MOSAIC, classic or Enhanced MR)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the case folders into.")],
    cases: Annotated[int, typer.Option(min=1, help="Case folders per source study.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed (same source + seed, same cases).")] = 0,
    subject: Annotated[str, typer.Option(help="Subject label stored in truth.json (split train/validation by it: several scans of one person are one subject).")] = "",
    none_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of cases left without a lesion.")] = 0.1,
) -> None:
    """Insert simulated acute infarcts into real healthy studies: real anatomy, noise and artefacts, known truth.

    Each lesion is drawn in a vascular territory (MCA, ACA, PCA, lacunar, brainstem,
    cerebellar, multiple emboli) on the MNI152 anatomy registered to the subject, and kept to
    the subject's own tissue (its brain mask and the tissue share of its ADC); inside it
    the ADC falls to 0.25-0.6 x 1e-3 mm2/s and T2 rises 5-30 %, with partial volume at the
    edges. Every b0, directional, trace and ADC image is edited in its own pixel values and
    DICOM convention (the change is added; the scan's noise is kept), with new UIDs, so the
    cases go through the real intake. Writes CASE/dicom + CASE/truth/mask.npy + truth.json.
    """
    from models.synth.insert import insert_cases

    _logging()
    written = 0
    for i, source in enumerate(sources):
        label = subject or source.name
        typer.echo(f"[{i + 1}/{len(sources)}] {source}: {cases} cases as subject {label!r}")
        try:
            paths = insert_cases(source, out, cases, seed + 1000 * i, subject=label,
                                 none_fraction=none_fraction)
        except Exception as exc:  # one unusable source must not stop the others
            from service.errors import StudyRefused

            reason = exc.reason if isinstance(exc, StudyRefused) else f"{type(exc).__name__}: {exc}"
            typer.echo(f"error: {source}: {reason}", err=True)
            raise typer.Exit(1) from exc
        written += len(paths)
    typer.echo(f"{written} case folders in {out}")


def register(app: typer.Typer) -> None:
    """Add the model commands to the ``strokeseg`` app."""
    app.command()(insert)
    app.command()(train)
    app.command()(finetune)
    app.command()(export)
    app.command()(evaluate)
