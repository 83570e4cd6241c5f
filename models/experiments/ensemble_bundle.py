"""A bundle whose one ONNX graph averages the probabilities of several checkpoints.

Seed ensembles are the usual cheap way to steady a network across training runs: the
held-out Siemens subject S1 moved between 0.767 and 0.806 median Dice over training seeds
and machines (models/README.md). This writes the mean of the members' sigmoids as one graph,
so the service needs no change (one session, one card); inference time grows with the number
of members. It was tried on fold F1 only (2026-12-05): not served.

Usage::

    python -m models.experiments.ensemble_bundle runs/bundles/F1-w16v2m runs/bundles/F1-ens2 \\
        runs/models/F1-w16v2mft/best.pt runs/models/F1-w16v2s1ft/best.pt

The first argument is an exported bundle whose card (profile, grid, mirror, rule) is kept;
the card's checksum and version are updated.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import yaml

from models.export import write_onnx
from models.training.trainer import load_checkpoint
from service.inference.card import sha256_of


class MeanProbability(torch.nn.Module):
    """(slices, 2, H, W) -> mean over members of sigmoid(logits)."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0)


def write_ensemble_bundle(base: Path, out: Path, checkpoints: list[Path]) -> Path:
    """Copy ``base``'s bundle to ``out`` with the members' mean as its ONNX graph."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    members = [load_checkpoint(c)[0].eval() for c in checkpoints]
    card = yaml.safe_load((out / "model.yaml").read_text())
    matrix = (int(card["input"]["matrix"][0]), int(card["input"]["matrix"][1]))
    write_onnx(MeanProbability(members).eval(), out / card.get("file", "model.onnx"), matrix=matrix)
    card["sha256"] = sha256_of(out / card.get("file", "model.onnx"))
    card["version"] = f"{card['version']}-ensemble{len(members)}"
    (out / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    (out / "SHA256SUMS").unlink(missing_ok=True)  # stale: the graph changed
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="exported bundle whose card is kept")
    parser.add_argument("out", type=Path, help="new bundle folder (replaced if present)")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="member checkpoints (best.pt)")
    args = parser.parse_args(argv)
    print("wrote", write_ensemble_bundle(args.base, args.out, args.checkpoints))


if __name__ == "__main__":
    main()
