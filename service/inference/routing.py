"""Vendor -> model routing: which bundled model segments a study.

Both seed papers found that a network trained on one vendor's scanner loses
accuracy on another's and regains most of it after fine-tuning on a few
target-vendor studies.  A site can therefore serve one model per scanner
manufacturer (``model_routes`` in the config) with ``model_dir`` as the
default for every other vendor.  Matching is on the DICOM Manufacturer
(0008,0070) of the DWI series, case-insensitive, by prefix, longest prefix
first, because vendors spell themselves several ways ("GE MEDICAL SYSTEMS",
"GE HEALTHCARE"; "Philips", "Philips Medical Systems").

Each model is loaded once per process through :func:`cached_model` and stays
warm; :meth:`ModelRouter.preload` loads them all when a worker starts, so a
broken route is found at start-up rather than on the first stroke of the day.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from service.inference.session import LoadedModel, cached_model

log = logging.getLogger(__name__)


def _normalise(manufacturer: str) -> str:
    return " ".join(manufacturer.split()).casefold()


@dataclass(frozen=True, slots=True)
class ModelRouter:
    """Chooses the model for a study from its Manufacturer."""

    default_dir: Path
    routes: tuple[tuple[str, Path], ...] = ()
    intra_op_threads: int = 0

    @classmethod
    def of(
        cls,
        default_dir: Path,
        routes: Iterable[tuple[str, Path]] = (),
        *,
        intra_op_threads: int = 0,
    ) -> ModelRouter:
        """A router whose routes are sorted longest prefix first."""
        normalised = [(_normalise(prefix), Path(path)) for prefix, path in routes]
        if any(not prefix for prefix, _ in normalised):
            raise ValueError("a model route needs a non-empty manufacturer prefix")
        normalised.sort(key=lambda route: len(route[0]), reverse=True)
        return cls(Path(default_dir), tuple(normalised), intra_op_threads)

    def model_dir_for(self, manufacturer: str) -> Path:
        """The model folder for a study whose DWI Manufacturer is ``manufacturer``."""
        name = _normalise(manufacturer)
        for prefix, model_dir in self.routes:
            if name.startswith(prefix):
                return model_dir
        return self.default_dir

    def select(self, manufacturer: str) -> LoadedModel:
        """The warm model for ``manufacturer`` (loaded on first use in this process)."""
        model_dir = self.model_dir_for(manufacturer)
        model = cached_model(model_dir, intra_op_threads=self.intra_op_threads)
        log.debug(
            "manufacturer %r -> model %s %s", manufacturer, model.card.name, model.card.version
        )
        return model

    def preload(self) -> list[LoadedModel]:
        """Load every routed model and the default now; raises ModelError on a bad bundle."""
        dirs = [self.default_dir, *(d for _, d in self.routes)]
        unique = list(dict.fromkeys(d.resolve() for d in dirs))
        return [cached_model(d, intra_op_threads=self.intra_op_threads) for d in unique]
