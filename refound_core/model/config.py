"""Model configuration and the named presets (paper A.2.1 for ``refound_base``).

One dataclass holds the whole architecture; it is saved as JSON inside every checkpoint, so a
checkpoint rebuilds its model without code changes. Field names follow the paper's vocabulary;
``refound_core.model.convert_paddle`` maps the official implementation's names onto them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from refound_core.config_keys import unknown_keys

# Normalisation of satellite images used by the official implementation (SEMANTICS.md 2.5).
OFFICIAL_IMAGE_MEAN = (0.38247773301793103, 0.41271937512626544, 0.3403674447902101)
OFFICIAL_IMAGE_STD = (0.17229526604561052, 0.14788625733896113, 0.16325427643628246)


@dataclass
class ModelConfig:
    """Architecture of ReFound. Defaults are the paper's ``refound_base``.

    Attributes:
        hidden_size, num_layers, num_heads, intermediate_size: transformer shape (paper A.2.1).
        fusion_layer_start: first layer whose FFN is the fused PS-FFN ("top-two layers", 4.1.2);
            ``-1`` means ``num_layers - 2``.
        use_moge: False = the paper's "w/o MoGE" ablation (one shared FFN in every layer).
        vocab_size: POI-name tokenizer vocabulary size (set from the tokenizer).
        num_categories: size of the POI category vocabulary incl. PAD (0) and UNK (1).
        max_poi_tokens: L_P, the maximum POI sequence length incl. the [P] CLS (paper: 512).
        max_word_pos, max_poi_pos: sizes of the word-level / POI-level position tables.
        grid_cells: sub-cells per side for the grid-level position (paper: 16 -> 16x16 + CLS + PAD).
        image_size, patch_size, in_chans: satellite image input (paper: 256, 16, RGB).
        layer_norm_eps: 1e-12 as in the official code (BERT convention).
        hidden_dropout, attention_dropout: dropout probabilities.
        image_mean, image_std: per-channel normalisation of [0,1] pixels.
        type_vocab_size: kept only so official checkpoints load (token type is always 0).
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    fusion_layer_start: int = -1
    use_moge: bool = True
    vocab_size: int = 30522
    num_categories: int = 130
    max_poi_tokens: int = 512
    max_word_pos: int = 512
    max_poi_pos: int = 512
    grid_cells: int = 16
    image_size: int = 256
    patch_size: int = 16
    in_chans: int = 3
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    image_mean: tuple = OFFICIAL_IMAGE_MEAN
    image_std: tuple = OFFICIAL_IMAGE_STD
    type_vocab_size: int = 2
    name: str = "refound_base"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        g, p = self.grid_cells, self.patches_per_side
        if g % p and p % g:
            raise ValueError(f"grid_cells {g} and patches per side {p} must nest (one must divide the other)")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    @property
    def fusion_start(self) -> int:
        """Index of the first PS-FFN layer (num_layers when use_moge is False: no fusion experts)."""
        return self.num_layers - 2 if self.fusion_layer_start < 0 else self.fusion_layer_start

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def num_grid_ids(self) -> int:
        """Grid-level ids: 0 = CLS, 1..G*G = sub-cells, G*G+1 = padding (SEMANTICS.md 2.2)."""
        return self.grid_cells ** 2 + 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown, _ = unknown_keys(cls, d)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}: the checkpoint was written by a newer "
                             "version of refound; upgrade the package")
        return cls(**d)

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)


def refound_tiny(**overrides) -> ModelConfig:
    """For tests: forward + backward of a batch well under a second on one CPU core."""
    cfg = dict(name="refound_tiny", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
               max_poi_tokens=128, image_size=64, patch_size=16)
    return ModelConfig(**{**cfg, **overrides})


def refound_small(**overrides) -> ModelConfig:
    """The CPU default of the plugin: 6 x 384, 256 POI tokens, the paper's 256 px / 16 px image."""
    cfg = dict(name="refound_small", hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536,
               max_poi_tokens=256)
    return ModelConfig(**{**cfg, **overrides})


def refound_base(**overrides) -> ModelConfig:
    """The paper's model (A.2.1): 12 layers, 768 hidden, 3,072 FFN, 12 heads, 512 POI tokens."""
    return ModelConfig(**{"name": "refound_base", **overrides})


PRESETS = {"tiny": refound_tiny, "small": refound_small, "base": refound_base}


def preset(name: str, **overrides) -> ModelConfig:
    """Build a preset by short (``tiny``) or full (``refound_tiny``) name."""
    key = name.removeprefix("refound_")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key](**overrides)
