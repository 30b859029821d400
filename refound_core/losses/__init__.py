"""ReFound's five pre-training objectives (paper 4.2) and their combination (paper 4.3).

    L = L_DLFM + L_DVFM + L_DVLFM + L_MGDM + L_CMSA

Each objective lives in its own module as ``compute_<name>(outputs, batch, heads) -> dict`` of
named scalar tensors: the entry named after the objective is its loss, the others are detached
diagnostics for the log. :class:`LossConfig` holds the weights and the ablation switches of
paper 5.2.2 (``w/o MoGE`` is ``ModelConfig.use_moge=False``, not a loss switch); ablations are
configuration, not code forks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refound_core.config_keys import unknown_keys
from refound_core.losses.cmsa import cmsa_targets, compute_cmsa  # noqa: F401
from refound_core.losses.dlfm import compute_dlfm
from refound_core.losses.dvfm import compute_dvfm, compute_dvfm_patch
from refound_core.losses.dvlfm import compute_dvlfm
from refound_core.losses.mgdm import compute_mgdm
from refound_core.losses.pretrain_heads import PretrainHeads  # noqa: F401

OBJECTIVES = ("dlfm", "dvfm", "dvlfm", "mgdm", "cmsa")
DISTILLATION = ("dlfm", "dvfm", "dvlfm")
# Paper 5.2.2 ablations -> the objectives each one switches off.
ABLATIONS = {
    "dlfm": ("dlfm",),
    "dvfm": ("dvfm",),
    "dvlfm": ("dvlfm",),
    "dist": DISTILLATION,            # w/o Dist: all three distillations
    "mgdm": ("mgdm", "cmsa"),        # w/o MGDM: CMSA needs the masked patches, so it goes too
    "cmsa": ("cmsa",),
}


@dataclass
class LossConfig:
    """Which objectives run, their weights, and the masking / distillation hyper-parameters.

    Attributes:
        dlfm, dvfm, dvlfm, mgdm, cmsa: switches (all on = the full ReFound objective).
        w_dlfm ... w_cmsa: weights in the total loss (paper 4.3: all 1).
        temperature: DVLFM softmax temperature for both similarity matrices (A.2.1: 0.07).
        poi_mask_ratio, mask_token_prob, random_token_prob: MGDM POI masking (A.2.1: 15%, 80/10/10).
        patch_mask_ratio: MGDM share of masked image patches (A.2.1: 40%).
        min_block_patches: BEiT's smallest masking block (16 patches).
        dvlfm_proj_dim: width of mu_POI / mu_Sate (paper: unspecified; 0 = hidden size).
        w_dvfm_patch: weight of the dense DVFM term (per-patch teacher features; an addition to
            the paper, docs/PRETRAINING.md choice 16). 0 (default) = off, the paper's objective; it
            runs only with DVFM on and needs a teacher cache with patch features.
        teacher_targets: how u_P, u_S and v_S (and the patch features) are normalised before distillation: ``centered``
            (default: minus the corpus mean, which stops the student from collapsing onto the
            teachers' shared direction), ``zscore``, or ``raw`` (the paper read literally);
            see ``refound_core.teachers.cache`` and docs/PRETRAINING.md.
    """

    dlfm: bool = True
    dvfm: bool = True
    dvlfm: bool = True
    mgdm: bool = True
    cmsa: bool = True
    w_dlfm: float = 1.0
    w_dvfm: float = 1.0
    w_dvlfm: float = 1.0
    w_mgdm: float = 1.0
    w_cmsa: float = 1.0
    w_dvfm_patch: float = 0.0
    temperature: float = 0.07
    poi_mask_ratio: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    patch_mask_ratio: float = 0.4
    min_block_patches: int = 16
    dvlfm_proj_dim: int = 0
    teacher_targets: str = "centered"

    def __post_init__(self):
        for name in ("poi_mask_ratio", "mask_token_prob", "random_token_prob", "patch_mask_ratio"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"LossConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError("mask_token_prob + random_token_prob must not exceed 1")
        if self.teacher_targets not in ("raw", "centered", "zscore"):
            raise ValueError(f"LossConfig.teacher_targets must be raw, centered or zscore, got {self.teacher_targets!r}")
        if self.w_dvfm_patch < 0:
            raise ValueError(f"LossConfig.w_dvfm_patch must not be negative, got {self.w_dvfm_patch}")
        if self.temperature <= 0:
            raise ValueError(f"LossConfig.temperature must be positive, got {self.temperature}")

    def active(self) -> tuple:
        """Objectives that run, in paper order. CMSA runs only with MGDM (it needs M_S); the dense
        DVFM term (not one of the paper's five) comes right after DVFM when its weight is positive."""
        on = [name for name in OBJECTIVES if getattr(self, name)]
        if "cmsa" in on and "mgdm" not in on:
            on.remove("cmsa")
        if "dvfm" in on and self.w_dvfm_patch > 0:
            on.insert(on.index("dvfm") + 1, "dvfm_patch")
        return tuple(on)

    @property
    def masking(self) -> bool:
        """Whether inputs are corrupted (only MGDM and CMSA need masks)."""
        return "mgdm" in self.active()

    def weight(self, name: str) -> float:
        return float(getattr(self, f"w_{name}"))

    def without(self, *ablations: str) -> "LossConfig":
        """A copy with paper ablations applied: ``without("dist")`` is "w/o Dist", etc."""
        off = {}
        for ab in ablations:
            key = ab.lower().removeprefix("w/o").strip().removeprefix("no-").removeprefix("no_")
            if key not in ABLATIONS:
                raise ValueError(f"unknown ablation {ab!r}; choose from {sorted(ABLATIONS)} (w/o MoGE is a "
                                 "model setting: ModelConfig.use_moge=False)")
            off.update({name: False for name in ABLATIONS[key]})
        return dataclasses.replace(self, **off)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        unknown, known = unknown_keys(cls, d)
        if unknown:
            raise ValueError(f"unknown loss config keys {unknown}; known: {known}")
        return cls(**d)


_COMPUTE = {"dlfm": compute_dlfm, "dvfm": compute_dvfm, "dvfm_patch": compute_dvfm_patch, "mgdm": compute_mgdm,
            "cmsa": compute_cmsa}


def compute_losses(outputs, batch: dict, heads, cfg: LossConfig) -> dict:
    """All enabled objectives and their weighted sum (paper 4.3).

    Args:
        outputs: the backbone's ``ReFoundOutput`` on the (possibly masked) batch.
        batch: the collated batch with teacher targets and masks (training.pretrain.data).
        heads: :class:`PretrainHeads` built with the same ``cfg``.

    Returns:
        ``{"loss": total, "<objective>": loss, ...diagnostics}``; only ``loss`` carries gradients
        that the caller needs, the per-objective entries are graph tensors too (call ``.detach()``
        before logging).
    """
    out: dict = {}
    total = None
    for name in cfg.active():
        if name == "dvlfm":
            terms = compute_dvlfm(outputs, batch, heads, temperature=cfg.temperature)
        else:
            terms = _COMPUTE[name](outputs, batch, heads)
        out.update(terms)
        weighted = terms[name] * cfg.weight(name)
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("every pre-training objective is switched off; enable at least one")
    out["loss"] = total
    return out


__all__ = ["LossConfig", "compute_losses", "PretrainHeads", "OBJECTIVES", "ABLATIONS", "cmsa_targets",
           "compute_dlfm", "compute_dvfm", "compute_dvfm_patch", "compute_dvlfm", "compute_mgdm", "compute_cmsa"]

