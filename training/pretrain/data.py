"""Pre-training data: region dataset + featurizer + cached teacher targets -> masked batches.

Pieces:

* :class:`PretrainData` opens a dataset folder (``refound_core.data.dataset.RegionDataset``), its
  POI tokenizer and category vocabulary, and the teacher cache made by ``refound teachers``
  (``DS/teacher_cache/<hash>/``, :class:`refound_core.teachers.cache.TeacherTargets`).
* :class:`PretrainDataset` (a torch ``Dataset``): one region -> its ``EncodedRegion`` plus its
  teacher rows. The featurizer's randomness (Z-order ties, random POI exclusion) and the optional
  photometric augmentation of the image (:mod:`training.pretrain.augment`) are seeded from
  ``(seed, epoch, index)``.
* :class:`PretrainCollator`: pads with ``Featurizer.collate``, stacks the teacher rows and, when
  MGDM is on, applies POI-token and patch masking (:mod:`refound_core.losses.masking`) with a
  generator seeded from ``(seed, epoch, indices of the batch)``.
* :class:`ResumableSampler`: torch's ``DistributedSampler`` (same per-epoch permutation on every
  rank, each rank its slice) that can start in the middle of an epoch, for ``--resume``.

Every random choice is a function of (seed, epoch, sample indices), never of worker count,
worker scheduling or how often the run was interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from refound_core.errors import InputError
from refound_core.losses.masking import blockwise_patch_mask, mask_poi_tokens
from training.pretrain.augment import photometric_jitter

TEACHER_CACHE_SUBDIR = "teacher_cache"
_DROP_KEYS = ("cell_ids", "labels")  # non-tensor collate outputs the engine does not need


def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (SeedSequence mixes them well; no Python hash randomisation)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def find_teacher_cache(data_folder, patches_per_side: int, teachers=None) -> Path:
    """The teacher-cache folder to train with.

    ``teachers`` given: that folder (a ``teacher_cache/<hash>`` folder). Otherwise the only
    complete cache under ``DS/teacher_cache/`` whose patch grid matches the model's.
    """
    if teachers:
        path = Path(teachers)
        if not (path / "meta.json").is_file():
            raise InputError(f"--teachers {path} is not a complete teacher cache (no meta.json); pass a "
                             f"{TEACHER_CACHE_SUBDIR}/<hash> folder written by `refound teachers`")
        return path
    root = Path(data_folder) / TEACHER_CACHE_SUBDIR
    found = []
    for meta_path in sorted(root.glob("*/meta.json")) if root.is_dir() else []:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if int(meta.get("patches_per_side", -1)) == int(patches_per_side):
            found.append(meta_path.parent)
    if not found:
        raise InputError(f"no teacher cache with {patches_per_side}x{patches_per_side} visual tokens in {root}; "
                         f"run `refound teachers --data {data_folder}` for this model preset first "
                         "(pre-training reads the teachers' outputs from there)")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{root} holds {len(found)} teacher caches for this patch grid ({names}); "
                         "choose one with --teachers DS/teacher_cache/<hash>")
    return found[0]


@dataclass
class PretrainData:
    """An opened dataset with everything pre-training needs from it (see module docstring)."""

    folder: Path
    dataset: object          # RegionDataset
    tokenizer: object        # PoiTokenizer
    category_vocab: object   # CategoryVocab
    targets: object          # TeacherTargets
    teacher_folder: Path
    tokenizer_dir: Optional[Path] = None   # saved with the checkpoint (default: the dataset's)
    vocab_file: Optional[Path] = None
    parts: tuple = ()        # the opened datasets of a combined corpus (:meth:`combine`), else empty

    def __post_init__(self):
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.dataset.tokenizer_path
        if self.vocab_file is None:
            self.vocab_file = self.dataset.vocab_path

    def adopt_vocabulary(self, files: dict) -> None:
        """Encode POIs with a checkpoint's tokenizer and category vocabulary (``files`` as in
        ``LoadedCheckpoint.files``) instead of the dataset's, so continued pre-training from that
        checkpoint (``--init``) keeps the token and category ids its embeddings were trained on;
        words or categories the checkpoint never saw become [UNK]."""
        from refound_core.data.tokenizer import PoiTokenizer
        from refound_core.data.vocab import CategoryVocab

        if "tokenizer" not in files or "category_vocab" not in files:
            raise InputError("--init checkpoint stores no tokenizer / category vocabulary; start from a checkpoint "
                             "written by `refound pretrain`")
        self.tokenizer = PoiTokenizer.load(files["tokenizer"])
        self.category_vocab = CategoryVocab.load(files["category_vocab"])
        self.tokenizer_dir, self.vocab_file = Path(files["tokenizer"]), Path(files["category_vocab"])

    @classmethod
    def open(cls, folder, patches_per_side: int, teachers=None, target_norm: str = "raw",
             patches: bool = False) -> "PretrainData":
        """``patches``: also normalise the per-patch teacher features (the dense DVFM term)."""
        from refound_core.data.dataset import RegionDataset
        from refound_core.teachers.cache import TeacherTargets

        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"--data {folder} does not exist; build a dataset with `refound build-dataset`")
        dataset = RegionDataset(folder)
        tokenizer = dataset.load_tokenizer()
        vocab = dataset.load_vocab()
        teacher_folder = find_teacher_cache(folder, patches_per_side, teachers)
        targets = TeacherTargets.open(teacher_folder).normalized(target_norm, patches)
        data = cls(folder, dataset, tokenizer, vocab, targets, teacher_folder)
        data.check(patches_per_side)
        return data

    def check(self, patches_per_side: int) -> None:
        """The teacher cache must describe exactly this dataset, in this order, for this patch grid."""
        n, m = len(self.dataset), len(self.targets)
        if n != m:
            raise InputError(f"teacher cache {self.teacher_folder} has {m} rows but dataset {self.folder} has {n} "
                             "regions; it was built for other data: run `refound teachers` again")
        want = self.targets.meta.get("cell_ids_sha256")
        ids = getattr(self.dataset, "cell_ids", None)
        if want and ids is not None:
            h = hashlib.sha256()
            for c in ids:
                h.update(str(c).encode("utf-8") + b"\0")
            if h.hexdigest() != want:
                raise InputError(f"teacher cache {self.teacher_folder} was computed for other regions than "
                                 f"{self.folder} holds; run `refound teachers --data {self.folder}` again")
        tokens = self.targets.visual_tokens
        if tokens.shape[1] != patches_per_side ** 2:
            raise InputError(f"teacher cache {self.teacher_folder} has {tokens.shape[1]} visual tokens per image "
                             f"but the model has {patches_per_side ** 2} patches; build the cache for this preset")

    # -- facts the model and heads need -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def num_categories(self) -> int:
        return len(self.category_vocab)

    @property
    def dims(self) -> dict:
        """Teacher dimensions for :class:`~refound_core.losses.PretrainHeads` (a combined corpus:
        its first part's, which :meth:`combine` checked every part shares)."""
        if self.parts:
            return self.parts[0].dims
        dims = {"llm_dim": int(self.targets.u_P.shape[1]), "vfm_dim": int(self.targets.u_S.shape[1]),
                "codebook_size": int(self.targets.num_codes)}
        if self.targets.has_patch_features:
            dims["patch_dim"] = int(self.targets.patch_features.shape[2])
        return dims

    def featurizer(self, model_cfg):
        from refound_core.data.featurize import Featurizer

        return Featurizer(self.tokenizer, self.category_vocab, max_poi_tokens=model_cfg.max_poi_tokens,
                          grid_cells=model_cfg.grid_cells, truncation="random")

    def provenance(self) -> dict:
        def one(part):
            return {"folder": str(part.folder.resolve()), "regions": len(part.dataset),
                    "meta": getattr(part.dataset, "meta", {}).get("provenance")}

        training_data = one(self)
        teachers = {"cache": str(self.teacher_folder.resolve()), **(self.targets.meta.get("provenance") or {})}
        if self.parts:  # a combined corpus: the first part's fields stay where readers look for them
            training_data["regions"] = len(self.dataset)
            training_data["parts"] = [one(part) for part in self.parts]
            teachers["caches"] = [str(part.teacher_folder.resolve()) for part in self.parts]
        return {"training_data": training_data, "teachers": teachers}

    @classmethod
    def combine(cls, parts) -> "PretrainData":
        """Several opened datasets pre-trained on at once (``--data`` repeated), e.g. a synthetic POI
        city and image-only real imagery, so neither overwrites what the other taught (continued
        pre-training in sequence does: docs/EVALUATION.md).

        Region ``i`` of part ``k`` is global index ``offset[k] + i``; each part keeps its own teacher
        cache and its own target centring. All caches must come from the same teachers and share one
        visual-token codebook (MGDM's classes must mean the same thing everywhere): fit it on one
        dataset and pass it to the others with ``refound teachers --codebook``. POIs of every part
        are encoded with the tokenizer and category vocabulary of the first part that has POIs."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for part in parts[1:]:
            _check_same_teachers(first, part)
        with_pois = [p for p in parts if np.asarray(p.targets.poi_valid).any()]
        vocab_of = with_pois[0] if with_pois else first
        return cls(first.folder, ConcatRegions([p.dataset for p in parts]), vocab_of.tokenizer,
                   vocab_of.category_vocab, ConcatTargets([p.targets for p in parts]), first.teacher_folder,
                   tokenizer_dir=vocab_of.tokenizer_dir, vocab_file=vocab_of.vocab_file, parts=tuple(parts))


def _check_same_teachers(a: PretrainData, b: PretrainData) -> None:
    """Parts of a combined corpus: same teacher identities, target dimensions and codebook."""
    pa, pb = a.targets.meta.get("provenance") or {}, b.targets.meta.get("provenance") or {}
    for role in ("describer", "sentence", "visual", "vl"):
        ua, ub = (pa.get(role) or {}).get("used"), (pb.get(role) or {}).get("used")
        if ua != ub:
            raise InputError(f"teacher caches {a.teacher_folder} and {b.teacher_folder} use different {role} "
                             f"teachers ({ua} vs {ub}); run `refound teachers` on both with the same flags")
    if a.dims != b.dims:
        raise InputError(f"teacher caches {a.teacher_folder} and {b.teacher_folder} have different target "
                         f"dimensions ({a.dims} vs {b.dims}); run `refound teachers` on both with the same flags")
    ca, cb = np.asarray(a.targets.codebook.centroids), np.asarray(b.targets.codebook.centroids)
    if ca.shape != cb.shape or not np.array_equal(ca, cb):
        raise InputError(f"teacher caches {a.teacher_folder} and {b.teacher_folder} have different visual-token "
                         f"codebooks, so MGDM's codes would mean different things; reuse one: `refound teachers "
                         f"--data {b.folder} --codebook {a.targets.codebook_path}`")


class ConcatRegions:
    """Several region datasets as one index space (:meth:`PretrainData.combine`)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple:
        """``(part, index inside the part)`` of a global index."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} regions")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - int(self.offsets[k])

    def __getitem__(self, index: int):
        k, i = self.locate(index)
        return self.parts[k][i]


class ConcatTargets:
    """The teacher targets of a combined corpus, indexed like :class:`ConcatRegions`; each part's
    rows are normalised with that part's own statistics."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.regions = ConcatRegions(self.parts)
        first = self.parts[0]
        self.meta, self.codebook, self.folder = first.meta, first.codebook, first.folder

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    @property
    def codebook_path(self) -> Path:
        return self.parts[0].codebook_path

    def rows(self, indices, patches: bool = False) -> dict:
        located = [self.regions.locate(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        rows = [self.parts[k].rows([i], patches) for k, i in located]
        return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


class PretrainDataset(Dataset):
    """``dataset[i]`` -> ``(index, EncodedRegion, teacher rows)``; ``set_epoch`` before each epoch.

    Picklable (DataLoader workers get a copy at iterator creation, so the epoch they see is the
    one set before ``iter(loader)``).
    """

    def __init__(self, data: PretrainData, featurizer, seed: int = 0, photometric_aug: float = 0.0,
                 patches: bool = False):
        self.dataset = data.dataset
        self.targets = data.targets
        self.featurizer = featurizer
        self.seed = int(seed)
        self.photometric_aug = float(photometric_aug)
        self.patches = bool(patches)  # serve the per-patch teacher features (dense DVFM)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        index = int(index)
        rng = np.random.default_rng(_seed_of(self.seed, self.epoch, index, 1))
        encoded = self.featurizer.encode(self.dataset[index], rng)
        if self.photometric_aug > 0 and encoded.image is not None:
            jitter_rng = np.random.default_rng(_seed_of(self.seed, self.epoch, index, 3))
            encoded.image = photometric_jitter(encoded.image, jitter_rng, self.photometric_aug)
        return index, encoded, self.targets.rows([index], self.patches)


class PretrainCollator:
    """Batch = ``Featurizer.collate`` output + teacher targets + MGDM masks (module docstring).

    Batch keys added: ``u_P, u_P_valid, u_S, u_S_valid, v_S, v_S_valid, visual_tokens,
    visual_tokens_valid, indices``; ``patch_features`` with the dense DVFM term; with masking also
    ``mlm_mask, mlm_labels, masked_patches`` (``token_ids`` is then the corrupted sequence).
    """

    def __init__(self, featurizer, image_size: int, patches_per_side: int, loss_cfg, *, vocab_size: int,
                 mask_id: int = 103, special_ids=(0, 101, 102, 103), seed: int = 0):
        self.featurizer = featurizer
        self.image_size = int(image_size)
        self.patches_per_side = int(patches_per_side)
        self.loss_cfg = loss_cfg
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.special_ids = tuple(int(s) for s in special_ids)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, items) -> dict:
        indices = [int(i) for i, _, _ in items]
        batch = self.featurizer.collate([e for _, e, _ in items], self.image_size)
        for key in _DROP_KEYS:
            batch.pop(key, None)
        rows = {k: np.concatenate([r[k] for _, _, r in items]) for k in items[0][2]}
        image_valid = torch.from_numpy(rows["image_valid"].astype(bool)) & batch["has_image"]
        tokens = torch.from_numpy(rows["visual_tokens"].astype(np.int64))
        batch.update(
            u_P=torch.from_numpy(rows["u_P"]), u_P_valid=torch.from_numpy(rows["poi_valid"].astype(bool)),
            u_S=torch.from_numpy(rows["u_S"]), u_S_valid=image_valid,
            v_S=torch.from_numpy(rows["v_S"]), v_S_valid=image_valid,
            visual_tokens=tokens.clamp(min=0), visual_tokens_valid=image_valid & (tokens >= 0).all(dim=1),
            indices=torch.tensor(indices, dtype=torch.int64))
        if "patch_features" in rows:
            batch["patch_features"] = torch.from_numpy(rows["patch_features"])
        if self.loss_cfg.masking:
            self._mask(batch, indices)
        return batch

    def _mask(self, batch: dict, indices: list) -> None:
        cfg = self.loss_cfg
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, 2, *indices))
        corrupted, chosen = mask_poi_tokens(
            batch["token_ids"], batch["poi_mask"], g, vocab_size=self.vocab_size, mask_ratio=cfg.poi_mask_ratio,
            mask_token_prob=cfg.mask_token_prob, random_token_prob=cfg.random_token_prob, mask_id=self.mask_id,
            special_ids=self.special_ids)
        batch["mlm_labels"] = batch["token_ids"]
        batch["token_ids"] = corrupted
        batch["mlm_mask"] = chosen
        batch["masked_patches"] = blockwise_patch_mask(
            len(indices), self.patches_per_side, g, mask_ratio=cfg.patch_mask_ratio,
            min_block_patches=cfg.min_block_patches, has_image=batch["has_image"])


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start in the middle of an epoch, counted in samples of the
    whole epoch (all ranks together), so a run may resume with another number of processes.

    The epoch's permutation of all regions depends on (seed, epoch) only; rank ``r`` of ``W`` takes
    every W-th region of it. After k samples per rank the ranks have consumed exactly the first
    k * W regions of the permutation, whatever W was, so ``set_start(consumed)`` deals the rest of
    the same permutation to the ranks of *this* run (torch elastic's view of a job: the data
    position is global, not per rank). With an unchanged W the order is the uninterrupted one.
    """

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.consumed = 0

    def set_start(self, consumed: int) -> None:
        """Skip the first ``consumed`` regions of the epoch's permutation (all ranks together)."""
        self.consumed = int(consumed)

    def _order(self) -> list:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self):
        rest = self._order()[self.consumed:]
        per_rank = len(rest) // self.num_replicas
        return iter(rest[self.rank::self.num_replicas][:per_rank])

    def __len__(self) -> int:
        return max(0, (len(self.dataset) - self.consumed) // self.num_replicas)


def default_workers(device: torch.device, world_size: int = 1) -> int:
    """Worker processes per rank: on a GPU keep it fed; on a CPU the workers steal cores from
    the model, so only use them when there are cores to spare."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cpus // max(1, world_size))
    if device.type == "cuda":
        return min(8, max(1, per_rank - 1))
    return 0 if per_rank <= 4 else min(4, per_rank // 4)


def make_loader(dataset: PretrainDataset, collator: PretrainCollator, sampler: ResumableSampler, *,
                batch_size: int, workers: int, device: torch.device, epoch: int) -> DataLoader:
    """One epoch's DataLoader (workers see the epoch set here; pinned memory on CUDA)."""
    dataset.set_epoch(epoch)
    collator.set_epoch(epoch)
    sampler.set_epoch(epoch)
    # Its own generator: creating the iterator must not consume the global RNG (dropout), or a
    # resumed run would drift from an uninterrupted one.
    gen = torch.Generator().manual_seed(_seed_of(dataset.seed, epoch, 3))
    kwargs = dict(prefetch_factor=4) if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collator, pin_memory=device.type == "cuda", drop_last=True, generator=gen,
                      **kwargs)
