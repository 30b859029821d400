#!/usr/bin/env bash
# The synthetic-city evaluation of docs/EVALUATION.md, command by command.
#   bash scripts/evaluation_recipe.sh            # CPU recipe: refound_small (2 cores: about 45 minutes up to
#                                                # the feature-based tables, then about 2 hours of fine-tuning)
#   ABLATE=1 bash scripts/evaluation_recipe.sh   # ... plus the ablation study (8 short pre-trainings, ~20 minutes)
#   PRESET=base STEPS=20000 BATCH=80 FT_EPOCHS=30 FT_WARMUP=3 ABL_STEPS=20000 bash scripts/evaluation_recipe.sh  # GPU
# Every step skips work whose output already exists (evaluate and ablate reuse finished runs), so a
# killed run continues.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-small}; STEPS=${STEPS:-150}; BATCH=${BATCH:-16}; LR=${LR:-3e-4}; WARMUP=${WARMUP:-15}
RUNS=${RUNS:-5}; FT_RUNS=${FT_RUNS:-5}; FT_EPOCHS=${FT_EPOCHS:-3}; FT_WARMUP=${FT_WARMUP:-1}; OUT=${OUT:-runs}
ABLATE=${ABLATE:-0}; ABL_STEPS=${ABL_STEPS:-24}
R() { echo "+ refound $*"; .venv/bin/python -m training.cli "$@"; }
# `refound teachers`, printing the cache folder it wrote or reused (pre-training is pointed at it:
# a runs folder from older code may also hold caches of an older format, among which it won't guess)
T() { echo "+ refound teachers $*" >&2; .venv/bin/python -m training.cli teachers "$@" --json \
      | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["cache"])'; }
mkdir -p "$OUT"
# 1. pre-training corpus (seed 11, 6 km = 576 cells) and a downstream city never seen in pre-training (seed 22, 4 km)
[ -f "$OUT/corpus_city/meta.json" ] || R synthcity --out "$OUT/corpus_city" --seed 11 --size-km 6
[ -f "$OUT/corpus_ds/meta.json" ]   || R build-dataset --from-synthcity "$OUT/corpus_city" --out "$OUT/corpus_ds"
[ -f "$OUT/down_city/meta.json" ]   || R synthcity --out "$OUT/down_city" --seed 22 --size-km 4
[ -f "$OUT/down_ds/meta.json" ]     || R build-dataset --from-synthcity "$OUT/down_city" --out "$OUT/down_ds"
# 2. teachers once, then pre-training with all five objectives
CACHE=$(T --data "$OUT/corpus_ds")
[ -f "$OUT/pretrained_$PRESET/config.json" ] || R pretrain --preset "$PRESET" --data "$OUT/corpus_ds" --teachers "$CACHE" --steps "$STEPS" \
    --batch-size "$BATCH" --lr "$LR" --warmup-steps "$WARMUP" --save-every 25 --seed 0 --out "$OUT/pretrained_$PRESET"
R plot-log "$OUT/pretrained_$PRESET" --out "$OUT/pretrain_losses.png"
# 3. feature-based prediction (paper 4.3 (2), A.2.3): ReFound vs the same model untrained vs the frozen teachers
R evaluate --data "$OUT/down_ds" --checkpoint "$OUT/pretrained_$PRESET" --task urban_village --task population \
    --task commercial --methods refound_feature,refound_scratch_feature,teacher_features --runs "$RUNS" \
    --negative-ratio 5 --out "$OUT/eval_feature"
# 4. data-scale analysis (paper 5.2.5), feature-based
R evaluate --data "$OUT/down_ds" --checkpoint "$OUT/pretrained_$PRESET" --task urban_village --task population \
    --methods refound_feature,refound_scratch_feature --runs "$RUNS" --negative-ratio 5 \
    --data-scale 100,75,50,25,10 --out "$OUT/eval_datascale"
# 5. fine-tuning (paper 4.3 (1), A.2.2) against every fine-tuned baseline, three tasks
R evaluate --data "$OUT/down_ds" --checkpoint "$OUT/pretrained_$PRESET" --task urban_village --task population \
    --task commercial --methods refound_ft,bert_text,effnet_image,refound_scratch,late_fusion,vit_scratch \
    --runs "$FT_RUNS" --epochs "$FT_EPOCHS" --warmup-epochs "$FT_WARMUP" --negative-ratio 5 --out "$OUT/eval_finetune"
# 6. cross-modal attention of one urban-village cell's eateries (paper 5.2.3)
R attention-view --checkpoint "$OUT/pretrained_$PRESET" --data "$OUT/down_ds" --category restaurant \
    --index "$(.venv/bin/python -c "
from refound_core.data.dataset import RegionDataset
import numpy as np
ds = RegionDataset('$OUT/down_ds'); y = ds.labels['urban_village']
print(int(np.flatnonzero(y > 0.5)[0]))")" --out "$OUT/attention_restaurant.png"
# 7. (ABLATE=1) the paper's ablation set (5.2.2, Figure 3) on the smaller `make demo` cities
if [ "$ABLATE" = 1 ]; then
    [ -f "$OUT/abl_corpus/meta.json" ] || R synthcity --out "$OUT/abl_corpus" --seed 11 --size-km 3
    [ -f "$OUT/abl_corpus_ds/meta.json" ] || R build-dataset --from-synthcity "$OUT/abl_corpus" --out "$OUT/abl_corpus_ds"
    [ -f "$OUT/abl_city/meta.json" ] || R synthcity --out "$OUT/abl_city" --seed 22 --size-km 2.5
    [ -f "$OUT/abl_city_ds/meta.json" ] || R build-dataset --from-synthcity "$OUT/abl_city" --out "$OUT/abl_city_ds"
    ABL_CACHE=$(T --data "$OUT/abl_corpus_ds")
    R ablate --pretrain-data "$OUT/abl_corpus_ds" --teachers "$ABL_CACHE" --data "$OUT/abl_city_ds" --preset "$PRESET" --steps "$ABL_STEPS" \
        --pretrain-batch-size 8 --pretrain-lr "$LR" --warmup-steps 3 --tasks urban_village,population --runs 3 \
        --out "$OUT/ablation"
fi
