"""Vendor -> model routing: the service picks the model by the DWI Manufacturer.

The seeds' central finding (a model loses accuracy on another vendor and
regains it after fine-tuning) is only useful if a site can serve the
fine-tuned model for that vendor; these tests check the choice, the config
that describes it, and that a study really is segmented by the routed model.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from models.synth import generate_phantom, write_vendor_study
from service.config import BUNDLED_MODEL_DIR, load_settings
from service.errors import ConfigError
from service.inference import ModelRouter, load_model_card
from service.pipeline import model_router, segment_files

BUNDLED = BUNDLED_MODEL_DIR  # the model `strokeseg serve` uses by default


def _renamed_bundle(dst: Path, name: str) -> Path:
    """A copy of the bundled model whose card carries another name."""
    shutil.copytree(BUNDLED, dst)
    card = yaml.safe_load((dst / "model.yaml").read_text())
    card["name"] = name
    (dst / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    sums = "".join(
        f"{hashlib.sha256((dst / f).read_bytes()).hexdigest()}  {f}\n"
        for f in ("model.onnx", "model.yaml")
    )
    (dst / "SHA256SUMS").write_text(sums)
    return dst


def test_longest_prefix_case_insensitive(tmp_path: Path) -> None:
    router = ModelRouter.of(
        tmp_path / "default",
        [("GE", tmp_path / "ge"), ("philips", tmp_path / "philips"),
         ("GE HEALTHCARE", tmp_path / "ge-hc")],
    )
    assert router.model_dir_for("GE MEDICAL SYSTEMS") == tmp_path / "ge"
    assert router.model_dir_for("GE  HealthCare ") == tmp_path / "ge-hc"
    assert router.model_dir_for("Philips Medical Systems") == tmp_path / "philips"
    assert router.model_dir_for("SIEMENS") == tmp_path / "default"
    assert router.model_dir_for("") == tmp_path / "default"
    # A prefix is a prefix of the name, not a substring anywhere in it.
    assert router.model_dir_for("Not GE") == tmp_path / "default"


def test_empty_prefix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ModelRouter.of(tmp_path, [("  ", tmp_path)])


def test_routes_from_config(tmp_path: Path) -> None:
    config = tmp_path / "strokeseg.yaml"
    config.write_text(yaml.safe_dump({
        "spool_dir": str(tmp_path / "spool"),
        "model_dir": str(tmp_path / "default"),
        "model_routes": [{"manufacturer": "GE", "model_dir": str(tmp_path / "ge")}],
    }))
    router = model_router(load_settings(config))
    assert router.model_dir_for("GE MEDICAL SYSTEMS") == tmp_path / "ge"
    assert router.model_dir_for("SIEMENS") == tmp_path / "default"
    config.write_text(yaml.safe_dump({"model_routes": [{"manufacturer": "GE"}]}))
    with pytest.raises(ConfigError, match="model_dir"):
        load_settings(config)


def test_preload_finds_a_broken_route(tmp_path: Path) -> None:
    from service.errors import ModelError

    router = ModelRouter.of(BUNDLED, [("GE", tmp_path / "missing")])
    with pytest.raises(ModelError):
        router.preload()


def test_study_is_segmented_by_its_vendors_model(tmp_path: Path) -> None:
    ge_model = _renamed_bundle(tmp_path / "ge-model", "unet2d-phantom-ge")
    router = ModelRouter.of(BUNDLED, [("GE", ge_model)])
    phantom = generate_phantom(311, lesion_class="medium", matrix=128)
    names = {}
    for convention in ("ge", "siemens_classic"):
        case = write_vendor_study(phantom, tmp_path / convention, convention)
        result = segment_files(sorted((case / "dicom").glob("*.dcm")), router, tmp_path / f"out-{convention}")
        names[convention] = result.segmentation.model_name
        assert result.segmentation.lesion_volume_ml > 1.0
    default_name = load_model_card(BUNDLED).name
    assert names == {"ge": "unet2d-phantom-ge", "siemens_classic": default_name}


def test_io_binding_path_gives_the_plain_runs_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """The IO-binding path a CUDA worker takes (issue 14), run here on the CPU provider (no GPU)."""
    import numpy as np

    from service.inference import session as inference

    model = inference.load_model(BUNDLED)
    assert not model.io_binding  # CPU: plain runs
    shape = model.session.get_inputs()[0].shape
    batch = np.random.default_rng(14).random(
        (3, *(d if isinstance(d, int) else 1 for d in shape[1:])), dtype=np.float32)
    plain = inference._network_probability(model, batch)
    real_run_bound = inference.run_bound
    assert np.allclose(real_run_bound(model, batch, "cpu").reshape(plain.shape), plain, atol=1e-6)
    # a CUDA session takes the bound path for every batch, on device "cuda" (here: on the CPU)
    devices: list[str] = []

    def on_cpu(m: inference.LoadedModel, b: np.ndarray, device: str) -> np.ndarray:
        devices.append(device)
        return real_run_bound(m, b, "cpu")

    monkeypatch.setattr(inference.LoadedModel, "io_binding", property(lambda self: True))
    monkeypatch.setattr(inference, "run_bound", on_cpu)
    assert np.allclose(inference._network_probability(model, batch), plain, atol=1e-6)
    assert devices == ["cuda"]
