#!/usr/bin/env bash
# The cd-sfm-v2 recipe (issue 12): real viewpoint change from the TRAIN scenes of ../shared/data/more/, mixed with
# homographic warps (docs/training.md, "cd-sfm-v2"). Every stage is resumable: mined files are reused, runs are
# checkpointed, so rerunning the same command continues where it stopped.
#
#   scripts/train_v2.sh STAGE [NAME] [DATA_ROOT] [WORK_DIR]   (defaults: all cd-sfm-v2 ../shared/data runs/NAME)
#
# Stages, in order (`all` runs them all):
#   mine      SfM tracks of the 39 TRAIN scene folders (SIFT reconstructions at 1024 px, `--val-mode view`),
#             warps of every TRAIN scene image and of the single photos
#   local     the local model: fine-tuned from cd-sfm-v1 (lr 5e-4) on 50 % SfM-track pairs, 35 % scene warps, 15 % singles'
#             warps (LOCAL_STEPS, default 3000, LOCAL_BUDGET minutes, default 150)
#   student   the compact local model (a quarter of the multiply-adds) distilled from NAME's local model on the same
#             mix, exported as NAME-compact (STUDENT_STEPS, default 3000, STUDENT_BUDGET minutes, default 90);
#             STUDENT_ARCH=mini trains the smaller student (a fourteenth) into NAME-mini instead
#   augment   augmentation pairs from the SfM reconstructions of `mine` (whole keypoint sets, track correspondences, F
#             from the poses; held-out images validate), then the geometric augmentation network, for NAME and
#             NAME-compact
#   int8      the int8 forms of both local models
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"
NAME="${2:-cd-sfm-v2}"
D="${3:-../shared/data}"
W="${4:-runs/$NAME}"
mkdir -p "$W"
export CD_SFM_DATA="$D"
# the TRAIN scene folders and the single photos of cd_sfm/split.yaml (never an EVAL scene)
mapfile -t TRAIN < <(python -c "from cd_sfm.split import train_dirs; print(*train_dirs(), sep='\n')")
mapfile -t SINGLES < <(python -c "from cd_sfm.split import singles_dirs; print(*singles_dirs(), sep='\n')")
MIX=(--data-extra "$W/tracks.h5" --extra-ratio 0.5 --data-extra "$W/singles.h5" --extra-ratio 0.15)

run() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }

if run mine; then
    [ -f "$W/warps.h5" ] || cd-sfm train mine-homography "${TRAIN[@]}" "$W/warps.h5" --warps-per-image 8
    [ -f "$W/singles.h5" ] || cd-sfm train mine-homography "${SINGLES[@]}" "$W/singles.h5" --warps-per-image 8
    [ -f "$W/tracks.h5" ] || cd-sfm train mine "${TRAIN[@]}" "$W/tracks.h5" --work-dir "$W/sfm" --val-mode view
fi
if run local; then
    cd-sfm train local "$W/warps.h5" "$W/local" "${MIX[@]}" --init cd-sfm-v1 --lr 5e-4 --loss triplet --batch 256 \
        --steps "${LOCAL_STEPS:-3000}" --val-every 250 --ckpt-every 50 --time-budget "${LOCAL_BUDGET:-150}"
    cd-sfm train export "$W/local" "$NAME" --which final
fi
if run student; then
    SA="${STUDENT_ARCH:-compact}"
    SW="$W/student"; [ "$SA" = compact ] || SW="$W/student-$SA"
    cd-sfm train local "$W/warps.h5" "$SW" "${MIX[@]}" --arch "$SA" --teacher "$NAME" --loss triplet \
        --batch 256 --steps "${STUDENT_STEPS:-3000}" --val-every 250 --ckpt-every 50 \
        --time-budget "${STUDENT_BUDGET:-90}"
    cd-sfm train export "$SW" "$NAME-$SA" --which final
fi
if run augment; then
    for M in "$NAME" "$NAME-compact" "$NAME-mini"; do
        [ -d "cd_sfm/weights/$M" ] || continue
        [ -f "$W/sfm_pairs_$M.h5" ] || cd-sfm train mine-sfm-pairs "$W/sfm_pairs_$M.h5" "$W"/sfm/* \
            --val-from "$W/tracks.h5" --local "$M" --pairs-per-scene 12 --val-pairs-per-scene 3
        cd-sfm train augment "$W/sfm_pairs_$M.h5" "$W/augment_$M" --loss npair --lr 1e-3 \
            --steps "${AUGMENT_STEPS:-1200}" --val-every 100 --time-budget 30
        cd-sfm train export-augment "$W/augment_$M" "$M" --which best
    done
fi
if run int8; then
    for M in "$NAME" "$NAME-compact" "$NAME-mini"; do
        [ -d "cd_sfm/weights/$M" ] && cd-sfm models quantize "$M" --patches "$W/warps.h5"
    done
fi
cd-sfm models list
