"""Training, fine-tuning, export and evaluation through the ``strokeseg`` CLI, on tiny data.

Real models are trained outside the tests (models/README.md); here a few
phantom studies and a couple of epochs check that each command does what it
says: a run writes best/last checkpoints and a history, an interrupted run
resumes to exactly the weights of an uninterrupted one, fine-tuning starts
from the given weights, export keeps ONNX Runtime within 1e-4 of PyTorch for
every architecture, and evaluate writes its report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.architectures.registry import ARCHITECTURES, build_network, width_config
from models.synth import write_phantom_cases
from models.training.augment import AugmentConfig, augment_batch
from models.training.trainer import load_checkpoint
from service.cli import app
from service.inference import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-cases")
    write_phantom_cases(root, 5, seed=21)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _strokeseg(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _train(cases: Path, cache: Path, out: Path, *extra: object, epochs: int = 2) -> str:
    return _strokeseg(
        "train", cases, "--out", out, "--epochs", epochs, "--min-steps-per-epoch", 2,
        "--batch-size", 4, "--crop", 64, "--cache-dir", cache, "--no-progress",
        "--val-fraction", 0.2, *extra,
    )


def test_augmentation_keeps_image_and_target_aligned() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 2, 64, 64)
    x[:, 0, 20:30, 40:50] = 2.0  # bright DWI square ...
    x[:, 1] = 0.8
    y = torch.zeros(3, 1, 64, 64)
    y[:, 0, 20:30, 40:50] = 1.0  # ... is the lesion
    xa, ya = augment_batch(x, y, gen, AugmentConfig())
    assert xa.shape == x.shape and ya.shape == y.shape
    for i in range(3):
        lesion = ya[i, 0] > 0.5
        assert lesion.sum() > 50
        # The bright square moved with the target (DWI brightest inside the lesion).
        assert xa[i, 0][lesion].mean() > 2.0 * xa[i, 0][~lesion].mean()
    # Same generator seed, same augmentation; shared=True moves a stack together.
    xb, _ = augment_batch(x, y, torch.Generator().manual_seed(0), AugmentConfig())
    assert torch.equal(xa, xb)
    _, ys = augment_batch(x, y, torch.Generator().manual_seed(1), AugmentConfig(), shared=True)
    assert torch.allclose(ys[0], ys[1]) and torch.allclose(ys[1], ys[2])
    xo, yo = augment_batch(x, y, gen, AugmentConfig.off())
    assert torch.equal(xo, x) and torch.equal(yo, y)


def test_train_writes_checkpoints_and_resumes_exactly(cases: Path, cache: Path, tmp_path: Path) -> None:
    output = _train(cases, cache, tmp_path / "full", epochs=2)
    assert "epoch   2/2" in output and "val Dice" in output
    training = json.loads((tmp_path / "full" / "training.json").read_text())
    assert [h["epoch"] for h in training["history"]] == [1, 2]
    assert training["n_training_studies"] == 4 and training["n_validation_studies"] == 1
    assert training["settings"]["tversky_alpha"] == 0.5 == training["settings"]["tversky_beta"]

    # The same run, interrupted (Ctrl-C) right after epoch 1 was saved, then resumed.
    from models.training.dataset import load_case_arrays
    from models.training.trainer import TrainSettings, fit
    from service.preprocess import DEFAULT_PROFILE, ModelGrid

    record = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    settings = TrainSettings(**record["settings"])
    dirs = [Path(p) for p in record["meta"]["training_studies"] + record["meta"]["validation_studies"]]
    arrays = load_case_arrays(dirs, ModelGrid(), DEFAULT_PROFILE, cache_dir=cache)

    def interrupt_after_epoch_1(line: str) -> None:
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(arrays, [0, 1, 2, 3], [4], tmp_path / "split", settings, progress=False,
            echo=interrupt_after_epoch_1)
    lines: list[str] = []
    fit(arrays, [0, 1, 2, 3], [4], tmp_path / "split", settings, resume=True, progress=False,
        echo=lines.append)
    assert any(line.startswith("resuming") for line in lines)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert [h["epoch"] for h in split["history"]] == [1, 2]
    for key, value in record["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    assert split["history"][1]["loss"] == record["history"][1]["loss"]


def test_resume_refuses_other_settings(cases: Path, cache: Path, tmp_path: Path) -> None:
    _train(cases, cache, tmp_path / "run", epochs=1)
    result = runner.invoke(app, [
        "train", str(cases), "--out", str(tmp_path / "run"), "--epochs", "2", "--lr", "0.1",
        "--min-steps-per-epoch", "2", "--batch-size", "4", "--crop", "64",
        "--cache-dir", str(cache), "--no-progress", "--val-fraction", "0.2",
    ])
    assert result.exit_code == 2
    assert "other settings" in result.output


def test_finetune_starts_from_the_checkpoint(cases: Path, cache: Path, tmp_path: Path) -> None:
    _train(cases, cache, tmp_path / "source", epochs=1)
    output = _strokeseg(
        "finetune", cases, "--from", tmp_path / "source" / "best.pt", "--out", tmp_path / "ft",
        "--cases", 3, "--epochs", 1, "--lr", 1e-6, "--min-steps-per-epoch", 1,
        "--batch-size", 4, "--crop", 64, "--cache-dir", cache, "--no-progress",
        "--per-slice-dice-weight", 0.5, "--tversky-alpha", 0.3, "--tversky-beta", 0.7,
    )
    assert "3 training / 1 validation studies" in output
    source, source_record = load_checkpoint(tmp_path / "source" / "best.pt")
    tuned, record = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert record["meta"]["mode"] == "finetune"
    # the fine-tuning loss can differ from the source's (--per-slice-dice-weight, --tversky-*)
    assert source_record["settings"]["per_slice_dice_weight"] == 0.0
    assert record["settings"]["per_slice_dice_weight"] == 0.5
    assert (source_record["settings"]["tversky_alpha"], source_record["settings"]["tversky_beta"]) == (0.5, 0.5)
    assert (record["settings"]["tversky_alpha"], record["settings"]["tversky_beta"]) == (0.3, 0.7)
    # lr 1e-6 for one short epoch: weights move, but stay close to the source
    # (parameters only: BatchNorm running statistics follow the data, not the lr).
    deltas = [
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(source.parameters(), tuned.parameters(), strict=True)
    ]
    assert max(deltas) > 0.0
    assert max(deltas) < 1e-2


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_parity_and_serving(architecture: str, tmp_path: Path) -> None:
    """Every architecture exports with dynamic slices within 1e-4 and loads in the service."""
    net = build_network(architecture, width_config(architecture, 4))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(
        {"architecture": architecture, "config": width_config(architecture, 4) | {},
         "state_dict": net.state_dict(),
         "meta": {"grid": {"matrix": [64, 64], "pixel_spacing_mm": [3.6, 3.6]}}},
        run / "best.pt",
    )
    output = _strokeseg(
        "export", run / "best.pt", "--out", tmp_path / "bundle", "--name", f"t-{architecture}",
        "--include-checkpoint",
    )
    assert "wrote" in output
    sums = (tmp_path / "bundle" / "SHA256SUMS").read_text()
    assert "checkpoint.pt" in sums and "model.onnx" in sums
    reloaded, _ = load_checkpoint(tmp_path / "bundle" / "checkpoint.pt")
    assert type(reloaded) is type(net)
    model = load_model(tmp_path / "bundle")
    card = model.card
    assert card.opset == 17 and card.network is not None
    assert card.network.architecture == architecture
    assert card.metrics["onnx_parity_max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).uniform(0, 2, size=(11, 2, 64, 64)).astype(np.float32)
    (prob,) = model.session.run(["probability"], {"image": x})
    assert prob.shape == (11, 1, 64, 64)


def test_export_with_test_time_augmentation_serves_the_mirrored_mean(tmp_path: Path) -> None:
    """A card with flip_columns: the served probability is the mean of the slices and their mirror."""
    from service.inference import predict_probability

    torch.manual_seed(3)
    net = build_network("unet2d", width_config("unet2d", 4))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"architecture": "unet2d", "config": width_config("unet2d", 4), "state_dict": net.state_dict(),
                "meta": {"grid": {"matrix": [64, 64], "pixel_spacing_mm": [3.6, 3.6]}}}, run / "best.pt")
    _strokeseg("export", run / "best.pt", "--out", tmp_path / "tta", "--test-time-augmentation", "flip_columns",
               "--min-component-peak", 0.8)
    model = load_model(tmp_path / "tta")
    assert model.card.test_time_augmentation == ("flip_columns",)
    assert model.card.min_component_peak_probability == 0.8
    x = np.random.default_rng(1).uniform(0, 2, size=(5, 2, 64, 64)).astype(np.float32)

    def network(batch: np.ndarray) -> np.ndarray:
        (prob,) = model.session.run(["probability"], {"image": np.ascontiguousarray(batch)})
        return np.asarray(prob)[:, 0]

    served = predict_probability(model, x)
    expected = (network(x) + network(x[..., ::-1])[..., ::-1]) / 2
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert float(np.abs(served - network(x)).max()) > 1e-4  # the mirror did change the result

    refused = runner.invoke(app, ["export", str(run / "best.pt"), "--out", str(tmp_path / "bad"),
                                  "--test-time-augmentation", "flip_rows"])
    assert refused.exit_code == 2 and "flip_rows" in refused.output

    # --profile: the card serves another preprocessing profile than the checkpoint's meta says
    assert model.card.preprocessing_profile == "dwi-median-adc-fixed-v1"
    _strokeseg("export", run / "best.pt", "--out", tmp_path / "v3", "--profile", "b1000eq-median-adc-fixed-v3")
    assert load_model(tmp_path / "v3").card.preprocessing_profile == "b1000eq-median-adc-fixed-v3"
    unknown = runner.invoke(app, ["export", str(run / "best.pt"), "--out", str(tmp_path / "bad"),
                                  "--profile", "b1000eq-median-adc-fixed-v9"])
    assert unknown.exit_code == 2 and "unknown preprocessing profile" in unknown.output


def test_evaluate_writes_report(cases: Path, tmp_path: Path) -> None:
    from service.config import BUNDLED_MODEL_DIR as bundled
    output = _strokeseg("evaluate", cases, "--model", bundled, "--out", tmp_path / "report")
    assert "5 studies: median Dice" in output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["cases"]) == 5
    assert (tmp_path / "report" / "bland_altman.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "By volume class" in (tmp_path / "report" / "report.md").read_text()
    # What `strokeseg export --report` puts on a model card.
    from models.cli import card_summary

    digest = card_summary(report)
    assert digest["studies"] == 5
    assert digest["dice_median"] == round(report["summary"]["overall"]["dice_median"], 3)
    assert digest["data"] == report["context"]["command"]


def test_train_refuses_a_folder_without_cases(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "case folder" in result.output


def test_nifti_truth_maps_onto_the_dwi_grid(tmp_path: Path) -> None:
    """A mask drawn in a viewer (NIfTI, RAS on disk) lands on the right DWI voxels."""
    import SimpleITK as sitk

    from models.casefolder import dicom_files, truth_mask
    from service.imaging import as_sitk
    from service.intake import load_study

    (case,) = write_phantom_cases(tmp_path / "cases", 1, seed=5)
    study = load_study(dicom_files(case))
    expected = np.load(case / "truth" / "mask.npy")
    assert expected.sum() > 100
    # Write the mask as NIfTI on a *different* grid (flipped slice order,
    # 2x finer in-plane), as an annotation tool might, and drop mask.npy.
    image = as_sitk(study.dwi, expected.astype(np.uint8))
    finer = sitk.Resample(
        image, [s * 2 for s in image.GetSize()[:2]] + [image.GetSize()[2]], sitk.Transform(),
        sitk.sitkNearestNeighbor, image.GetOrigin(),
        [image.GetSpacing()[0] / 2, image.GetSpacing()[1] / 2, image.GetSpacing()[2]],
        image.GetDirection(), 0, sitk.sitkUInt8,
    )
    sitk.WriteImage(sitk.Flip(finer, [False, False, True]), str(case / "truth" / "mask.nii.gz"))
    (case / "truth" / "mask.npy").unlink()
    got = truth_mask(case, study.dwi)
    assert got.shape == expected.shape
    agreement = 2 * np.logical_and(got, expected).sum() / (got.sum() + expected.sum())
    assert agreement > 0.97


def test_per_slice_dice_weighs_a_missed_small_lesion_like_a_large_one() -> None:
    """The batch-pooled Tversky barely notices a missed lacune next to a found infarct; the
    per-slice term counts it as half the batch's lesion slices."""
    from models.training.losses import per_slice_dice_loss, tversky_loss

    target = torch.zeros(3, 1, 32, 32)
    target[0, 0, 4:28, 4:28] = 1.0  # a large lesion, found
    target[1, 0, 10:12, 10:12] = 1.0  # a 4-pixel lesion, missed
    logits = torch.where(target > 0, 12.0, -12.0)
    logits[1] = -12.0
    pooled = float(tversky_loss(logits, target))
    per_slice = float(per_slice_dice_loss(logits, target))
    assert pooled < 0.01
    assert per_slice == pytest.approx(0.5 * (1 - 1 / 5), abs=0.01)  # slice 2: Dice (0 + 1) / (4 + 1)
    empty = torch.zeros(2, 1, 8, 8, requires_grad=True)
    loss = per_slice_dice_loss(empty, torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert float(loss) == 0.0 and empty.grad is not None


def test_ensemble_bundle_serves_the_mean_of_its_members(tmp_path: Path) -> None:
    """models.experiments.ensemble_bundle: one graph, the mean of the members' probabilities."""
    from models.experiments.ensemble_bundle import main as ensemble_main

    checkpoints = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        net = build_network("unet2d", width_config("unet2d", 4))
        path = tmp_path / f"m{seed}" / "best.pt"
        path.parent.mkdir()
        torch.save({"architecture": "unet2d", "config": width_config("unet2d", 4), "state_dict": net.state_dict(),
                    "meta": {"grid": {"matrix": [64, 64], "pixel_spacing_mm": [3.6, 3.6]}}}, path)
        _strokeseg("export", path, "--out", tmp_path / f"b{seed}", "--test-time-augmentation", "flip_columns")
        checkpoints.append(path)
    ensemble_main([str(tmp_path / "b5"), str(tmp_path / "ens"), *map(str, checkpoints)])
    x = np.random.default_rng(2).uniform(0, 2, size=(3, 2, 64, 64)).astype(np.float32)

    def network(bundle: Path) -> np.ndarray:
        model = load_model(bundle)
        (prob,) = model.session.run(["probability"], {"image": x})
        return np.asarray(prob)

    ensemble = load_model(tmp_path / "ens")  # the card's checksum matches the new graph
    assert ensemble.card.test_time_augmentation == ("flip_columns",)
    assert ensemble.card.version.endswith("-ensemble2")
    members = [network(tmp_path / "b5"), network(tmp_path / "b6")]
    assert float(np.abs(members[0] - members[1]).max()) > 1e-3
    np.testing.assert_allclose(network(tmp_path / "ens"), (members[0] + members[1]) / 2, atol=1e-5)
