"""Real-imagery probe: how much a frozen image embedding knows about a per-crop target.

For each embedding (a checkpoint's image-side region token h[S], the same architecture at random
initialisation, a visual teacher's pooled features: EfficientNet-Lite0 or GeoEmbed V3, and eight
pixel statistics as the floor any learned embedding must clear) a standardised ridge regression
predicts the target (building fraction, count or mean footprint size); folds are whole scenes
(source images), so overlapping crops of one image never sit on both sides, and alpha is chosen
inside each training fold over its scenes too (:func:`_fit_ridge`). Reported: R²
over the folds (mean, sd, several fold seeds), the effective rank of the centred embeddings (exp of
the entropy of the normalised squared singular values, Roy & Vetterli 2007) and the variance share
of the top principal component -- a collapsed embedding has effective rank near 1 and a top share
near 1.
"""
from __future__ import annotations

import itertools

import numpy as np

from refound_core.errors import InputError

ALPHAS = np.logspace(-2, 6, 17)


def scene_groups(dataset) -> tuple:
    """``(codes int [N], names)``: the scene of each cell, the part of its cell_id before the last '/'
    (``refound build-corpus`` writes ``<scene>/<col>_<row>``)."""
    scenes = [cid.rsplit("/", 1)[0] for cid in dataset.cell_ids]
    names, codes = np.unique(np.asarray(scenes, dtype=object), return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def grouped_folds(groups, k: int, seed: int) -> list:
    """``[(train_idx, test_idx)] * k``: the unique groups, shuffled with ``seed``, dealt round-robin
    to ``k`` folds (``k`` capped at the number of groups), so no group is in both halves of a fold."""
    groups = np.asarray(groups)
    unique = np.unique(groups)
    if len(unique) < 2:
        raise InputError(f"the probe needs regions from at least 2 scenes for grouped folds, got {len(unique)}")
    k = max(2, min(int(k), len(unique)))
    order = np.random.default_rng(seed).permutation(unique)
    fold_of = {g: i % k for i, g in enumerate(order)}
    assign = np.array([fold_of[g] for g in groups])
    return [(np.flatnonzero(assign != f), np.flatnonzero(assign == f)) for f in range(k)]


def effective_rank(x) -> tuple:
    """``(effective rank, top principal component's variance share)`` of the rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    power = s ** 2
    total = power.sum()
    if total <= 0:
        return 0.0, 1.0
    p = power / total
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum())), float(p.max())


ALPHA_CV = ("scenes", "loo")


def _fit_ridge(x, y, groups, alpha_cv: str, seed: int):
    """Standardised ridge fitted on one training fold, alpha chosen inside it.

    ``scenes`` (default): alpha by grouped CV over the training fold's own scenes (up to 5 inner
    folds, R² scored), so neighbouring crops of one scene, which overlap and are near duplicates,
    never sit on both sides of the choice. ``loo``: scikit-learn's efficient leave-one-out over crops
    (the probe's first protocol); it leaks those near duplicates and picks too small an alpha, which
    lets a read-out fit scene-specific directions and extrapolate wildly on a held-out scene.
    A training fold with fewer than 3 scenes has too few for inner folds and uses ``loo``."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if alpha_cv not in ALPHA_CV:
        raise InputError(f"alpha_cv {alpha_cv!r} is not one of {ALPHA_CV}")
    if alpha_cv == "loo" or len(np.unique(groups)) < 3:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(x, y)
    inner = grouped_folds(groups, 5, seed)
    search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": ALPHAS}, cv=inner,
                          scoring="r2")
    return search.fit(x, y).best_estimator_


def ridge_r2(x, y, groups, *, folds: int = 5, seeds=(0, 1, 2), alpha_cv: str = "scenes") -> dict:
    """Grouped-CV R² of a standardised ridge regression (alpha chosen inside each training fold, see
    :func:`_fit_ridge`); returns mean / sd over all folds of all seeds, the per-seed means and every
    fold value."""
    from sklearn.metrics import r2_score

    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    values, per_seed, pooled = [], [], []
    for seed in seeds:
        seed_vals, oof = [], np.empty_like(y)
        for train, test in grouped_folds(groups, folds, seed):
            model = _fit_ridge(x[train], y[train], groups[train], alpha_cv, seed)
            oof[test] = model.predict(x[test])
            seed_vals.append(float(r2_score(y[test], oof[test])))
        values += seed_vals
        per_seed.append(float(np.mean(seed_vals)))
        pooled.append(float(r2_score(y, oof)))
    return {"r2_mean": float(np.mean(values)), "r2_sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "r2_per_seed": per_seed, "r2_folds": values,
            # one R² over all out-of-fold predictions per fold seed: steadier than per-fold R² when a
            # test fold holds few scenes with little spread of the target
            "r2_pooled_mean": float(np.mean(pooled)), "r2_pooled": pooled}


def checkpoint_image_embeddings(checkpoint, dataset, *, random_seed=None, device: str = "cpu",
                                batch_size: int = 16):
    """h[S] ``float32 [N, H]`` of every region, image modality only (the regions have no POIs or the
    POI token is ignored); ``random_seed`` set: the checkpoint's architecture at random initialisation."""
    from refound_core.model.checkpoint import load_checkpoint
    from training.finetune.refound_methods import _fresh_backbone, region_embeddings
    from training.finetune.regions import featurizer_for_checkpoint

    loaded = load_checkpoint(checkpoint, map_location="cpu", with_head=False)
    model = loaded.model if random_seed is None else _fresh_backbone(loaded, int(random_seed))
    feat = featurizer_for_checkpoint(loaded)
    tokens, presence = region_embeddings(model, dataset, feat, loaded.config.image_size, batch_size=batch_size,
                                         device=device)
    if not presence[:, 1].all():
        raise InputError(f"{int((~presence[:, 1]).sum())} regions of {dataset.folder} have no image; the probe "
                         "needs an image in every region (build it with `refound build-corpus`)")
    return tokens[:, 1], loaded


def teacher_image_embeddings(dataset, *, teacher: str = "efficientnet", device: str = "cpu",
                             batch_size: int = 32):
    """A visual teacher's pooled features of every region's image: ``efficientnet`` (ImageNet
    EfficientNet-Lite0, 1,280-d, the default DVFM teacher) or ``geoembed`` (aerial SSL ResNet-18, 512-d)."""
    from refound_core.teachers import build_teachers

    teacher = build_teachers({"visual": teacher, "device": device}).visual
    out = []
    for start in range(0, len(dataset), batch_size):
        images = [np.array(dataset.images[i]) for i in range(start, min(start + batch_size, len(dataset)))]
        out.append(teacher.embed_images(images))
    return np.concatenate(out).astype(np.float32), teacher.identity()


def pixel_statistics(images, valid=None) -> np.ndarray:
    """``float32 [N, 8]``, the probe's floor: per-crop mean and sd of R, G, B (in [0, 1]) and the mean
    absolute grey-level difference between neighbouring pixels along x and along y (edge density).
    Written by hand (eight numbers, no library computes this set). An embedding that does not beat
    these eight numbers has not shown that it knows more than colour and texture.

    ``valid`` (optional, one bool ``[H, W]`` mask or None per image, as ``RegionSample.image_valid``)
    restricts every statistic to the crop's valid pixels, and each difference to pairs of valid
    neighbours, so the no-data fill of a partial crop never enters the floor."""
    out = []
    masks = valid if valid is not None else itertools.repeat(None)
    for image, ok in zip(images, masks):
        im = np.asarray(image, dtype=np.float32)[..., :3] / 255.0
        ok = np.ones(im.shape[:2], bool) if ok is None else np.asarray(ok, dtype=bool)
        if not ok.any():
            raise InputError("pixel_statistics: a crop has no valid pixel; a probe set needs imagery in every "
                             "crop (rebuild it with `refound build-corpus --min-coverage`, which drops crops "
                             "mostly outside the image)")
        grey = im.mean(axis=-1)
        flat = im[ok]
        dx = np.abs(np.diff(grey, axis=1))[ok[:, 1:] & ok[:, :-1]]
        dy = np.abs(np.diff(grey, axis=0))[ok[1:, :] & ok[:-1, :]]
        out.append(np.r_[flat.mean(0), flat.std(0), dx.mean() if dx.size else 0.0, dy.mean() if dy.size else 0.0])
    return np.asarray(out, dtype=np.float32)


def probe_row(name: str, kind: str, x, y, groups, *, folds: int, seeds, source: str = "",
              alpha_cv: str = "scenes") -> dict:
    """One table row: R² over grouped folds plus the embedding's effective rank and top-PC share."""
    rank, top = effective_rank(x)
    return {"name": name, "kind": kind, "source": source, "dim": int(np.asarray(x).shape[1]),
            **ridge_r2(x, y, groups, folds=folds, seeds=seeds, alpha_cv=alpha_cv),
            "effective_rank": rank, "top_pc_share": top}


def mean_row(rows, name: str) -> dict:
    """The mean of several rows of one kind (random initialisations of several seeds): every R²,
    rank and share averaged; ``r2_sd`` is the spread of the rows' pooled R² (seed to seed), and
    ``members`` names the rows."""
    pooled = [r["r2_pooled_mean"] for r in rows]
    return {"name": name, "kind": rows[0]["kind"] + " mean", "source": rows[0]["source"], "dim": rows[0]["dim"],
            "r2_mean": float(np.mean([r["r2_mean"] for r in rows])),
            "r2_sd": float(np.std(pooled, ddof=1)) if len(pooled) > 1 else 0.0,
            "r2_pooled_mean": float(np.mean(pooled)), "r2_pooled": pooled,
            "effective_rank": float(np.mean([r["effective_rank"] for r in rows])),
            "top_pc_share": float(np.mean([r["top_pc_share"] for r in rows])),
            "members": [r["name"] for r in rows]}
