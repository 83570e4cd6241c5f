#!/usr/bin/env python3
"""Seconds per 25-slice study for each model bundle: ONNX Runtime CPU vs PyTorch CPU (and CUDA).

    .venv/bin/python scripts/benchmark_inference.py [BUNDLE ...] [--threads 2] [--repeats 10]

Default bundles: every ``models/zoo/*/*`` folder.  For each bundle it prints

* ``network``: the network alone on a (25, 2, H, W) float32 stack, ONNX
  Runtime with the CPU provider (and with CUDA when onnxruntime-gpu sees a
  GPU), and PyTorch on the CPU when the training extra is installed (the
  network is rebuilt from the card's ``network`` entry; weights do not change
  the speed, so random ones are used);
* ``study``: ``service.inference.segment_lesion`` on a 25-slice phantom study
  read through intake: preprocessing + network + resampling back to the DWI
  grid, i.e. what a worker spends per study after the DICOM files are read;
* ``assess``: the brain mask, the restricted-diffusion guard and the
  domain-of-validity checks on that study's segmentation (``service.assess``);
* ``intake``: reading the study's DICOM files (``load_study``), for scale.

Median and min over ``--repeats`` runs after one warm-up run.  The target for
the default served model is <= 3 s per study on 2 CPU cores; run it with
``taskset -c 0,1`` (and ``--threads 2``) to hold it to two cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SLICES = 25


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: first-run allocations, lazy initialisation
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), min(runs)


def _stack(matrix: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.empty((SLICES, 2, *matrix), dtype=np.float32)
    x[:, 0] = rng.gamma(2.0, 0.5, size=(SLICES, *matrix))
    x[:, 1] = rng.uniform(0.0, 3.5, size=(SLICES, *matrix))
    return x


def _phantom_study(work: Path) -> Any:
    """A 25-slice phantom study read through the service's intake."""
    from models.synth import generate_phantom, write_phantom_study
    from service.intake import load_study

    seed = 0
    while True:  # the generator draws 22-30 slices; take the first seed with 25
        phantom = generate_phantom(seed, lesion_class="medium", matrix=192)
        if phantom.geometry.shape[0] == SLICES:
            break
        seed += 1
    case = write_phantom_study(phantom, work / "case")
    paths = sorted((case / "dicom").glob("*.dcm"))
    return paths, load_study(paths)


def _torch_runner(card: Any, threads: int) -> Callable[[np.ndarray], Any] | None:
    try:
        import torch

        from models.architectures.registry import build_network, stack_logits
    except ImportError:
        return None
    if card.network is None:
        return None
    torch.set_num_threads(threads)
    net = stack_logits(build_network(card.network.architecture, card.network.config)).eval()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return torch.sigmoid(net(torch.from_numpy(x)))

    return run


def benchmark(bundle: Path, threads: int, repeats: int, study: Any) -> None:
    import onnxruntime as ort

    from service.inference import load_model, segment_lesion
    from service.inference.card import load_model_card
    from service.intake import load_study

    card = load_model_card(bundle)
    x = _stack(card.input.matrix)
    print(f"\n{card.name} {card.version} ({card.architecture})")
    print(f"  input {SLICES} x 2 x {card.input.matrix[0]} x {card.input.matrix[1]}, threads {threads}")
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    for provider in providers:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(bundle / card.file), options, providers=[provider])
        median, best = _time(lambda s=session: s.run(None, {card.input.name: x}), repeats)
        print(f"  network  onnxruntime {provider:24s} median {median:6.3f} s  min {best:6.3f} s")
    torch_run = _torch_runner(card, threads)
    if torch_run is None:
        print("  network  pytorch: not measured (no training extra or no 'network' in the card)")
    else:
        median, best = _time(lambda: torch_run(x), repeats)
        print(f"  network  pytorch CPU                          median {median:6.3f} s  min {best:6.3f} s")
    paths, loaded = study
    model = load_model(bundle, intra_op_threads=threads)
    median, best = _time(lambda: segment_lesion(loaded, model), repeats)
    print(f"  study    segment_lesion ({model.provider})  median {median:6.3f} s  min {best:6.3f} s")
    # the same study labelled b=1500: a b1000eq profile then does its b-value work (v3: kurtosis)
    at_1500 = replace(loaded, b_value=1500.0)
    median, best = _time(lambda: segment_lesion(at_1500, model), repeats)
    print(f"  study    segment_lesion, labelled b=1500           median {median:6.3f} s  min {best:6.3f} s")
    from service.assess import AssessOptions, assess
    from service.preprocess import HARMONISING_PROFILES, brain_mask

    options = AssessOptions(harmonised=card.preprocessing_profile in HARMONISING_PROFILES)
    segmentation = segment_lesion(loaded, model)
    median, best = _time(lambda: assess(loaded, segmentation, brain_mask(loaded.dwi), options), repeats)
    print(f"  assess   brain mask + guard + validity          median {median:6.3f} s  min {best:6.3f} s")
    median, best = _time(lambda: load_study(paths), max(1, repeats // 2))
    print(f"  intake   load_study ({len(paths)} files)            median {median:6.3f} s  min {best:6.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundles = args.bundles or sorted(p.parent for p in (ROOT / "models" / "zoo").glob("*/*/model.yaml"))
    with tempfile.TemporaryDirectory(prefix="strokeseg-bench-") as tmp:
        study = _phantom_study(Path(tmp))
        print(f"phantom study: {study[1].dwi.shape} DWI voxels, {len(study[0])} files")
        for bundle in bundles:
            benchmark(bundle, args.threads, args.repeats, study)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
