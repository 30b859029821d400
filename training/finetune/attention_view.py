"""Cross-modal spatial alignment made visible (paper 5.2.3, Figure 4).

For the POIs of one category in one region, take one layer's self-attention probabilities from
every token of those POIs to the satellite-image patches, and average them: a
``[patches_per_side, patches_per_side]`` map over the region. With CMSA (paper 4.2.3) the POIs
should attend to the patches they lie in; Figure 4 compares ReFound with its "w/o CMSA" variant.

Choices the paper leaves open (also in docs/ABLATIONS.md):

* tokens: every token of the category's POIs, name tokens and the POI's closing ``[SEP]``
  (which carries the POI's category and grid position too); not the ``[P]`` CLS;
* keys: the N patch tokens only (the ``[S]`` image CLS is not a place on the map);
* "normalized attention scores": with ``normalize="patches"`` (default) each head's attention row
  of each token is restricted to the N patch keys and re-normalised to sum to 1 there, then
  rows are averaged over heads and tokens, so the map sums to 1 and reads as "where on the image
  these POIs look". ``normalize="none"`` keeps the raw softmax probabilities (averaged the same
  way): the map then sums to the share of attention going to image patches at all
  (``CategoryAttention.patch_mass``);
* the model runs in eval mode (no dropout), float32, on one region; the POI sequence is
  featurised as at inference (Z-order, random exclusion only when the POIs overflow L_P, seeded).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError

NORMALIZE = ("patches", "none")


@dataclass
class CategoryAttention:
    """Result of :func:`category_attention`.

    Attributes:
        map: float64 ``[p, p]`` attention over the patch grid, row 0 = north (image row 0).
        cell_id, category: the region and POI category.
        layer: the resolved (non-negative) layer index.
        num_heads: heads averaged.
        token_positions: positions of the averaged tokens in the POI sequence.
        poi_indices: indices (into the sample's POIs) of the category's POIs that were encoded.
        dropped: indices of the category's POIs excluded because the sequence overflowed L_P.
        normalize: ``"patches"`` or ``"none"`` (see module docstring).
        patch_mass: mean share of the raw attention going to image patches (before re-normalising).
        category_known: False when the checkpoint's vocabulary does not know the category ([UNK]).
    """

    map: np.ndarray
    cell_id: str
    category: str
    layer: int
    num_heads: int
    token_positions: list
    poi_indices: list
    dropped: list
    normalize: str
    patch_mass: float
    category_known: bool = True
    label: str = ""
    extra: dict = field(default_factory=dict)


def select_sample(dataset, cell: Optional[str] = None, index: Optional[int] = None):
    """One region of a ``RegionDataset`` by cell id or index, as a ``RegionSample``."""
    if (cell is None) == (index is None):
        raise InputError("choose the region with exactly one of --cell CELL_ID or --index I")
    if cell is not None:
        try:
            index = dataset.index_of(cell)
        except KeyError:
            raise InputError(f"cell {cell!r} is not in the dataset {dataset.folder} ({len(dataset)} cells, ids like "
                             f"{dataset.cell_ids[0] if len(dataset) else '-'}); pass a cell id from it or --index I") from None
    n = len(dataset)
    if not -n <= int(index) < n:
        raise InputError(f"--index {index} is out of range: the dataset {dataset.folder} has {n} cells (0..{n - 1})")
    return dataset[int(index)]


def _category_positions(featurizer, sample, category: str, seed: int):
    """Encode ``sample`` for the model, and find which POI each sequence position belongs to.

    The POI of every token is recovered by encoding the same sample again with a copy of the
    featurizer whose category "vocabulary" is the POI's index (``category_vocab=None`` passes
    integer ids through): Z-ordering and truncation do not look at categories and use the same
    seeded generator, so both encodings have the same layout (checked).
    """
    names = list(sample.poi_names)
    cats = [str(c).strip() if c is not None else "" for c in sample.poi_categories]
    wanted = str(category).strip()
    members = [i for i, c in enumerate(cats) if c == wanted]
    if not names:
        raise InputError(f"region {sample.cell_id} has no POIs, so no POI attends to the image; "
                         "choose a region with POIs (--cell / --index)")
    if not members:
        counts = {}
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
        listed = ", ".join(f"{c!r} ({k})" for c, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:12])
        raise InputError(f"region {sample.cell_id} has no POI of category {wanted!r}; its categories are {listed}. "
                         "Pass one of these with --category")
    encoded = featurizer.encode(sample, np.random.default_rng(seed))
    tracer = copy.copy(featurizer)
    tracer.category_vocab, tracer.category_pad_id = None, 0
    traced = tracer.encode(dataclasses.replace(sample, poi_categories=list(range(1, len(names) + 1))),
                           np.random.default_rng(seed))
    if not np.array_equal(traced.token_ids, encoded.token_ids):  # pragma: no cover - guards the assumption
        raise RuntimeError("featurisation is not deterministic given its seed; cannot trace POI tokens")
    poi_of_token = traced.category_ids - 1  # -1 for the [P] CLS
    member_set = set(members)
    positions = [int(t) for t in np.flatnonzero(poi_of_token >= 0) if int(poi_of_token[t]) in member_set]
    kept = sorted({int(poi_of_token[t]) for t in positions})
    dropped = sorted(member_set - set(kept))
    if not positions:
        raise InputError(f"region {sample.cell_id}: all {len(members)} POIs of category {wanted!r} were excluded "
                         f"because the POI sequence exceeds the model's {featurizer.max_poi_tokens} tokens; "
                         "try another --seed (random exclusion, paper A.2.1) or another region")
    known = featurizer.category_vocab is None or wanted in featurizer.category_vocab
    return encoded, positions, kept, dropped, known


def category_attention(model, featurizer, sample, category: str, *, layer: int = -1, normalize: str = "patches",
                       seed: int = 0, image_size: Optional[int] = None) -> CategoryAttention:
    """Attention from the category's POI tokens to the image patches (see module docstring).

    Args:
        model: a ``ReFound`` (anything with ``config`` and ``forward_batch``).
        featurizer: the checkpoint's ``Featurizer`` (``training.finetune.regions.featurizer_for_checkpoint``).
        sample: a ``RegionSample`` with an image and POIs of ``category``.
        layer: transformer layer, negative counts from the top (-1 = last, as in the paper).
        normalize: ``"patches"`` (map sums to 1) or ``"none"`` (raw probabilities).
        seed: seed of the featurisation's Z-order tie breaks / random exclusion.
    """
    import torch

    if normalize not in NORMALIZE:
        raise InputError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    cfg = model.config
    if not -cfg.num_layers <= int(layer) < cfg.num_layers:
        raise InputError(f"--layer {layer} does not exist: the model has {cfg.num_layers} layers "
                         f"(0..{cfg.num_layers - 1}, or -1 for the last)")
    layer = int(layer) % cfg.num_layers
    if not sample.has_image:
        raise InputError(f"region {sample.cell_id} has no satellite image (coverage {sample.image_coverage:g}); there "
                         "are no image patches to attend to. Choose a region with imagery")
    encoded, positions, kept, dropped, known = _category_positions(featurizer, sample, category, seed)
    batch = featurizer.collate([encoded], image_size or cfg.image_size)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            out = model.forward_batch(batch, output_attentions_layer=layer)
    finally:
        if was_training:
            model.train()
    probs = out.attentions
    if probs is None:
        raise RuntimeError("the model returned no attention probabilities")
    lp, n = out.num_poi_tokens, cfg.num_patches
    probs = probs[0].float()                                    # [heads, L, L]
    if probs.shape[-1] != lp + 1 + n:
        raise RuntimeError(f"attention has {probs.shape[-1]} keys, expected {lp} POI + 1 + {n} image")
    rows = probs[:, positions, lp + 1:]                          # [heads, T, N]: POI tokens -> patches
    mass = rows.sum(-1, keepdim=True)
    if normalize == "patches":
        rows = rows / mass.clamp_min(1e-12)
    amap = rows.mean(dim=(0, 1)).double().cpu().numpy().reshape(cfg.patches_per_side, cfg.patches_per_side)
    return CategoryAttention(map=amap, cell_id=sample.cell_id, category=str(category).strip(), layer=layer,
                             num_heads=int(probs.shape[0]), token_positions=positions, poi_indices=kept,
                             dropped=dropped, normalize=normalize, patch_mass=float(mass.mean()),
                             category_known=bool(known))


def attention_map(model, featurizer, sample, category: str, layer: int = -1, normalize: str = "patches",
                  seed: int = 0) -> np.ndarray:
    """Just the ``[patches_per_side, patches_per_side]`` map of :func:`category_attention`."""
    return category_attention(model, featurizer, sample, category, layer=layer, normalize=normalize, seed=seed).map


def load_for_view(checkpoint, device: str = "cpu"):
    """``(model, featurizer)`` of a checkpoint folder, model in eval mode on ``device``."""
    from refound_core.model.checkpoint import load_checkpoint
    from training.finetune.regions import featurizer_for_checkpoint

    loaded = load_checkpoint(checkpoint, map_location="cpu", with_head=False)
    return loaded.model.to(device).eval(), featurizer_for_checkpoint(loaded)


def _pixel_xy(sample, idx: Sequence[int]) -> np.ndarray:
    """POI locations in image pixel coordinates (column, row; row 0 = north)."""
    xmin, ymin, xmax, ymax = (float(v) for v in sample.bounds)
    h, w = np.asarray(sample.image).shape[:2]
    xy = np.asarray(sample.poi_xy, dtype=np.float64).reshape(-1, 2)[list(idx)]
    return np.column_stack([(xy[:, 0] - xmin) / (xmax - xmin) * w, (ymax - xy[:, 1]) / (ymax - ymin) * h])


def render_attention_png(sample, views: Sequence[CategoryAttention], out_png, title: Optional[str] = None) -> Path:
    """Figure 4 as a PNG: (a) the category's POIs on the image, then one heat overlay per view.

    Written atomically (temporary file in the same folder, then renamed).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(sample.image)
    h, w = image.shape[:2]
    first = views[0]
    others = [i for i, c in enumerate(sample.poi_categories) if str(c).strip() != first.category]
    kept = _pixel_xy(sample, first.poi_indices)
    dropped = _pixel_xy(sample, first.dropped)
    fig, axes = plt.subplots(1, 1 + len(views), figsize=(3.6 * (1 + len(views)) + 0.6, 3.9), squeeze=False)
    axes = axes[0]

    def marks(ax):
        ax.scatter(kept[:, 0], kept[:, 1], s=46, c="white", edgecolors="black", linewidths=1.2, zorder=3,
                   label=first.category)
        if len(dropped):
            ax.scatter(dropped[:, 0], dropped[:, 1], s=40, marker="x", c="white", zorder=3, label="not encoded")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])

    axes[0].imshow(image, extent=(0, w, h, 0))
    if others:
        o = _pixel_xy(sample, others)
        axes[0].scatter(o[:, 0], o[:, 1], s=14, c="#888888", edgecolors="black", linewidths=0.5, zorder=2,
                        label="other POIs")
    marks(axes[0])
    axes[0].set_title(f"(a) {len(first.poi_indices)} POIs: {first.category}", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right", framealpha=0.7)
    letters = "bcdefghij"
    for k, (ax, view) in enumerate(zip(axes[1:], views)):
        ax.imshow(image, extent=(0, w, h, 0))
        # colour range = the map's own min..max (as Figure 4: where attention concentrates);
        # the colour bar keeps the absolute values readable.
        lo, hi = float(view.map.min()), float(view.map.max())
        heat = ax.imshow(view.map, extent=(0, w, h, 0), cmap="jet", alpha=0.55, interpolation="nearest",
                         vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        marks(ax)
        name = view.label or "checkpoint"
        ax.set_title(f"({letters[k % len(letters)]}) {name}\nlayer {view.layer}, {view.num_heads} heads, "
                     f"{len(view.token_positions)} tokens", fontsize=8)
        cb = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        uniform = 1.0 / view.map.size
        cb.set_label(f"attention share (uniform {uniform:.3g})" if view.normalize == "patches"
                     else "attention probability", fontsize=7)
    note = "" if first.category_known else " (category unknown to the checkpoint: embedded as [UNK])"
    fig.suptitle(title or f"POI -> image-patch attention, region {sample.cell_id}{note}", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=130)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out_png


def attention_view(checkpoints: Sequence, data, category: str, out_png, *, cell: Optional[str] = None,
                   index: Optional[int] = None, layer: int = -1, normalize: str = "patches", seed: int = 0,
                   labels: Optional[Sequence[str]] = None, device: str = "cpu") -> list:
    """Compute the map of every checkpoint for one region and category and draw them to ``out_png``.

    Returns the :class:`CategoryAttention` of each checkpoint (in order).
    """
    from refound_core.data.dataset import RegionDataset

    if not checkpoints:
        raise InputError("give at least one --checkpoint CKPT")
    dataset = data if hasattr(data, "cell_ids") else RegionDataset(data)
    sample = select_sample(dataset, cell, index)
    views = []
    for i, ckpt in enumerate(checkpoints):
        model, featurizer = load_for_view(ckpt, device)
        view = category_attention(model, featurizer, sample, category, layer=layer, normalize=normalize, seed=seed)
        view.label = labels[i] if labels and i < len(labels) else Path(ckpt).name
        views.append(view)
    render_attention_png(sample, views, out_png)
    return views
