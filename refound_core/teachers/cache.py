"""Teacher outputs computed once per dataset and kept on disk (pre-training never re-runs teachers).

Layout: ``DS/teacher_cache/<hash>/`` where ``<hash>`` is hashed from every teacher's identity, the
model's patch grid, the storage dtype and the dataset's size (and fingerprint, when it has one). A
changed teacher therefore gives a new folder; the old one is left alone and never read for the new
teacher. Files (row ``i`` = sample ``i``):

* ``u_P.npy``  ``[N, d_text]`` LLM-features (DLFM, paper Eq. 2-3); ``poi_valid.npy`` ``bool [N]``
* ``u_S.npy``  ``[N, d_img]`` VFM features (DVFM, Eq. 4); ``image_valid.npy`` ``bool [N]``
* ``v_S.npy``  ``[N, d_vl]`` VLFM image embeddings (DVLFM, Eq. 5) -- absent when the VLFM role is
  the visual teacher (meta ``"v_S": "u_S"``), as the paper's matrix uses image embeddings only
* ``visual_tokens.npy`` ``int16 [N, patches_per_side**2]`` MGDM targets (Eq. 6); ``IGNORE_TOKEN`` (-100,
  PyTorch's default ``ignore_index``) where a region has no image
* ``patch_features.npy`` ``float16 [N, patches_per_side**2, C]`` the tokenizer's per-patch teacher
  features (what the codebook quantises), kept for the optional dense DVFM term
  (``refound_core.losses.dvfm``); absent when they would exceed the spill limit, and in format-1
  caches (written before 2026-12-08)
* ``codebook.safetensors`` the visual tokenizer's codebook (ship it with the model)
* ``descriptions.jsonl`` one ``{"i", "cell_id", "text"}`` line per sample
* ``meta.json`` identities, paper-vs-ours provenance, shapes, counts; written last

Invalid rows (no POIs / no image) are zero and flagged False; the losses skip them.

Target normalisation (:meth:`TeacherTargets.normalized`): the teachers' features share a large
common direction (on a synthetic corpus the mean cosine of a region's EfficientNet feature to the
dataset mean is 0.73, of its sentence embedding 0.76), so a student that outputs that mean already
reaches most of the cosine of Eqs. 3-4 and learns nothing about how regions *differ*: the
collapse seen in early checkpoints (h[S] nearly one-dimensional). Pre-training therefore distils
the centred features by default (``centered``: minus the dataset mean of the valid rows; the
DVLFM matrix is then the teachers' correlation), ``zscore`` also divides each dimension by its
std, ``raw`` is the paper read literally (docs/PRETRAINING.md, choice 12). The folder is
built under a temporary name and renamed into place, so a crash never leaves a half cache that
looks complete. Arrays are opened memory-mapped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.teachers.base import Teachers, stable_hash
from refound_core.teachers.sentence import embed_long_texts
from refound_core.teachers.tokenizer_vq import Codebook

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: also stores patch_features.npy; format-1 caches are still read
READABLE_FORMATS = (1, 2)
IGNORE_TOKEN = -100
CACHE_SUBDIR = "teacher_cache"


@dataclass
class TeacherTargets:
    """Memory-mapped teacher outputs of one dataset (see the module docstring for the arrays)."""

    folder: Path
    meta: dict
    u_P: np.ndarray
    poi_valid: np.ndarray
    u_S: np.ndarray
    image_valid: np.ndarray
    v_S: np.ndarray
    visual_tokens: np.ndarray
    codebook: Codebook
    norm: str = "raw"
    stats: Optional[dict] = None
    patch_features: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.u_P.shape[0])

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    @property
    def codebook_path(self) -> Path:
        return self.folder / "codebook.safetensors"

    @classmethod
    def open(cls, folder) -> "TeacherTargets":
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise InputError(f"{folder} is not a complete teacher cache (no meta.json): run `refound teachers`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") not in READABLE_FORMATS:
            raise InputError(f"teacher cache {folder} has format {meta.get('format')}, expected one of "
                             f"{READABLE_FORMATS}: delete it and run `refound teachers` again")

        def arr(name):
            return np.load(folder / f"{name}.npy", mmap_mode="r")

        u_S = arr("u_S")
        patches = arr("patch_features") if meta.get("patch_features") else None
        return cls(folder=folder, meta=meta, u_P=arr("u_P"), poi_valid=arr("poi_valid"), u_S=u_S,
                   image_valid=arr("image_valid"), v_S=u_S if meta["v_S"] == "u_S" else arr("v_S"),
                   visual_tokens=arr("visual_tokens"), codebook=Codebook.load(folder / "codebook.safetensors"),
                   patch_features=patches)

    def __reduce__(self):
        # DataLoader workers started by spawn get the folder and reopen the memory maps, instead of
        # a pickled copy of every array.
        return (_reopen, (str(self.folder), self.norm, "patch_features" in (self.stats or {})))

    def normalized(self, mode: str, patches: bool = False) -> "TeacherTargets":
        """This cache with its continuous targets (u_P, u_S, v_S) normalised by ``mode`` in
        :meth:`rows` (see the module docstring): ``raw``, ``centered`` or ``zscore``. Statistics
        come from the valid rows, in chunks (the arrays stay memory-mapped). ``patches``: the patch
        features too (they are the largest array, so only a run with the dense DVFM term reads them)."""
        if mode not in TARGET_NORMS:
            raise InputError(f"teacher target normalisation {mode!r} is not one of {TARGET_NORMS}")
        stats = None
        if mode != "raw":
            stats = {"u_P": _moments(self.u_P, self.poi_valid), "u_S": _moments(self.u_S, self.image_valid)}
            stats["v_S"] = stats["u_S"] if self.v_S is self.u_S else _moments(self.v_S, self.image_valid)
            if patches and self.patch_features is not None:
                stats["patch_features"] = _moments(self.patch_features, self.image_valid)
        return dataclasses.replace(self, norm=mode, stats=stats)

    @property
    def has_patch_features(self) -> bool:
        return self.patch_features is not None

    def patch_rows(self, indices) -> np.ndarray:
        """``float32 [B, P, C]`` per-patch teacher features of a batch, normalised like u_S (zero
        where the region has no image). Only when :attr:`has_patch_features` (and, normalised,
        after ``normalized(mode, patches=True)``)."""
        idx = np.asarray(indices, dtype=np.int64)
        return self._norm("patch_features", np.asarray(self.patch_features[idx], dtype=np.float32),
                          np.asarray(self.image_valid[idx]))

    def _norm(self, name: str, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.norm == "raw":
            return x
        mean, std = self.stats[name]
        out = x - mean
        if self.norm == "zscore":
            out = out / std
        out[~valid.astype(bool)] = 0.0
        return out.astype(np.float32)

    def descriptions(self) -> list:
        """The region-function description of every sample ("" where it has no POIs)."""
        with open(self.folder / "descriptions.jsonl", encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh]

    def rows(self, indices, patches: bool = False) -> dict:
        """Teacher targets of a batch of sample indices, as in-memory arrays (float32 features;
        with ``patches`` also ``patch_features``, when the cache has them: the dense DVFM term
        asks for them, nothing else pays for reading them)."""
        idx = np.asarray(indices, dtype=np.int64)
        poi_valid, image_valid = np.asarray(self.poi_valid[idx]), np.asarray(self.image_valid[idx])
        return {
            "u_P": self._norm("u_P", np.asarray(self.u_P[idx], dtype=np.float32), poi_valid),
            "poi_valid": poi_valid,
            "u_S": self._norm("u_S", np.asarray(self.u_S[idx], dtype=np.float32), image_valid),
            "v_S": self._norm("v_S", np.asarray(self.v_S[idx], dtype=np.float32), image_valid),
            "image_valid": image_valid,
            "visual_tokens": np.asarray(self.visual_tokens[idx], dtype=np.int64),
            **({"patch_features": self.patch_rows(idx)} if patches and self.has_patch_features else {}),
        }


TARGET_NORMS = ("raw", "centered", "zscore")


def _reopen(folder: str, norm: str, patches: bool = False) -> "TeacherTargets":
    targets = TeacherTargets.open(folder)
    return targets if norm == "raw" else targets.normalized(norm, patches)


def _moments(arr: np.ndarray, valid: np.ndarray, chunk: int = 8192) -> tuple:
    """float32 per-channel mean and std (floored at 1e-6) over the rows where ``valid``, read about
    ``chunk`` vectors at a time. ``arr`` is ``[N, d]`` or ``[N, P, d]`` (patch features: every patch of
    a valid row counts)."""
    d = arr.shape[-1]
    step = max(1, chunk // int(np.prod(arr.shape[1:-1], dtype=np.int64)))
    total, sq, n = np.zeros(d, np.float64), np.zeros(d, np.float64), 0
    for start in range(0, arr.shape[0], step):
        rows = np.asarray(arr[start:start + step], dtype=np.float64)[np.asarray(valid[start:start + step], bool)]
        rows = rows.reshape(-1, d)
        total += rows.sum(axis=0)
        sq += (rows ** 2).sum(axis=0)
        n += len(rows)
    if n == 0:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _dataset_key(samples) -> dict:
    """Size plus a cheap fingerprint of the data: the dataset's own ``fingerprint`` (attribute or method)
    when it has one, else a hash of its ``cell_ids`` and ``meta`` (``RegionDataset`` has both), else None
    (a plain list of samples: only the size is known without reading every sample)."""
    fp = getattr(samples, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if fp is None and isinstance(getattr(samples, "cell_ids", None), (list, tuple)):
        fp = stable_hash({"cell_ids": list(samples.cell_ids), "meta": getattr(samples, "meta", None)}, 32)
    return {"n": len(samples), "fingerprint": fp}


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core pin
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="region", dynamic_ncols=True)


ROWS_DONE = "rows_done"  # in a .partial folder: how many leading regions are finished


def _rows_done(tmp: Path) -> int:
    try:
        return max(0, int((tmp / ROWS_DONE).read_text().strip()))
    except (OSError, ValueError):
        return 0


def _checkpoint(tmp: Path, rows: int, poi_valid, image_valid, arrays) -> None:
    """Make the first ``rows`` regions durable, then record the count (rename: never half-written)."""
    for arr in arrays:
        if arr is not None:
            arr.flush()
    with open(tmp / ".valid.partial.npz.tmp", "wb") as fh:
        np.savez(fh, poi_valid=poi_valid, image_valid=image_valid)
    os.replace(tmp / ".valid.partial.npz.tmp", tmp / "valid.partial.npz")
    (tmp / f".{ROWS_DONE}.tmp").write_text(str(int(rows)))
    os.replace(tmp / f".{ROWS_DONE}.tmp", tmp / ROWS_DONE)


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of a text file (a kill may have left a part of the next batch)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        lines = fh.readlines()[:keep]
    with open(path, "wb") as fh:
        fh.writelines(lines)


class TeacherCache:
    """Teacher outputs of a dataset, stored under ``dataset_folder/teacher_cache/<identity-hash>/``."""

    def __init__(self, dataset_folder):
        self.root = Path(dataset_folder) / CACHE_SUBDIR

    def key(self, samples, teachers: Teachers, patches_per_side: int, dtype: str = "float16") -> dict:
        return {"format": CACHE_FORMAT, "teachers": teachers.identity(), "patches_per_side": int(patches_per_side),
                "dtype": np.dtype(dtype).name, "dataset": _dataset_key(samples)}

    def folder_for(self, samples, teachers: Teachers, patches_per_side: int, dtype: str = "float16") -> Path:
        return self.root / stable_hash(self.key(samples, teachers, patches_per_side, dtype))

    def load(self, samples, teachers: Teachers, patches_per_side: int, dtype: str = "float16") -> Optional[TeacherTargets]:
        """The cached targets for exactly these teachers and data, or None."""
        folder = self.folder_for(samples, teachers, patches_per_side, dtype)
        return TeacherTargets.open(folder) if (folder / "meta.json").is_file() else None

    def get_or_compute(self, samples: Sequence, teachers: Teachers, patches_per_side: int, batch_size: int = 32,
                       dtype: str = "float16", progress: bool = True,
                       spill_limit_bytes: int = 2 << 30, log_fn=None) -> TeacherTargets:
        """Load the cache for these teachers, computing it first if absent.

        ``samples`` is any sequence of ``RegionSample`` (``len`` and ``[i]``). ``patches_per_side``
        is the model's patch grid (``ModelConfig.patches_per_side``): one visual token per patch.
        The per-patch teacher features are kept as ``patch_features.npy`` (float16: the codebook's
        fit input and the dense DVFM targets) when they fit in ``spill_limit_bytes``; otherwise the
        codebook is fitted on an in-memory sample and the tokens are assigned in a second pass.

        Resumable: the work lives in ``teacher_cache/.<hash>.partial/`` with the number of finished
        rows, written after every batch; a killed computation (Ctrl-C, SIGTERM, kill -9) is
        continued by the next call with the same teachers and data, which says so through
        ``log_fn``. The folder becomes ``teacher_cache/<hash>/`` only when complete. A second
        process on the same cache refuses while the first runs (``.<hash>.lock``).
        """
        from refound_core.data.validate import OutputLock

        if np.dtype(dtype) not in (np.float16, np.float32):
            raise InputError(f"teacher cache dtype {dtype!r} is not float16 or float32")
        if patches_per_side < 1:
            raise InputError(f"patches_per_side {patches_per_side} must be positive")
        key = self.key(samples, teachers, patches_per_side, dtype)
        folder = self.root / stable_hash(key)
        if (folder / "meta.json").is_file():
            log.info("teacher cache hit: %s", folder)
            return TeacherTargets.open(folder)
        self.root.mkdir(parents=True, exist_ok=True)
        with OutputLock(folder):
            if not (folder / "meta.json").is_file():  # another run may have finished since the check above
                partial = self.root / f".{folder.name}.partial"
                self._compute(partial, key, samples, teachers, int(patches_per_side), batch_size, np.dtype(dtype),
                              progress, spill_limit_bytes, log_fn or log.info)
                if folder.exists():  # an incomplete folder of an older version: never complete, replace it
                    shutil.rmtree(folder)
                os.replace(partial, folder)
        return TeacherTargets.open(folder)

    def _prior_descriptions(self, describer_id: str, dataset: dict) -> Optional[list]:
        """Descriptions from another cache folder of the same describer and data (LLMs are slow)."""
        if not self.root.is_dir():
            return None
        for meta_path in sorted(self.root.glob("*/meta.json")):
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                if meta["key"]["teachers"]["describer"] == describer_id and meta["key"]["dataset"] == dataset:
                    with open(meta_path.parent / "descriptions.jsonl", encoding="utf-8") as fh:
                        return [json.loads(line)["text"] for line in fh]
            except (OSError, KeyError, ValueError):
                continue
        return None

    def _compute(self, tmp: Path, key: dict, samples, teachers: Teachers, grid: int, batch_size: int,
                 dtype: np.dtype, progress: bool, spill_limit_bytes: int, log_fn) -> None:
        from numpy.lib.format import open_memmap

        t0 = time.time()
        n, n_patches = len(samples), grid * grid
        tok = teachers.tokenizer
        featurizer = tok.featurizer
        fit = tok.codebook is None
        # The per-patch features are kept (patch_features.npy: the codebook's fit input and the dense
        # DVFM targets) when they fit in spill_limit_bytes; otherwise the fit samples them in memory.
        store_patches = n * n_patches * featurizer.feature_dim * 2 <= spill_limit_bytes
        done = _rows_done(tmp)
        if done and fit and not store_patches:
            # the in-memory codebook sample of the big-dataset path is not on disk: start over
            log_fn(f"teacher cache: {tmp} cannot be resumed (codebook sample held in memory); starting over")
            done = 0
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log_fn(f"teacher cache: resuming {tmp.name} after {done} of {n} regions")
        tmp.mkdir(parents=True, exist_ok=True)
        prior = self._prior_descriptions(key["teachers"]["describer"], key["dataset"])
        if prior is not None and len(prior) != n:
            prior = None

        def mm(name, dt, shape):
            path = tmp / name
            return open_memmap(path, "r+") if done else open_memmap(path, "w+", dt, shape)

        u_P = mm("u_P.npy", dtype, (n, teachers.sentence.dim))
        u_S = mm("u_S.npy", dtype, (n, teachers.visual.dim))
        v_S = None if teachers.vl_is_visual else mm("v_S.npy", dtype, (n, teachers.vl.dim))
        tokens = mm("visual_tokens.npy", np.int16, (n, n_patches))
        patches = mm("patch_features.npy", np.float16, (n, n_patches, featurizer.feature_dim)) if store_patches else None
        if done:
            flags = np.load(tmp / "valid.partial.npz")
            poi_valid, image_valid = flags["poi_valid"].copy(), flags["image_valid"].copy()
        else:
            tokens[:] = IGNORE_TOKEN
            poi_valid = np.zeros(n, dtype=bool)
            image_valid = np.zeros(n, dtype=bool)
        rng = np.random.default_rng(tok.seed)
        per_image = max(1, math.ceil(tok.max_fit_vectors / max(n, 1)))
        fit_parts = []
        cells = hashlib.sha256()
        ids = getattr(samples, "cell_ids", None)
        for i in range(done):  # the finished rows' ids, without reading their images
            cells.update(str(ids[i] if ids is not None else samples[i].cell_id).encode("utf-8") + b"\0")
        reused = prior is not None
        _truncate_lines(tmp / "descriptions.jsonl", done)

        bar = _progress(n, "teachers", progress)
        bar.update(done)
        with open(tmp / "descriptions.jsonl", "a", encoding="utf-8") as desc_fh:
            for start in range(done, n, batch_size):
                idx = list(range(start, min(n, start + batch_size)))
                batch = [samples[i] for i in idx]
                for s in batch:
                    cells.update(str(s.cell_id).encode("utf-8") + b"\0")
                # DLFM: description -> sentence embedding (Eq. 2).
                poi = [(i, s) for i, s in zip(idx, batch) if s.has_pois]
                texts = {}
                if poi:
                    if prior is not None:
                        gen = [prior[i] for i, _ in poi]
                    else:
                        gen = teachers.describer.describe_batch([(list(s.poi_names), list(s.poi_categories)) for _, s in poi])
                    texts = {i: t for (i, _), t in zip(poi, gen)}
                    rows = [i for i, _ in poi if texts[i] and texts[i].strip()]
                    if rows:
                        u_P[rows] = embed_long_texts(teachers.sentence, [texts[i] for i in rows])
                        poi_valid[rows] = True
                for i, s in zip(idx, batch):
                    desc_fh.write(json.dumps({"i": i, "cell_id": s.cell_id, "text": texts.get(i, "")},
                                             ensure_ascii=False) + "\n")
                # DVFM / DVLFM / MGDM: image teachers (Eq. 4-6).
                img = [(i, s.image) for i, s in zip(idx, batch) if s.has_image]
                if img:
                    rows, images = [i for i, _ in img], [im for _, im in img]
                    u_S[rows], feats = teachers.image_targets(images, grid)
                    if v_S is not None:
                        v_S[rows] = teachers.vl.embed_images(images)
                    if patches is not None:
                        patches[rows] = feats
                    if not fit:
                        tokens[rows] = tok.codebook.assign(feats)
                    elif patches is None:
                        for f in feats:  # sorted and float16: the same fit input as the spilled path
                            keep = np.sort(rng.choice(n_patches, min(per_image, n_patches), replace=False))
                            fit_parts.append(f[keep].astype(np.float16))
                    image_valid[rows] = True
                desc_fh.flush()
                _checkpoint(tmp, idx[-1] + 1, poi_valid, image_valid, (u_P, u_S, v_S, tokens, patches))
                bar.update(len(idx))
        bar.close()

        codebook = tok.codebook
        if fit:
            valid_rows = np.flatnonzero(image_valid)
            if patches is not None:
                total = len(valid_rows) * n_patches
                pick = np.arange(total) if total <= tok.max_fit_vectors else np.sort(
                    rng.choice(total, tok.max_fit_vectors, replace=False))
                sample = np.asarray(patches[valid_rows[pick // n_patches], pick % n_patches], dtype=np.float32)
            else:
                sample = (np.concatenate(fit_parts).astype(np.float32) if fit_parts
                          else np.zeros((0, featurizer.feature_dim), np.float32))
            codebook = tok.fit(sample)
            bar = _progress(len(valid_rows), "visual tokens", progress)
            for start in range(0, len(valid_rows), batch_size):
                rows = valid_rows[start:start + batch_size]
                if patches is not None:
                    feats = np.asarray(patches[rows], dtype=np.float32)
                else:
                    feats = featurizer.patch_features([samples[int(i)].image for i in rows], grid)
                tokens[rows] = codebook.assign(feats)
                bar.update(len(rows))
            bar.close()
        codebook.save(tmp / "codebook.safetensors")

        for arr in (u_P, u_S, v_S, tokens, patches):
            if arr is not None:
                arr.flush()
        np.save(tmp / "poi_valid.npy", poi_valid)
        np.save(tmp / "image_valid.npy", image_valid)
        for name in (ROWS_DONE, "valid.partial.npz"):
            (tmp / name).unlink(missing_ok=True)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "provenance": teachers.provenance(),
            "spec": teachers.spec,
            "n": n,
            "patches_per_side": grid,
            "dims": {"u_P": int(u_P.shape[1]), "u_S": int(u_S.shape[1]),
                     "v_S": int(u_S.shape[1] if v_S is None else v_S.shape[1])},
            "v_S": "u_S" if v_S is None else "v_S",
            "ignore_token": IGNORE_TOKEN,
            "num_codes": codebook.num_codes,
            "patch_features": patches is not None,
            "counts": {"poi_valid": int(poi_valid.sum()), "image_valid": int(image_valid.sum())},
            "cell_ids_sha256": cells.hexdigest(),
            "descriptions_reused": reused,
            "resumed_after_rows": done,
            "seconds": round(time.time() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        del u_P, u_S, v_S, tokens, patches
        with open(tmp / "meta.json.tmp", "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2, ensure_ascii=False)
        os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
