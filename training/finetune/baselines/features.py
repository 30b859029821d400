"""Feature-based prediction on frozen teacher features (paper 4.3 "feature-based prediction",
A.2.3): the reference any region embedding must beat, since ReFound distils exactly these models.

A region is described by
* ``u_P``: the sentence embedding (USE multilingual by default) of the region's template
  description (what DLFM distils, paper Eq. 2) or, with ``teacher_text="names"``, of its POI
  names joined in Z-order;
* ``u_S``: the pooled EfficientNet-Lite0 feature of its image (what DVFM distils, Eq. 4);
each z-scored with training-split statistics, concatenated with two presence flags (a missing
modality is all zeros, i.e. the training mean), and fed to a 2-layer MLP (A.2.3): only the MLP is
trained. The features are computed once per (teachers, dataset) and cached.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from refound_core.errors import InputError
from training.finetune.baselines import common
from training.finetune.methods import Method, MethodResult, Split, register
from training.finetune.tasks import TaskSpec

TEXT_MODES = ("description", "names")
NAME_SEPARATOR = ", "


def resolve_teachers(spec_or_teachers=None, device: str = "cpu"):
    """A ``refound_core.teachers.Teachers`` (used as is) or a teacher spec dict (default: template
    describer, USE sentence embedder, EfficientNet-Lite0 on ``device``; ``{"preset": "stub"}`` for tests).
    The template describer is the default here, unlike pre-training's SmolLM2, because `refound
    evaluate` passes the checkpoint's own describer (:func:`describer_of_checkpoint`): the teacher
    baseline sees the descriptions ReFound distilled."""
    if spec_or_teachers is not None and not isinstance(spec_or_teachers, dict):
        for role in ("describer", "sentence", "visual"):
            if not hasattr(spec_or_teachers, role):
                raise InputError(f"option 'teachers' must be a teacher spec dict or a Teachers object; "
                                 f"{type(spec_or_teachers).__name__} has no {role}")
        return spec_or_teachers
    from refound_core.teachers import build_teachers

    spec = dict(spec_or_teachers or {})
    if spec.get("preset") != "stub":
        spec.setdefault("describer", "template")
    return build_teachers({"device": device, **spec})


def describer_of_checkpoint(teachers: dict) -> str:
    """The registry name of the describer a checkpoint's DLFM distilled (``teachers`` as from
    ``refound_core.model.checkpoint.teachers_of``): ``smollm2`` or ``template`` (the default when
    none is recorded, e.g. random or converted weights)."""
    ident = str(teachers.get("describer", "")).lower()
    return "smollm2" if ident.startswith("local-llm(") and "smollm2" in ident else "template"


def feature_key(dataset, teachers, text_mode: str) -> dict:
    key = {"kind": "teacher_features/v1", "text": text_mode, "sentence": teachers.sentence.identity(),
           "visual": teachers.visual.identity(), "dataset": common.dataset_identity(dataset)}
    if text_mode == "description":
        key["describer"] = teachers.describer.identity()
    else:
        key["names"] = f"zorder(seed=0),sep={NAME_SEPARATOR!r}"
    return key


def compute_teacher_features(dataset, teachers, text_mode: str = "description", batch_size: int = 32) -> dict:
    """``u_P [N, d_text]``, ``u_S [N, d_image]`` (float32), ``poi_valid``, ``image_valid`` (bool)
    for every region of ``dataset``; rows without the modality are zeros."""
    from refound_core.teachers.sentence import embed_long_texts

    if text_mode not in TEXT_MODES:
        raise InputError(f"teacher_text {text_mode!r} is not one of {TEXT_MODES}")
    n = len(dataset)
    u_P = np.zeros((n, int(teachers.sentence.dim)), dtype=np.float32)
    u_S = np.zeros((n, int(teachers.visual.dim)), dtype=np.float32)
    poi_valid = np.zeros(n, dtype=bool)
    image_valid = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(0)  # Z-order ties: fixed, the features are frozen once for all runs
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            samples = [dataset[i] for i in idx]
            with_pois = [(i, s) for i, s in zip(idx, samples) if s.has_pois]
            if with_pois:
                if text_mode == "description":
                    texts = teachers.describer.describe_batch([(list(s.poi_names), list(s.poi_categories))
                                                               for _, s in with_pois])
                else:
                    texts = [NAME_SEPARATOR.join(n.strip() for n in common.zordered_names(s, rng) if n and n.strip())
                             for _, s in with_pois]
                keep = [(i, t) for (i, _), t in zip(with_pois, texts) if t and t.strip()]
                if keep:
                    rows = [i for i, _ in keep]
                    u_P[rows] = embed_long_texts(teachers.sentence, [t for _, t in keep])
                    poi_valid[rows] = True
            images = [(i, s.image) for i, s in zip(idx, samples) if s.has_image]
            if images:
                rows = [i for i, _ in images]
                u_S[rows] = np.asarray(teachers.visual.embed_images([im for _, im in images]), dtype=np.float32)
                image_valid[rows] = True
    return {"u_P": u_P, "u_S": u_S, "poi_valid": poi_valid, "image_valid": image_valid}


def standardize(block: np.ndarray, valid: np.ndarray, train: np.ndarray) -> np.ndarray:
    """z-score with the mean / std of the valid training rows, clipped to +-5; invalid rows stay 0.

    The clip matters with few training regions: a feature almost constant on them has a tiny std,
    and an unseen region then sits hundreds of deviations away and drives the MLP's output (and,
    for log targets, its expm1) to absurd values."""
    ref = block[train[valid[train]]]
    if len(ref) == 0:
        return np.zeros_like(block, dtype=np.float32)
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    out = np.clip((block - mean) / std, -5.0, 5.0)
    out[~valid] = 0.0
    return out.astype(np.float32)


class FeatureMLP(nn.Module):
    """The 2-layer MLP predictor ``dense -> GELU -> dropout -> decoder`` (as ReFound's head, A.2.3)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, dropout: float = 0.1):
        super().__init__()
        from timm.layers import Mlp, trunc_normal_

        self.mlp = Mlp(in_features, hidden, out_features, act_layer=nn.GELU, drop=(dropout, 0.0))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mlp(x)


@register
class TeacherFeatures(Method):
    name = "teacher_features"
    stands_in_for = ("Feature-based reference, no single paper baseline: the frozen teachers ReFound distils "
                     "(paper: M3E-base on ChatGLM-6B descriptions + CN-CLIP ViT-L/14 images; offline: USE "
                     "multilingual on template descriptions + EfficientNet-Lite0) with a 2-layer MLP, in the "
                     "place of the region embedding baselines HGI / MMGR / PG-SimCLR (A.1), whose trained "
                     "models are not available.")
    mode = "feature-based"
    default_lr = common.LR_FEATURES
    hidden = 768  # the head width of ReFound-base (dense H -> H with H = 768, A.2.2)

    def teachers(self):
        return resolve_teachers(common.option(self.ctx, "teachers", None), self.ctx.device)

    def features(self) -> dict:
        """Cached teacher features of the whole dataset (computed on first use)."""
        ctx = self.ctx
        teachers = self.teachers()
        mode = str(common.option(ctx, "teacher_text", "description"))
        if mode not in TEXT_MODES:
            raise InputError(f"teacher_text {mode!r} is not one of {TEXT_MODES}")
        key = feature_key(ctx.dataset, teachers, mode)
        return common.FeatureCache(ctx.cache_dir).get_or_compute(
            key, lambda: compute_teacher_features(ctx.dataset, teachers, mode))

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        ctx = self.ctx
        f = self.features()
        train = np.asarray(split.train, dtype=np.int64)
        poi_valid, image_valid = f["poi_valid"].astype(bool), f["image_valid"].astype(bool)
        x = np.concatenate([standardize(f["u_P"], poi_valid, train), standardize(f["u_S"], image_valid, train),
                            poi_valid[:, None].astype(np.float32), image_valid[:, None].astype(np.float32)], axis=1)
        x = torch.from_numpy(x).to(ctx.device)
        torch.manual_seed(seed)
        model = FeatureMLP(x.shape[1], int(common.option(ctx, "teacher_hidden", self.hidden)), task.num_outputs)

        def forward(batch):
            return model(x[torch.as_tensor(batch, device=x.device)])

        return common.train_supervised(ctx, task, split, seed, model, forward,
                                       common.IndexBatches(ctx.batch_size, seed), common.peak_lr(ctx, self.default_lr))
