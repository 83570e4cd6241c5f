#!/bin/bash
# The training and test data of models/README.md "Reproduce" under runs/ (gitignored): inserted
# lesions on the real healthy scans (../shared/realdata/healthy) and phantoms with mimics.
# About 25 min on 2 CPU cores (two parallel streams); folders that already exist are skipped.
set -e
cd "$(dirname "$0")/../.."
S=.venv/bin/strokeseg
H=../shared/realdata/healthy
insert() { [ -d "$2" ] || $S insert "$1" --out "$2" --cases "$3" --seed "$4" --subject "$5"; }
phantom() { out=$1; shift; [ -d "$out" ] || $S phantom "$out" "$@"; }
# two streams of about equal length, one per CPU core
stream_a() {
  insert $H/decubitus_hfs/dicom runs/real/S1-siemens-hfs 25 1001 S1-siemens
  insert $H/decubitus_hfdr/dicom runs/real/S1-siemens-hfdr 25 1002 S1-siemens
  insert $H/decubitus_hfp/dicom runs/real/S1-siemens-hfp 25 1003 S1-siemens
  insert $H/decubitus_hfdl/dicom runs/real/S1-siemens-hfdl 25 1004 S1-siemens
  insert $H/canon61_enh_3000/dicom runs/real/S3-canon 50 3001 S3-canon
  phantom runs/ph/val --cases 12 --seed 1701
  phantom runs/ph/mixed-test --cases 12 --seed 1601
  phantom runs/ph/A-test --cases 12 --seed 1611 --domain A
  phantom runs/ph/B-test --cases 12 --seed 1621 --domain B
  phantom runs/ph/C-test --cases 12 --seed 1631 --domain C
}
stream_b() {
  insert $H/philips_enh_2201_cl/dicom runs/real/S2-philips 24 2001 S2-philips
  phantom runs/ph/mixed-train --cases 60 --seed 1501
  phantom runs/ph/A-train --cases 20 --seed 1511 --domain A
  phantom runs/ph/B-train --cases 20 --seed 1521 --domain B
  phantom runs/ph/C-train --cases 20 --seed 1531 --domain C
}
stream_a & a=$!
stream_b & b=$!
wait $a; wait $b
echo DATA-DONE
