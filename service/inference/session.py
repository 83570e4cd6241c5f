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
from scipy import ndimage

from service import metrics
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

    @property
    def io_binding(self) -> bool:
        """Run through IO binding: on CUDA the input is copied to the device once and the
        output is fetched once per run, not staged by ONNX Runtime through extra host copies."""
        return self.provider == "CUDAExecutionProvider"


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
        if model.io_binding:
            prob = run_bound(model, batch, "cuda")
        else:
            (prob,) = model.session.run(
                [model.card.output.name], {model.card.input.name: batch}
            )
        outputs.append(np.asarray(prob, dtype=np.float32).reshape(batch.shape[0], *batch.shape[2:]))
    return np.concatenate(outputs, axis=0)


def run_bound(model: LoadedModel, batch: np.ndarray, device: str) -> np.ndarray:
    """One run with IO binding on ``device`` (``cuda``; ``cpu`` in the tests, where no GPU is).

    The input is placed on the device as one OrtValue, the output is allocated there by ONNX
    Runtime and copied back to the host once.
    """
    binding = model.session.io_binding()
    binding.bind_ortvalue_input(model.card.input.name, ort.OrtValue.ortvalue_from_numpy(batch, device, 0))
    binding.bind_output(model.card.output.name, device, 0)
    model.session.run_with_iobinding(binding)
    (prob,) = binding.copy_outputs_to_cpu()
    return np.asarray(prob)


def lesion_mask(probability: np.ndarray, threshold: float, min_peak: float = 0.0) -> np.ndarray:
    """``probability >= threshold``, keeping only the 26-connected components whose peak
    probability reaches ``min_peak`` (hysteresis thresholding).

    The voxel threshold draws a lesion's outline; the peak says whether the network was sure
    of the lesion at all. Tiny components that recur on a subject's normal anatomy, which
    drag a small lesion's Dice down, are ones the network (or one of the mirrored views) was
    never sure of.
    """
    mask = probability >= threshold
    if min_peak <= threshold or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    inside = labels[mask]
    peak = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(peak, inside, probability[mask])
    keep = peak >= min_peak
    keep[0] = False
    kept: np.ndarray = keep[labels]
    return kept


def segment_lesion(
    study: DiffusionStudy, model: LoadedModel, options: ProfileOptions | None = None
) -> LesionSegmentation:
    """Lesion mask and volume on the native DWI grid."""
    with metrics.stage("preprocess"):
        model_input = to_model_input(study, model.card.grid, model.card.preprocessing_profile, options)
    with metrics.stage("inference"):
        probability_model = predict_probability(model, model_input.tensor)
        probability = to_native_grid(probability_model, model_input, study.dwi)
        mask = lesion_mask(probability, model.card.threshold, model.card.min_component_peak_probability)
    volume_ml = float(mask.sum()) * study.dwi.voxel_volume_ml
    return LesionSegmentation(
        mask=mask,
        probability=probability,
        lesion_volume_ml=volume_ml,
        model_name=model.card.name,
        model_version=model.card.version,
    )
