#!/usr/bin/env bash
# The real-imagery result of docs/EVALUATION.md ("Dense DVFM"), command by command:
# image-only pre-training on Californian NAIP crops (with the dense DVFM term for three seeds, and once without it), then
# the scene-grouped probe on SpaceNet Rio crops against random networks and the teacher.
#   MIRROR=/work/.mirror bash scripts/real_probe_recipe.sh      # 2 cores: about 35 minutes
# MIRROR holds the fetched snapshots the manifests name (docs/REAL-DATA.md, "The command").
# Every step skips work whose output already exists, so a killed run continues.
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR=${MIRROR:?set MIRROR to the folder of fetched repository snapshots (docs/REAL-DATA.md)}
OUT=${OUT:-runs}; STEPS=${STEPS:-300}; BATCH=${BATCH:-16}; SEEDS=${SEEDS:-"0 1 2"}
R() { echo "+ refound $*"; .venv/bin/python -m training.cli "$@"; }
T() { echo "+ refound teachers $*" >&2; .venv/bin/python -m training.cli teachers "$@" --json \
      | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["cache"])'; }  # prints the cache folder
mkdir -p "$OUT"
[ -f "$OUT/real_ca256/meta.json" ] || R build-corpus --manifest data/manifests/real-imagery-extra.json \
    --mirror "$MIRROR" --out "$OUT/real_ca256" --gsd 0.5 --stride 256
[ -f "$OUT/real_probe_ds/meta.json" ] || R build-corpus --manifest data/manifests/real-probe.json \
    --mirror "$MIRROR" --out "$OUT/real_probe_ds"
CACHE=$(T --data "$OUT/real_ca256" --describer template)
common=(--preset small --data "$OUT/real_ca256" --teachers "$CACHE" --steps "$STEPS" --batch-size "$BATCH" --lr 5e-4 --warmup-steps 20
        --photometric-aug 0.5)
ckpts=()
for seed in $SEEDS; do
    [ -f "$OUT/pt_ca_dense_s$seed/model.safetensors" ] || R pretrain "${common[@]}" --dvfm-patch-weight 1 \
        --seed "$seed" --out "$OUT/pt_ca_dense_s$seed"
    ckpts+=(--checkpoint "$OUT/pt_ca_dense_s$seed")
done
[ -f "$OUT/pt_ca_nodense/model.safetensors" ] || R pretrain "${common[@]}" --out "$OUT/pt_ca_nodense"
R probe --data "$OUT/real_probe_ds" "${ckpts[@]}" --checkpoint "$OUT/pt_ca_nodense" --random-seeds 10 \
    --out "$OUT/probe_real.json"
