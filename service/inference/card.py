"""The model card: what a bundled model expects and what it was measured to do.

A :class:`ModelCard` that exists is valid: it is parsed with ``extra="forbid"``
from ``model.yaml`` beside ``model.onnx``, and the ONNX file's SHA-256 must
match the card, so a service never runs a model other than the one described.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ModelError
from service.preprocess import DEFAULT_PROFILE, PROFILES, ModelGrid

TestTimeAugmentation = Literal["flip_columns"]
TEST_TIME_AUGMENTATIONS: tuple[str, ...] = ("flip_columns",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInputSpec(_Strict):
    name: str = "image"
    layout: str = "slices,channels,rows,columns"
    channels: tuple[str, ...] = ("dwi", "adc")
    matrix: tuple[int, int] = (128, 128)
    pixel_spacing_mm: tuple[float, float] = (1.8, 1.8)


class ModelOutputSpec(_Strict):
    name: str = "probability"
    activation: str = "sigmoid"


class NetworkSpec(_Strict):
    """The trained network's family and shape (models.architectures.registry names).

    Not needed to serve the ONNX file; it lets the speed benchmark and a
    reader rebuild exactly this network in PyTorch.
    """

    architecture: str
    config: dict[str, Any] = Field(default_factory=dict)
    parameters: int | None = None


class ModelCard(_Strict):
    name: str
    version: str
    description: str = ""
    architecture: str = ""
    network: NetworkSpec | None = None
    file: str = "model.onnx"
    sha256: str | None = None
    opset: int | None = None
    input: ModelInputSpec = Field(default_factory=ModelInputSpec)
    output: ModelOutputSpec = Field(default_factory=ModelOutputSpec)
    preprocessing_profile: str = DEFAULT_PROFILE
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    #: Hysteresis on components: a connected component of ``probability >= threshold`` is
    #: lesion only if its peak probability reaches this value (0 = every component). With the
    #: mirror's mean probability, a component only one view believes in peaks near 0.5-0.75;
    #: one both views agree on peaks near 1 (models/README.md, component rules).
    min_component_peak_probability: float = Field(0.0, ge=0.0, lt=1.0)
    #: Test-time augmentation the model was validated with; the probability is the mean over
    #: the original and each transform (undone on the output). ``flip_columns`` mirrors the
    #: model grid's columns (left-right on axial slices), the flip the network was trained with.
    test_time_augmentation: tuple[TestTimeAugmentation, ...] = ()
    intended_use: str = "Research use only. Not for diagnosis."
    training_data: str = ""
    #: What the network sees when the scan's b-value is not ~1000 (the profile's harmonisation,
    #: and how the ADC core threshold is calibrated): text for people, not read by code.
    b_value_harmonisation: str = ""
    #: The acquisition range the model was validated on (b-values, scanners, slice spacing ...).
    validated_range: dict[str, Any] = Field(default_factory=dict)
    limitations: str = ""
    reproduce: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def grid(self) -> ModelGrid:
        return ModelGrid(matrix=self.input.matrix, pixel_spacing_mm=self.input.pixel_spacing_mm)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model_card(model_dir: Path) -> ModelCard:
    """Read and check ``model_dir/model.yaml`` and the model file it names."""
    card_path = model_dir / "model.yaml"
    if not card_path.is_file():
        raise ModelError(f"no model card at {card_path}")
    try:
        card = ModelCard.model_validate(yaml.safe_load(card_path.read_text()))
    except Exception as exc:
        raise ModelError(f"invalid model card {card_path}: {exc}") from exc
    if tuple(card.input.channels) != ("dwi", "adc"):
        raise ModelError(f"model expects channels {card.input.channels}, service provides dwi, adc")
    if card.preprocessing_profile not in PROFILES:
        raise ModelError(f"model card names unknown preprocessing profile {card.preprocessing_profile}")
    model_path = model_dir / card.file
    if not model_path.is_file():
        raise ModelError(f"model file missing: {model_path}")
    if card.sha256 and sha256_of(model_path) != card.sha256:
        raise ModelError(f"model file {model_path} does not match the SHA-256 in its card")
    return card
