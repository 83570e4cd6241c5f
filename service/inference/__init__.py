"""Inference: the model card, the ONNX Runtime session and lesion prediction."""

from service.inference.card import ModelCard, load_model_card
from service.inference.routing import ModelRouter
from service.inference.session import (
    LoadedModel,
    cached_model,
    load_model,
    predict_probability,
    segment_lesion,
)

__all__ = [
    "LoadedModel",
    "ModelCard",
    "ModelRouter",
    "cached_model",
    "load_model",
    "load_model_card",
    "predict_probability",
    "segment_lesion",
]
