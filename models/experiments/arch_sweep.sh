#!/bin/bash
# One of the seeds' architectures on fold F3 (trained on S1 + S2 + phantoms, S3 Canon b=1500 held
# out), exported as the served model is (mirror, component rule peak 0.8, profile v3), then measured
# on what decides the served model: the held-out subject, the six real healthy scans and the
# held-out phantoms per scanner. Needs the data of models/README.md "Reproduce" under runs/
# (models/experiments/make_data.sh).
#   bash models/experiments/arch_sweep.sh preact3d p3d8 "--width 8 --epochs 14 --patience 5"
#   bash models/experiments/arch_sweep.sh res-convlstm lstm4 "--width 4 --epochs 20"
#     ARCH   unet2d, res-convlstm (Alis 2020) or preact3d (Noh 2023)
#     TAG    run name: runs/models/F3-TAG, runs/bundles/F3-TAG, runs/reports/arch-F3-TAG-*
#     EXTRA  extra `strokeseg train` options (width, epochs, patience ...)
#   FTE=0   epochs of the fine-tuning stage at lr 5e-4 (the served 2-D recipe uses 10; 0 = none)
# CPU times on 2 cores: res-convlstm width 4 about 65 s per epoch, preact3d width 8 about 260 s.
set -e
cd "$(dirname "$0")/../.."
S=.venv/bin/strokeseg
ARCH=$1; TAG=$2; EXTRA=${3:-}; FTE=${FTE:-0}
[ -n "$TAG" ] || { echo "usage: $0 ARCH TAG [train options]" >&2; exit 2; }
PH="runs/ph/mixed-train runs/ph/A-train runs/ph/B-train runs/ph/C-train"
TRAIN="runs/real/S1-siemens-hfs runs/real/S1-siemens-hfdr runs/real/S1-siemens-hfp runs/real/S1-siemens-hfdl runs/real/S2-philips"
OPTS="--val-data runs/ph/val --threads 2 --cache-dir runs/cache --no-progress"
$S train $PH $TRAIN --out runs/models/F3-$TAG --arch "$ARCH" --profile b1000eq-median-adc-fixed-v2 \
  --seed 0 --patience 6 $OPTS $EXTRA
CKPT=runs/models/F3-$TAG/best.pt
if [ "$FTE" -gt 0 ]; then
  $S finetune $PH $TRAIN --from "$CKPT" --out runs/models/F3-${TAG}ft --epochs "$FTE" --lr 5e-4 --patience 6 $OPTS
  CKPT=runs/models/F3-${TAG}ft/best.pt
fi
$S export "$CKPT" --out runs/bundles/F3-$TAG --version 0.0.0-F3-$TAG --profile b1000eq-median-adc-fixed-v3 \
  --test-time-augmentation flip_columns --min-component-peak 0.8
R=runs/reports/arch-F3-$TAG
.venv/bin/python -u -m models.experiments.component_rules --model runs/bundles/F3-$TAG --test runs/real/S3-canon \
  --out $R-rules --thresholds 0.5 --peaks 0 0.8
.venv/bin/python -u -m models.experiments.real_healthy ../shared/realdata/healthy/* --model runs/bundles/F3-$TAG --out $R-healthy
for d in mixed A B C; do
  $S evaluate runs/ph/$d-test --model runs/bundles/F3-$TAG --out $R-ph-$d --threads 2 --title "F3-$TAG, phantoms $d"
done
echo "ARCH-SWEEP-DONE $ARCH $TAG"
