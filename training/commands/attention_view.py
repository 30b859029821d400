"""``refound attention-view``: where do a region's POIs of one category look on its image? (paper 5.2.3, Figure 4)

Draws one layer's attention from the category's POI tokens to the satellite-image patches
(averaged over heads and tokens) as a heat overlay on the cell's image, with the POIs marked.
Give ``--checkpoint`` twice to compare, e.g. the "w/o CMSA" variant and ReFound as in Figure 4::

    refound attention-view --checkpoint runs/ablation/checkpoints/no_cmsa \\
        --checkpoint runs/ablation/checkpoints/full --data city_ds --index 12 --category convenience --out fig4.png
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="ReFound checkpoint folder; repeat to draw several side by side")
    p.add_argument("--label", action="append", default=None,
                   help="panel title of each --checkpoint, in order (default: folder name)")
    p.add_argument("--data", required=True, metavar="DS", help="region dataset folder holding the cell")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cell", metavar="CELL_ID", help="cell id, e.g. EPSG:32650/256/12_40")
    where.add_argument("--index", type=int, metavar="I", help="cell index in the dataset")
    p.add_argument("--category", required=True, metavar="NAME", help="POI category (as in the dataset)")
    p.add_argument("--layer", type=int, default=-1, help="transformer layer (default -1 = last, as in the paper)")
    p.add_argument("--normalize", choices=("patches", "none"), default="patches",
                   help="patches = each token's attention re-normalised over the image patches (map sums to 1; "
                        "default); none = raw attention probabilities")
    p.add_argument("--seed", type=int, default=0, help="seed of the POI featurisation (Z-order ties, truncation)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", required=True, metavar="PNG", help="output PNG")


def run(args) -> int:
    from training.finetune.attention_view import attention_view

    views = attention_view(args.checkpoint, args.data, args.category, args.out, cell=args.cell, index=args.index,
                           layer=args.layer, normalize=args.normalize, seed=args.seed, labels=args.label,
                           device=args.device)
    for v in views:
        peak = divmod(int(v.map.argmax()), v.map.shape[1])
        print(f"{v.label}: layer {v.layer}, {len(v.poi_indices)} POIs / {len(v.token_positions)} tokens of "
              f"{v.category!r}, share of attention on image patches {v.patch_mass:.3f}, peak patch (row, col) {peak}")
    print(f"wrote {args.out}")
    return 0
