"""ONNX Runtime session for a bundled model, and lesion prediction on a study.

The CUDA provider is used when onnxruntime-gpu sees a GPU; otherwise CPU.
ONNX Runtime falls back to CPU silently, so the provider actually in use is
read back from the session and logged.  Create sessions after a worker forks
(never in a prefork parent) and load each model once per process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.domain import DiffusionStudy, LesionSegmentation
from service.errors import ModelError
from service.inference.card import ModelCard, load_model_card
from service.preprocess import ProfileOptions, to_model_input, to_native_grid

log = logging.getLogger(__name__)

MAX_SLICES_PER_RUN = 64


@dataclass(eq=False)
class LoadedModel:
    """A model card with its warm ONNX Runtime session."""

    card: ModelCard
    session: ort.InferenceSession
    model_dir: Path

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])


def load_model(model_dir: Path, *, intra_op_threads: int = 0) -> LoadedModel:
    """Load the model in ``model_dir``; prefers CUDA when it is really available."""
    card = load_model_card(model_dir)
    options = ort.SessionOptions()
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    wanted = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
    wanted.append("CPUExecutionProvider")
    try:
        session = ort.InferenceSession(
            str(model_dir / card.file), sess_options=options, providers=wanted
        )
    except Exception as exc:
        raise ModelError(f"cannot load {model_dir / card.file}: {exc}") from exc
    model = LoadedModel(card=card, session=session, model_dir=model_dir)
    log.info(
        "loaded model %s %s with provider %s", card.name, card.version, model.provider
    )
    return model


_cache: dict[tuple[Path, int], LoadedModel] = {}
_cache_lock = threading.Lock()


def cached_model(model_dir: Path, *, intra_op_threads: int = 0) -> LoadedModel:
    """Load once per process and keep warm."""
    key = (model_dir.resolve(), intra_op_threads)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(model_dir, intra_op_threads=intra_op_threads)
        return _cache[key]


def predict_probability(model: LoadedModel, tensor: np.ndarray) -> np.ndarray:
    """The network's probability, (slices, rows, columns), with the card's test-time augmentation.

    With ``flip_columns`` on the card the result is the mean of the network on the slices
    and on their mirror image (mirrored back): strokes occur in either hemisphere, the
    network was trained with left-right flips, and averaging the two views halved the
    false-positive lesions on a held-out real subject (models/README.md).
    """
    probability = _network_probability(model, tensor)
    if "flip_columns" in model.card.test_time_augmentation:
        mirrored = _network_probability(model, tensor[..., ::-1])
        probability = (probability + mirrored[..., ::-1]) / 2.0
    return probability


def _network_probability(model: LoadedModel, tensor: np.ndarray) -> np.ndarray:
    """Run the network slice-batch by slice-batch; returns (slices, rows, columns)."""
    outputs = []
    for start in range(0, tensor.shape[0], MAX_SLICES_PER_RUN):
        batch = np.ascontiguousarray(tensor[start : start + MAX_SLICES_PER_RUN], dtype=np.float32)
        (prob,) = model.session.run(
            [model.card.output.name], {model.card.input.name: batch}
        )
        outputs.append(np.asarray(prob, dtype=np.float32).reshape(batch.shape[0], *batch.shape[2:]))
    return np.concatenate(outputs, axis=0)


def segment_lesion(
    study: DiffusionStudy, model: LoadedModel, options: ProfileOptions | None = None
) -> LesionSegmentation:
    """Lesion mask and volume on the native DWI grid."""
    model_input = to_model_input(study, model.card.grid, model.card.preprocessing_profile, options)
    probability_model = predict_probability(model, model_input.tensor)
    probability = to_native_grid(probability_model, model_input, study.dwi)
    mask = probability >= model.card.threshold
    volume_ml = float(mask.sum()) * study.dwi.voxel_volume_ml
    return LesionSegmentation(
        mask=mask,
        probability=probability,
        lesion_volume_ml=volume_ml,
        model_name=model.card.name,
        model_version=model.card.version,
    )
