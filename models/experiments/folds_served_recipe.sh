#!/bin/bash
# Needs the data of models/README.md "Reproduce" under runs/ (models/experiments/make_data.sh).
# About 20 min per fold on 2 CPU cores.
# Folds F1 (S1 held out), F2 (S2 held out) and F3 (S3 held out) with the served recipe (train 16 +
# fine-tune 10), then export with the mirror and evaluate on the held-out subject.
#   FOLDS="F1 F2"   which folds (default: F1 F2; F3 is the served network itself)
#   TAG=""          suffix of the run names (runs/models/unet2d-F1$TAG ...)
#   EXTRA=""        extra `strokeseg train` options, e.g. "--per-slice-dice-weight 1"
#   BASE_TAG=$TAG   suffix of the train-stage run; a finished run of that name is reused (resume)
#   FT_EXTRA=""     extra `strokeseg finetune` options, e.g. "--per-slice-dice-weight 1"
set -e
cd "$(dirname "$0")/../.."
S=.venv/bin/strokeseg
FOLDS=${FOLDS:-"F1 F2"}
TAG=${TAG:-}
EXTRA=${EXTRA:-}
BASE_TAG=${BASE_TAG-$TAG}
FT_EXTRA=${FT_EXTRA:-}
PH="runs/ph/mixed-train runs/ph/A-train runs/ph/B-train runs/ph/C-train"
S1="runs/real/S1-siemens-hfs runs/real/S1-siemens-hfdr runs/real/S1-siemens-hfp runs/real/S1-siemens-hfdl"
COMMON="--profile b1000eq-median-adc-fixed-v2 --val-data runs/ph/val --patience 6 --seed 0 --threads 2 --cache-dir runs/cache --no-progress"
fold() { # name, held-out folder(s), training real folders
  name=$1$TAG; base=$1$BASE_TAG; test=$2; shift 2
  $S train $PH "$@" --out runs/models/unet2d-$base $COMMON --epochs 16 $EXTRA
  $S finetune $PH "$@" --from runs/models/unet2d-$base/best.pt --out runs/models/unet2d-${name}ft --epochs 10 --lr 5e-4 --val-data runs/ph/val --patience 6 --threads 2 --cache-dir runs/cache --no-progress $FT_EXTRA
  $S export runs/models/unet2d-${name}ft/best.pt --out runs/bundles/unet2d-${name}ft-tta --version 0.4.0-$name --test-time-augmentation flip_columns
  $S evaluate $test --model runs/bundles/unet2d-${name}ft-tta --out runs/reports/$name-tta --threads 2 --title "fold $name, served recipe with the mirror"
  python3 - <<PY
import yaml, pathlib
p = pathlib.Path("runs/bundles/unet2d-${name}ft-tta/model.yaml"); c = yaml.safe_load(p.read_text()); c["test_time_augmentation"] = []
q = pathlib.Path("runs/bundles/unet2d-${name}ft-notta"); q.mkdir(exist_ok=True)
import shutil; shutil.copy("runs/bundles/unet2d-${name}ft-tta/model.onnx", q / "model.onnx"); (q / "model.yaml").write_text(yaml.safe_dump(c))
PY
  $S evaluate $test --model runs/bundles/unet2d-${name}ft-notta --out runs/reports/$name-notta --threads 2 --title "fold $name, served recipe without the mirror"
}
for f in $FOLDS; do
  case $f in
    F1) fold F1 "$S1" runs/real/S3-canon runs/real/S2-philips ;;
    F2) fold F2 runs/real/S2-philips $S1 runs/real/S3-canon ;;
    F3) fold F3 runs/real/S3-canon runs/real/S1-siemens-hfdl runs/real/S1-siemens-hfdr runs/real/S1-siemens-hfp runs/real/S1-siemens-hfs runs/real/S2-philips ;;
  esac
done
echo FOLDS-DONE
