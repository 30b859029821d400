"""Baselines of the evaluation (paper 5.1.3, A.1), offline stand-ins where the paper's models are
not available (docs/BASELINES.md). Importing this package registers them in
``training.finetune.methods.REGISTRY``:

* ``bert_text``        -- fine-tuning, POI names (stands in for BERT)
* ``effnet_image``     -- fine-tuning, satellite image (stands in for ViT)
* ``vit_scratch``      -- fine-tuning, satellite image, no pre-training (ReFound-small's ViT size)
* ``late_fusion``      -- fine-tuning, POI names + image averaged (stands in for CN-CLIP)
* ``teacher_features`` -- feature-based, frozen teacher features + 2-layer MLP

Heavy libraries (torch, transformers, timm) load with these modules, so import the package only
where the evaluation runs.
"""
from training.finetune.baselines import features, fusion, image, text  # noqa: F401  (register)

NAMES = ("bert_text", "effnet_image", "vit_scratch", "late_fusion", "teacher_features")
