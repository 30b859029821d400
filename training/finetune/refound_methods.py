"""ReFound in the evaluation: fine-tuning (paper 4.3 (1), A.2.2), feature-based prediction
(4.3 (2), A.2.3), and the same architecture without pre-training (random initialisation)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from refound_core.errors import InputError
from refound_core.model.checkpoint import checkpoint_identity, load_checkpoint
from refound_core.model.heads import ReFoundWithHead, TaskHead, fold_token_standardization, token_standardization
from refound_core.model.precision import autocast
from refound_core.model.refound import ReFound
from training.finetune.loop import fit_and_select, layer_decay_groups
from training.finetune.methods import EvalContext, Method, MethodResult, Split, labels_of, register
from training.finetune.regions import RegionBatches, featurizer_for_checkpoint
from training.finetune.tasks import TaskSpec

# Paper Tables 5 and 6 (Shenzhen): fusion per task for fine-tuning / feature-based prediction.
FUSION_FINETUNE = {"urban_village": "attention", "commercial": "average", "population": "attention"}
FUSION_FEATURE = {"urban_village": "average", "commercial": "attention", "population": "attention"}


def _need_checkpoint(ctx: EvalContext):
    if not ctx.checkpoint:
        raise InputError("this method needs a pre-trained ReFound checkpoint: pass --checkpoint CKPT "
                         "(written by `refound pretrain`)")
    return load_checkpoint(ctx.checkpoint, map_location="cpu", with_head=False)


def _fresh_backbone(loaded, seed: int) -> ReFound:
    """Same architecture as the checkpoint, random initialisation (the "no pre-training" control)."""
    torch.manual_seed(seed)
    return ReFound(loaded.config)


class _ReFoundFineTune(Method):
    mode = "fine-tuning"
    pretrained = True
    default_lr = 1e-4  # Table 5

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        result, _, _ = self.train(task, split, seed)
        return result

    def train(self, task: TaskSpec, split: Split, seed: int):
        ctx = self.ctx
        loaded = _need_checkpoint(ctx)
        backbone = loaded.model if self.pretrained else _fresh_backbone(loaded, seed)
        torch.manual_seed(seed)
        fusion = ctx.options.get("fusion") or FUSION_FINETUNE.get(task.name, "average")
        head = TaskHead(backbone.hidden_size, kind=task.kind, num_classes=task.num_outputs, fusion=fusion)
        model = ReFoundWithHead(backbone, head).to(ctx.device)
        feat = featurizer_for_checkpoint(loaded)
        batches = RegionBatches(ctx.dataset, feat, loaded.config.image_size, ctx.batch_size, seed)
        groups = layer_decay_groups(backbone, head, 0.01, ctx.options.get("layer_decay", 0.75))

        def forward(batch):
            with autocast(ctx.device):
                return model(batch).float()

        y = labels_of(ctx.dataset, task)
        result, state, scaler = fit_and_select(
            model, groups, forward, batches, task, y, split.train, split.val, split.test,
            epochs=ctx.epochs, lr=ctx.lr or self.default_lr, warmup_epochs=ctx.warmup_epochs, seed=seed,
            log=ctx.options.get("log"), state_path=ctx.options.get("state_path"))
        return result, (model, loaded, fusion), scaler


@register
class ReFoundFT(_ReFoundFineTune):
    name = "refound_ft"
    stands_in_for = "ReFound, pre-trained, fine-tuned with a 2-layer MLP head (paper 4.3 (1), A.2.2)"


@register
class ReFoundScratch(_ReFoundFineTune):
    name = "refound_scratch"
    stands_in_for = "ReFound architecture without pre-training (random init), fine-tuned: the value of pre-training"
    pretrained = False


@torch.inference_mode()
def region_embeddings(model: ReFound, dataset, featurizer, image_size: int, batch_size: int = 16,
                      device: str = "cpu", progress=None) -> tuple:
    """Frozen region embeddings of every region: ``stack(h[P], h[S])`` float32 ``[N, 2, H]`` and the
    modality presence bool ``[N, 2]`` (what the official feature extractor stores, SEMANTICS.md 3)."""
    model = model.to(device).eval()
    n = len(dataset)
    tokens = np.zeros((n, 2, model.hidden_size), dtype=np.float32)
    presence = np.zeros((n, 2), dtype=bool)
    batches = RegionBatches(dataset, featurizer, image_size, batch_size, seed=0)
    done = 0
    for batch, pos in batches(np.arange(n), False, -1):
        with autocast(device):
            out = model.forward_batch(batch)
        tokens[pos] = out.region_tokens.float().cpu().numpy()
        presence[pos] = out.presence.cpu().numpy()
        done += len(pos)
        if progress:
            progress(done, n)
    return tokens, presence


class _ReFoundFeatureBased(Method):
    mode = "feature-based"
    pretrained = True
    default_lr = 5e-4  # Table 6

    def embeddings(self, seed: int):
        ctx = self.ctx
        loaded = _need_checkpoint(ctx)
        ident = checkpoint_identity(ctx.checkpoint) + ("" if self.pretrained else f"-scratch{seed}")
        cache = Path(ctx.cache_dir or Path(ctx.dataset.folder) / "embedding_cache") / f"refound-{ident}.npz"
        if cache.exists():
            with np.load(cache) as z:
                return z["tokens"], z["presence"]
        backbone = loaded.model if self.pretrained else _fresh_backbone(loaded, seed)
        feat = featurizer_for_checkpoint(loaded)
        feat.truncation = "random"
        tokens, presence = region_embeddings(backbone, ctx.dataset, feat, loaded.config.image_size,
                                             device=ctx.device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, tokens=tokens, presence=presence)
        os.replace(tmp, cache)
        return tokens, presence

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        return self.train(task, split, seed)[0]

    def train(self, task: TaskSpec, split: Split, seed: int):
        """``(MethodResult, head, scaler)``: the head holds the best-epoch weights."""
        ctx = self.ctx
        tokens, presence = self.embeddings(seed)
        tokens_t, presence_t = torch.from_numpy(tokens), torch.from_numpy(presence)
        # The head trains on tokens standardised with the training split's statistics and the
        # scaling is folded back afterwards, as the plugin's head fitting does
        # (refound_core.model.head_fit): raw frozen embeddings differ little between regions and
        # their scale depends on the checkpoint, which would make the comparison one of scales.
        mu, sigma = token_standardization(tokens_t, presence_t, torch.as_tensor(np.asarray(split.train)))
        tokens_t = (tokens_t - mu) / sigma
        torch.manual_seed(seed)
        fusion = ctx.options.get("fusion") or FUSION_FEATURE.get(task.name, "average")
        head = TaskHead(tokens.shape[-1], kind=task.kind, num_classes=task.num_outputs, fusion=fusion)
        rng_seed = seed

        def batches(idx, shuffle, epoch):
            idx = np.asarray(idx)
            order = np.random.default_rng([rng_seed, epoch + 1]).permutation(len(idx)) if shuffle else np.arange(len(idx))
            for s in range(0, len(idx), ctx.batch_size):
                pos = order[s:s + ctx.batch_size]
                sel = torch.as_tensor(idx[pos])
                yield (tokens_t[sel], presence_t[sel]), pos

        def forward(batch):
            z, pres = batch
            return head(z, pres)

        params = [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": 0.01},
                  {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
        y = labels_of(ctx.dataset, task)
        result, _, scaler = fit_and_select(head, params, forward, batches, task, y, split.train, split.val,
                                           split.test, epochs=ctx.options.get("feature_epochs", 40),
                                           lr=ctx.lr or self.default_lr, warmup_epochs=ctx.warmup_epochs,
                                           seed=seed, log=ctx.options.get("log"),
                                           state_path=ctx.options.get("state_path"))
        fold_token_standardization(head, mu, sigma)
        return result, head, scaler


@register
class ReFoundLinear(_ReFoundFeatureBased):
    name = "refound_feature"
    stands_in_for = "ReFound feature-based prediction: frozen pre-trained backbone, 2-layer MLP head (paper 4.3 (2), A.2.3)"


@register
class ReFoundScratchFeature(_ReFoundFeatureBased):
    name = "refound_scratch_feature"
    stands_in_for = "the same frozen-feature protocol on the untrained (random init) architecture"
    pretrained = False

