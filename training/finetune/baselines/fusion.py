"""The visual-language baseline (paper A.1 "CN-CLIP"): POI names through a text encoder, the
satellite image through an image encoder, the two representations averaged into the region
representation, everything fine-tuned jointly with ReFound's 2-layer MLP head (A.2.2).

CN-CLIP (RoBERTa-wwm-Base + ViT-Base) is not available offline. Its stand-in pairs the two
pre-trained encoders that are: MiniLM-L6 (text, :mod:`.text`) and EfficientNet-Lite0 (image,
:mod:`.image`). Unlike CLIP's towers they were not pre-trained into one shared space, so each gets
a linear projection to a common width (CLIP's towers also end in projections) learnt in fine-tuning.
"""
from __future__ import annotations

import torch
from torch import nn

from training.finetune.baselines import common
from training.finetune.baselines.image import EFFNET_SIZE, EffNetEncoder
from training.finetune.baselines.text import TextEncoder, TextInputs, minilm_folder, text_max_tokens
from training.finetune.methods import Method, MethodResult, Split, register
from training.finetune.tasks import TaskSpec


class LateFusionModel(nn.Module):
    """``[h_text W_t, h_image W_v]`` -> fusion over the present modalities -> MLP head.

    A region without POIs or without an image is fused from the other modality alone (the
    ``presence`` mask of ReFound's average / attentional fusion, paper 4.3).
    """

    def __init__(self, text: TextEncoder, image: EffNetEncoder, width: int, head: nn.Module):
        super().__init__()
        self.text, self.image, self.head = text, image, head
        self.text_proj = nn.Linear(text.hidden_size, width)
        self.image_proj = nn.Linear(image.hidden_size, width)
        for lin in (self.text_proj, self.image_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, input_ids, attention_mask, images, has_pois, has_image):
        z = torch.stack([self.text_proj(self.text(input_ids, attention_mask)),
                         self.image_proj(self.image(images, has_image))], dim=1)
        return self.head(z, torch.stack([has_pois, has_image], dim=1))


@register
class LateFusion(Method):
    name = "late_fusion"
    stands_in_for = ("CN-CLIP (paper A.1: text and image encoders of CN-CLIP, representations averaged, "
                     "fine-tuned). CN-CLIP is not available offline; MiniLM-L6 (text) and EfficientNet-Lite0 "
                     "(ImageNet, 224 px), each linearly projected to one width and averaged, take its place.")
    mode = "fine-tuning"
    default_lr = common.LR_FINETUNE

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        ctx = self.ctx
        folder = minilm_folder()
        inputs = TextInputs(ctx.dataset, split, text_max_tokens(ctx), seed)
        size = int(common.option(ctx, "effnet_image_size", EFFNET_SIZE))
        torch.manual_seed(seed)
        text = TextEncoder(inputs.vocab_size, folder)
        width = int(common.option(ctx, "fusion_width", text.hidden_size))
        head = common.make_head(task, width, fusion=str(common.option(ctx, "baseline_fusion", "average")))
        model = LateFusionModel(text, EffNetEncoder(), width, head)
        batches = common.IndexBatches(ctx.batch_size, seed, lengths=inputs.lengths)
        has_pois_all = torch.from_numpy(common.region_presence(ctx.dataset, range(len(ctx.dataset)))[0])

        def forward(batch):
            ids, mask = inputs.batch(batch, ctx.device)
            images, has_image = common.image_batch(ctx.dataset, batch, size, device=ctx.device)
            has_pois = has_pois_all[torch.as_tensor(batch)].to(ctx.device)
            return model(ids, mask, images, has_pois, has_image)

        return common.train_supervised(ctx, task, split, seed, model, forward, batches,
                                       common.peak_lr(ctx, self.default_lr))
