"""Helpers of bench_inference.py (kept apart for the 300-line rule): the Helsinki-like POI
density case, the machine load, and the summary line.

Helsinki-like density (issue 18): every region holds ``Poisson(50)`` POIs drawn (with
replacement) from the real central-Helsinki OpenStreetMap POIs in ``shared/data/helsinki``
(ODbL, (c) OpenStreetMap contributors); its POI-token length is what the featuriser makes of
them: [P] CLS + per POI its name tokens (the project's default tokenizer) and a [SEP], clipped to
the model's L_P. Only the lengths matter for speed; the token ids are drawn at random.
"""
from __future__ import annotations

import os
from pathlib import Path

HELSINKI_PBF = Path("helsinki") / "Helsinki.osm.pbf"


def shared_dir() -> Path:
    """The read-only shared data folder (REFOUND_SHARED, else ``../shared`` next to the repo)."""
    env = os.environ.get("REFOUND_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def helsinki_lengths(n: int, max_tokens: int, seed: int, per_cell: float = 50.0, data_dir=None) -> list:
    """POI-token lengths of ``n`` regions at a Helsinki-like density (module docstring)."""
    import numpy as np

    from refound_core.data.poi_sources import read_osm_pois
    from refound_core.data.tokenizer import PoiTokenizer

    pbf = Path(data_dir or shared_dir() / "data") / HELSINKI_PBF
    if not pbf.exists():
        raise FileNotFoundError(f"Helsinki POIs not found at {pbf}; set REFOUND_SHARED to the shared folder")
    names = list(read_osm_pois(pbf).names)
    per_poi = np.array([len(t) + 1 for t in PoiTokenizer.default().encode_names(names)])  # + [SEP]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(per_cell, size=n)
    return [int(min(max_tokens, 1 + per_poi[rng.integers(0, len(per_poi), c)].sum())) for c in counts]


def machine_load() -> dict:
    """1/5/15-minute load averages and the CPU count (the box may be shared)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cpus": os.cpu_count()}


def summary(rows: list, case: str = "refound-helsinki") -> dict:
    """The issue-18 summary of the realistic-density case: ReFound in the precision the predictor
    picks (bf16 when timed, else fp32) vs the naive pipeline in fp32 and in bf16 (regions/s
    ratios), and its fraction of the measured bf16 matmul peak. Missing rows give None."""
    def rate(name, prec):
        r = next((r for r in rows if r.get("case") == name and r.get("precision") == prec and "regions_per_s" in r), None)
        return r
    base = "baseline BERT+ViT (512 tok)"
    ours = rate(case, "bf16 autocast") or rate(case, "fp32")
    nf, nb = rate(base, "fp32"), rate(base, "bf16 autocast")
    return {"case": case, "precision": ours and ours["precision"],
            "vs_naive_fp32": ours and nf and ours["regions_per_s"] / nf["regions_per_s"],
            "vs_naive_bf16": ours and nb and ours["regions_per_s"] / nb["regions_per_s"],
            "peak_fraction": ours and ours["frac_of_bf16_peak"]}
