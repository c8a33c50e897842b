#!/usr/bin/env bash
# The default training recipe of our ContextDesc weights, end to end, in about an hour on a 2-core CPU:
#   homography patch pairs (~2 min) -> local model (1800 steps or 50 min, whichever first) -> augmentation pairs
#   (~5 min) -> geometric augmentation (600 steps, ~2-5 min) -> int8 form of the local model, calibrated on 4096
#   training patches (~10 s) -> cd_sfm/weights/NAME/.
# Rerunning resumes every step that was interrupted (runs are checkpointed, mined files are reused).
#
#   scripts/train_default.sh [NAME] [DATA_ROOT] [WORK_DIR]      (defaults: my-model ../shared/data runs/NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="${1:-my-model}"
D="${2:-../shared/data}"
W="${3:-runs/$NAME}"
mkdir -p "$W"
# the TRAIN scenes of configs/split.yaml (never the EVAL ones)
TRAIN=("$D/british_museum/images" "$D/sacre_coeur/mapping" "$D/phototourism_samples" "$D/phototourism_pairs/images"
       "$D/cyprus/images" "$D/tum_fr3_long_office_household/images")
[ -f "$W/homography.h5" ] || cd-sfm train mine-homography "${TRAIN[@]}" "$W/homography.h5"
cd-sfm train local "$W/homography.h5" "$W/local" --loss triplet --steps 1800 --batch 256 --time-budget 50
cd-sfm train export "$W/local" "$NAME" --which final
[ -f "$W/pairs.h5" ] || cd-sfm train mine-pairs "$W/pairs.h5" --local "$NAME" --max-rotation 30 --max-scale 1.5 \
    --warps-per-image 1 --val-warps-per-image 3
cd-sfm train augment "$W/pairs.h5" "$W/augment" --loss npair --lr 1e-3 --steps 600 --val-every 100 --time-budget 15
cd-sfm train export-augment "$W/augment" "$NAME" --which best
cd-sfm models quantize "$NAME" --patches "$W/homography.h5"
cd-sfm models list
