#!/usr/bin/env python3
"""`make demo`: the whole product on a fresh 2-core machine, end to end, with visible progress.

1. a synthetic pre-training corpus and a separate downstream city (different seed);
2. pre-training of refound_small with all five objectives for a short fixed budget, or reuse of
   the checkpoint a previous demo made from the same inputs;
3. urban-village and population heads, and the evaluation table against baselines;
4. the QGIS Processing algorithms run headless over the downstream city -> styled GeoPackages;
5. PNG maps rendered by QGIS (imagery underneath, styled cells, legend);
6. population prediction over the real Helsinki POIs (OpenStreetMap + HSY grid), and its map.

`--full` runs the paper-size recipe (refound_base, bigger cities, longer pre-training), meant for
a GPU machine. Everything lands in demo_out/ (or --out).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REFOUND_SHARED", REPO.parent / "shared"))
HELSINKI_POIS = SHARED / "data/helsinki/Helsinki.osm.pbf"
HELSINKI_POP = SHARED / "data/helsinki/helsinki_population_grid_2020.gpkg"

# A short budget needs a higher peak lr and a short warm-up than the paper's 300 epochs (5e-5, 5 epochs).
# The corpus and city sizes and 120 steps are the smallest recipe whose pre-training measurably pays on
# urban villages (docs/EVALUATION.md "Current standing"); the template describer is the labelled fast
# option of DLFM (SmolLM2 descriptions take ~10 min more on 2 cores, docs/PRETRAINING.md).
QUICK = dict(preset="small", corpus_seed=11, corpus_km=6.0, city_seed=22, city_km=4.0, steps=120, batch=8,
             lr=5e-4, warmup_steps=10, eval_runs=5, feature_epochs=40, describer="template")
FULL = dict(preset="base", corpus_seed=11, corpus_km=12.0, city_seed=22, city_km=6.0, steps=6000, batch=80,
            lr=1e-4, warmup_steps=300, eval_runs=5, feature_epochs=40, describer="smollm2")

T0 = time.time()


def say(msg: str) -> None:
    print(f"\n[demo {time.time() - T0:6.0f} s] {msg}", flush=True)


def refound(*args) -> None:
    """Run one `refound` subcommand in its own process (fresh memory, live output)."""
    cmd = [sys.executable, "-m", "training.cli", *map(str, args)]
    print("$ refound " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def teacher_cache(data, describer: str) -> str:
    """`refound teachers` on ``data``; returns the cache folder it wrote or reused. Pre-training is
    pointed at it explicitly: a demo folder from older code also holds caches of older teachers or
    cache formats, among which `refound pretrain` would refuse to guess."""
    cmd = [sys.executable, "-m", "training.cli", "teachers", "--data", str(data), "--describer", describer, "--json"]
    print(f"$ refound teachers --data {data} --describer {describer} --json", flush=True)
    res = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout[res.stdout.index("{"):])["cache"]


def source_digest() -> str:
    """Identity of the code that shapes a pre-trained checkpoint (model, objectives, data, teachers)."""
    h = hashlib.sha256()
    for sub in ("refound_core/model", "refound_core/losses", "refound_core/data", "refound_core/teachers",
                "training/pretrain"):
        for f in sorted((REPO / sub).rglob("*.py")):
            h.update(f.relative_to(REPO).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="output folder (default demo_out/)")
    ap.add_argument("--full", action="store_true", help="paper-size recipe (refound_base; for a GPU)")
    ap.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    ap.add_argument("--skip-qgis", action="store_true", help="stop before the QGIS steps")
    args = ap.parse_args(argv)
    p = FULL if args.full else QUICK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus, city = out / f"corpus_seed{p['corpus_seed']}", out / f"city_seed{p['city_seed']}"
    corpus_ds, city_ds = out / "corpus_ds", out / "city_ds"
    say(f"1/6 synthetic cities: pre-training corpus (seed {p['corpus_seed']}, {p['corpus_km']} km) and "
        f"downstream city (seed {p['city_seed']}, {p['city_km']} km)")
    for folder, seed, km, ds in ((corpus, p["corpus_seed"], p["corpus_km"], corpus_ds),
                                 (city, p["city_seed"], p["city_km"], city_ds)):
        if not (folder / "meta.json").exists():
            refound("synthcity", "--out", folder, "--seed", seed, "--size-km", km)
        if not (ds / "meta.json").exists():
            refound("build-dataset", "--from-synthcity", folder, "--out", ds)

    say(f"2/6 pre-training refound_{p['preset']} with DLFM + DVFM + DVLFM + MGDM + CMSA ({p['steps']} steps)")
    key = {"params": p, "code": source_digest()}
    ckpt = out / f"pretrained_{p['preset']}"
    key_file = out / f"pretrained_{p['preset']}.key.json"
    if ckpt.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        print(f"inputs unchanged: reusing {ckpt}")
    else:
        shutil.rmtree(ckpt, ignore_errors=True)
        cache = teacher_cache(corpus_ds, p["describer"])
        refound("pretrain", "--preset", p["preset"], "--data", corpus_ds, "--teachers", cache, "--steps", p["steps"],
                "--batch-size", p["batch"], "--lr", p["lr"], "--warmup-steps", p["warmup_steps"],
                "--device", args.device, "--out", ckpt)
        key_file.write_text(json.dumps(key))
        refound("plot-log", ckpt, "--out", out / "pretrain_losses.png")

    say("3/6 downstream heads and the evaluation table (feature-based ReFound vs baselines)")
    heads = {}
    for task in ("urban_village", "population"):
        heads[task] = out / f"head_{task}"
        if not heads[task].exists():
            refound("finetune", "--checkpoint", ckpt, "--data", city_ds, "--task", task, "--mode", "linear",
                    "--device", args.device, "--out", heads[task])
    refound("evaluate", "--data", city_ds, "--checkpoint", ckpt, "--task", "urban_village", "--task", "population",
            "--methods", "refound_feature,refound_scratch_feature,teacher_features", "--runs", p["eval_runs"],
            "--feature-epochs", p["feature_epochs"], "--device", args.device, "--out", out / "evaluation")

    say("real data for step 6: Helsinki OpenStreetMap POIs + HSY population grid (no imagery exists): dataset and head")
    hel = out / "helsinki"
    hel_ds = hel / "dataset"
    hel.mkdir(exist_ok=True)
    hel_pois = hel / "pois.gpkg"
    if not hel_pois.exists():
        export_osm_pois(HELSINKI_POIS, hel_pois)
    if not (hel_ds / "meta.json").exists():
        refound("build-dataset", "--pois", hel_pois, "--population", HELSINKI_POP, "--population-field",
                "population", "--out", hel_ds)
    hel_head = hel / "head_population"
    if not hel_head.exists():
        # a few dozen cells, many with 0 residents: a log1p target collapses towards the geometric
        # mean, so this small head learns persons directly
        refound("finetune", "--checkpoint", ckpt, "--data", hel_ds, "--task", "population", "--mode", "linear",
                "--log-target", "no", "--device", args.device, "--out", hel_head)

    if args.skip_qgis:
        say("done (QGIS steps skipped)")
        return 0
    say("4/6 - 6/6 QGIS: Processing algorithms headless -> styled GeoPackages; maps rendered by QGIS (city and Helsinki)")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen",
               PYTHONPATH=os.pathsep.join([str(REPO), "/usr/share/qgis/python/plugins", os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(REPO / "scripts" / "demo_qgis.py"), "--out", str(out),
                    "--city", str(city), "--uv-head", str(heads["urban_village"]),
                    "--pop-head", str(heads["population"]), "--helsinki-pois", str(hel_pois),
                    "--helsinki-head", str(hel_head), "--helsinki-population", str(HELSINKI_POP)],
                   cwd=REPO, check=True, env=env)

    say("done. Results:")
    for f in sorted(out.glob("*.png")) + sorted(out.glob("*.gpkg")) + [out / "evaluation" / "results.md"]:
        print(f"  {f}")
    print((out / "evaluation" / "results.md").read_text(encoding="utf-8"))
    return 0


def export_osm_pois(pbf: Path, out: Path) -> None:
    """The OSM POIs (name + amenity/shop/tourism/leisure category) as a plain GeoPackage layer, so
    QGIS, build-dataset and the Processing algorithms all read the same fields."""
    import geopandas as gpd
    from shapely.geometry import Point  # noqa: F401 - geopandas needs shapely

    from refound_core.data.poi_sources import read_osm_pois

    t = read_osm_pois(pbf)
    gdf = gpd.GeoDataFrame({"name": t.names, "category": t.categories},
                           geometry=gpd.points_from_xy(t.x, t.y), crs=t.crs)
    tmp = out.with_name(f".{out.name}.tmp.gpkg")
    gdf.to_file(tmp, layer="pois", driver="GPKG", engine="pyogrio", dataset_options={"VERSION": "1.2"})
    os.replace(tmp, out)
    print(f"wrote {out}: {len(gdf)} OpenStreetMap POIs (© OpenStreetMap contributors, ODbL 1.0)")


if __name__ == "__main__":
    sys.exit(main())
