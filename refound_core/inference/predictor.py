"""Streaming inference with a ReFound checkpoint (paper 4.3: fine-tuned prediction and region
representations).

:class:`Predictor` loads the backbone, the task head, the POI tokenizer and the category
vocabulary once per process, then turns any iterable of :class:`RegionSample` into a stream of
:class:`CellResult`, never holding more than a window of cells:

1. a window of ``batch_size * WINDOW_BATCHES`` samples is featurised (in a prefetch thread, so
   tokenisation overlaps the model); cells without POIs and without imagery are set aside as
   *insufficient* and never reach the model (their outputs are NaN, NULL in files);
2. the window is sorted by POI-sequence length and cut into batches, each padded only to its own
   longest region (rounded to 8), never to the model's 512: with real cities most cells have far
   fewer POI tokens than 512, and attention cost grows with the square of the length;
3. each batch runs under ``torch.inference_mode`` and bf16 autocast where the hardware has native
   bf16 (CUDA >= sm80, AMX/AVX512-BF16 CPUs; ``refound_core.model.precision``);
4. results come back in the input order of the window.

A CUDA out-of-memory error halves the batch size (logged) and retries the same cells, down to 1;
at 1 it raises a clear error. The featurisation RNG is seeded from each cell's id, so a cell gets
the same prediction whatever extent, batch or order it comes in.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from refound_core.errors import InputError
from refound_core.inference.results import CellResult, is_sufficient

log = logging.getLogger("refound.inference")

WINDOW_BATCHES = 8  # batches per sorting window: more = less padding, more latency/memory
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 16}
TASKS = ("urban_village", "population", "commercial")
EMBEDDINGS = ("h_P", "h_S", "fused")


class AnalysisCanceled(Exception):
    """Raised when ``is_canceled()`` turned true; the run stops within one batch."""


def resolve_device(device: str = "auto") -> tuple:
    """``(torch.device, notice or None)``: ``auto`` = CUDA when available, else CPU with a notice."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), ("no CUDA GPU available to torch: running on the CPU (slower); "
                                     "see `refound doctor` for the GPU / driver check")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} was requested but torch sees no CUDA GPU (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu or auto, "
                             "or install a CUDA build of torch matching the driver (`refound doctor`)")
        return torch.device(device), None
    if device == "cpu":
        return torch.device("cpu"), None
    raise InputError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def cell_rng(cell_id: str) -> np.random.Generator:
    """Per-cell RNG (Z-order ties, random truncation): same cell -> same encoding, always."""
    return np.random.default_rng(zlib.crc32(cell_id.encode("utf-8")))


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


POI_ONLY_NOTICE_START = "POI-only cells:"


def poi_only_notice(n: int) -> str:
    """Why: a head fine-tuned on cells with imagery, applied to a cell without usable imagery
    beside imaged ones, can be far off (a POI-only cell predicted ~500x its imaged twin; issue
    "Robustness"). Said once per run when a run mixes both; the cells show image_coverage below
    the threshold."""
    return (f"{POI_ONLY_NOTICE_START} {n:,} cell(s) had POIs but no usable imagery and were predicted from POIs "
            "alone, beside cells that had imagery; a head trained on imaged cells can be far off there "
            "(those cells have image_coverage below the threshold: filter or style them apart).")


class Predictor:
    """Model + head + vocabularies of one checkpoint, ready for streaming inference.

    Args:
        checkpoint_dir: folder written by ``refound_core.model.checkpoint.save_checkpoint``.
        device: ``auto`` (CUDA when present, else CPU with a notice), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: regions per forward pass; default 64 on CUDA, 16 on the CPU.
        int8: run the backbone's Linear layers int8 dynamic quantised (CPU only,
            ``refound_core.model.speed.quantize_int8``): about 1.4x faster on a 2-core CPU, at an
            accuracy cost measured in docs/BENCHMARKS.md; autocast is off (int8 replaces bf16).

    Attributes:
        timings: seconds spent per stage (``featurize``, ``model``) and counters, accumulated
            over calls (the pipeline reports them).
        notices: human-readable notices (device fallback, batch-size reductions).
    """

    def __init__(self, checkpoint_dir, device: str = "auto", batch_size: Optional[int] = None,
                 min_image_coverage: Optional[float] = None, int8: bool = False):
        import torch

        self._modality = {"image": 0, "poi_only": 0}
        from refound_core.model.checkpoint import load_checkpoint
        from refound_core.model.precision import choose_precision

        self.device, notice = resolve_device(device)
        self.notices = [notice] if notice else []
        if notice:
            log.warning(notice)
        self.checkpoint_dir = Path(checkpoint_dir)
        ckpt = load_checkpoint(self.checkpoint_dir, map_location="cpu")
        self.config = ckpt.config
        self.task_meta = dict(ckpt.task or {})
        self.provenance = ckpt.provenance
        self.model = ckpt.model.to(self.device).eval()
        self.head = ckpt.head.to(self.device).eval() if ckpt.head is not None else None
        self.precision = choose_precision(self.device)
        if int8:
            if self.device.type != "cpu":
                raise InputError(f"int8 inference runs on the CPU only, not on {self.device}; pass --device cpu "
                                 "or drop --int8 (on a GPU bf16 is the fast path)")
            from refound_core.model.precision import PrecisionChoice
            from refound_core.model.speed import quantize_int8

            self.model = quantize_int8(self.model)
            self.precision = PrecisionChoice("cpu", "float32", "int8 dynamic quantisation of the Linear layers "
                                                        "(--int8); activations float32, autocast off")
        self.int8 = bool(int8)
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch size {batch_size} must be a positive integer")
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, 16))
        self.featurizer = self._build_featurizer(ckpt, min_image_coverage)
        self.timings = {"featurize": 0.0, "model": 0.0, "cells": 0, "predicted": 0, "batches": 0,
                        "padded_tokens": 0, "real_tokens": 0}
        self._torch = torch

    # ------------------------------------------------------------------ set-up
    def _build_featurizer(self, ckpt, min_image_coverage: Optional[float] = None):
        from refound_core.data.featurize import DEFAULT_MIN_IMAGE_COVERAGE, Featurizer
        from refound_core.data.tokenizer import PoiTokenizer
        from refound_core.data.vocab import CategoryVocab

        files = ckpt.files
        if "tokenizer" in files:
            tokenizer = PoiTokenizer.load(files["tokenizer"])
        else:
            tokenizer = PoiTokenizer.default()
            log.warning("checkpoint %s stores no tokenizer: using the default BERT vocabulary", self.checkpoint_dir)
        if len(tokenizer) != self.config.vocab_size:
            raise InputError(f"checkpoint {self.checkpoint_dir}: tokenizer has {len(tokenizer)} tokens but the model's "
                             f"vocab_size is {self.config.vocab_size}; the checkpoint folder is inconsistent")
        vocab = CategoryVocab.load(files["category_vocab"]) if "category_vocab" in files else None
        if vocab is not None and len(vocab) > self.config.num_categories:
            raise InputError(f"checkpoint {self.checkpoint_dir}: category vocabulary has {len(vocab)} entries but the "
                             f"model has {self.config.num_categories} category embeddings")
        opts = dict(self.task_meta.get("featurizer") or {})
        return Featurizer(tokenizer, vocab, max_poi_tokens=self.config.max_poi_tokens,
                          grid_cells=self.config.grid_cells, truncation=opts.get("truncation", "random"),
                          order=opts.get("order", "zorder"),
                          min_image_coverage=DEFAULT_MIN_IMAGE_COVERAGE if min_image_coverage is None
                          else float(min_image_coverage))

    # ------------------------------------------------------------------ description
    @property
    def task(self) -> Optional[str]:
        """The task of the checkpoint's head (``task.name`` in config.json), or None (backbone only)."""
        return self.task_meta.get("name") if self.head is not None else None

    @property
    def kind(self) -> Optional[str]:
        return self.head.kind if self.head is not None else None

    @property
    def classes(self) -> Optional[list]:
        """Class names of a multiclass head (``refound add-label --stat majority`` labels), or None."""
        return self.task_meta.get("classes") if self.kind == "multiclass" else None

    def describe(self) -> dict:
        """Model, head, device and precision, for logs, /info and output provenance."""
        import torch

        import refound_core

        return {
            "checkpoint": str(self.checkpoint_dir),
            "model": self.config.name,
            "hidden_size": self.config.hidden_size,
            "num_layers": self.config.num_layers,
            "max_poi_tokens": self.config.max_poi_tokens,
            "image_size": self.config.image_size,
            "task": self.task,
            "kind": self.kind,
            "classes": self.classes,
            "head": self.head.spec() if self.head is not None else None,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": "int8-dynamic" if self.int8 else self.precision.dtype_name,
            "precision_reason": self.precision.reason,
            "batch_size": self.batch_size,
            "versions": {"refound": refound_core.__version__, "torch": torch.__version__,
                         "cuda": torch.version.cuda},
        }

    def check_task(self, task: Optional[str]) -> str:
        """The task to predict: the checkpoint's own; InputError when it has no head or another one."""
        if self.head is None:
            raise InputError(f"checkpoint {self.checkpoint_dir} holds no task head (a pre-trained backbone); "
                             "use `refound embed` for region embeddings, or fine-tune a head first")
        own = self.task or "custom"
        if task is not None and task != own:
            raise InputError(f"checkpoint {self.checkpoint_dir} was fine-tuned for {own!r}, not {task!r}; "
                             f"use --task {own} or a checkpoint fine-tuned for {task}")
        return own

    # ------------------------------------------------------------------ public API
    def predict_samples(self, samples: Iterable, task: Optional[str] = None,
                        progress: Optional[Callable] = None, is_canceled: Optional[Callable] = None,
                        with_embeddings: bool = False) -> Iterator[CellResult]:
        """Predictions for every sample, streamed in input order (see module docstring).

        Args:
            samples: iterable of RegionSample (consumed lazily).
            task: expected task (None = the checkpoint's own); InputError on a mismatch.
            progress: ``progress(done_cells, None)`` after each window.
            is_canceled: polled before every batch; True raises :class:`AnalysisCanceled`.
            with_embeddings: also fill ``h_P``, ``h_S``, ``fused`` of each result.
        """
        self.check_task(task)
        return self._run(samples, predict=True, embed=with_embeddings, progress=progress, is_canceled=is_canceled)

    def embed_samples(self, samples: Iterable, progress: Optional[Callable] = None,
                      is_canceled: Optional[Callable] = None) -> Iterator[CellResult]:
        """Region representations (paper 4.3) for every sample: h[P], h[S] and their fusion
        (the head's fusion when the checkpoint has a head, else the average of the present
        modalities). A vector of an absent modality is NaN; insufficient cells are all NaN."""
        return self._run(samples, predict=False, embed=True, progress=progress, is_canceled=is_canceled)

    # ------------------------------------------------------------------ machinery
    def _windows(self, samples: Iterable):
        """(samples, encoded-by-index) per window; runs in the prefetch thread."""
        window, size = [], self.batch_size * WINDOW_BATCHES
        for s in samples:
            window.append(s)
            if len(window) >= size:
                yield self._encode_window(window)
                window = []
        if window:
            yield self._encode_window(window)

    def _encode_window(self, window: list):
        t0 = time.perf_counter()
        encoded = {}
        for i, s in enumerate(window):
            if is_sufficient(s):
                enc = self.featurizer.encode(s, cell_rng(s.cell_id))
                if enc.has_pois or enc.has_image:  # a sliver of image below the coverage threshold is no data
                    encoded[i] = enc
                    self._modality["image" if enc.has_image else "poi_only"] += 1
        self.timings["featurize"] += time.perf_counter() - t0
        return window, encoded

    def _run(self, samples, predict: bool, embed: bool, progress, is_canceled) -> Iterator[CellResult]:
        done = 0
        self._modality = {"image": 0, "poi_only": 0}  # this run's cells by modality (_encode_window)
        self.notices = [m for m in self.notices if not m.startswith(POI_ONLY_NOTICE_START)]
        windows = _prefetch(self._windows(samples), depth=2)
        try:
            for window, encoded in windows:
                outputs = self._infer_window(encoded, predict, embed, is_canceled)
                for i, s in enumerate(window):
                    yield self._result(s, outputs.get(i))
                done += len(window)
                self.timings["cells"] += len(window)
                if progress is not None:
                    progress(done, None)
            if predict and self._modality["image"] and self._modality["poi_only"]:
                self.notices.append(poi_only_notice(self._modality["poi_only"]))
                log.warning(self.notices[-1])
        finally:
            windows.close()  # stop the featurisation thread now, not at garbage collection

    def _infer_window(self, encoded: dict, predict: bool, embed: bool, is_canceled) -> dict:
        """{window index: dict of numpy outputs} for the sufficient cells of one window."""
        idx = list(encoded)
        if not idx:
            return {}
        lengths = np.array([encoded[i].num_tokens for i in idx])
        order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows up early
        sorted_idx = [idx[j] for j in order]
        results, start = {}, 0
        while start < len(sorted_idx):
            if is_canceled is not None and is_canceled():
                raise AnalysisCanceled("analysis canceled")
            chunk = sorted_idx[start:start + self.batch_size]
            try:
                out = self._forward([encoded[i] for i in chunk], predict, embed)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
                if not _is_oom(exc):
                    raise
                self._shrink_batch(exc)
                continue
            for k, i in enumerate(chunk):
                results[i] = {name: arr[k] for name, arr in out.items()}
            start += len(chunk)
        return results

    def _shrink_batch(self, exc: BaseException) -> None:
        torch = self._torch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size <= 1:
            raise InputError(f"out of memory on {self.device} even with batch size 1 ({exc}); free GPU memory "
                             "(close other programs using it), use --device cpu, or use a smaller model") from None
        self.batch_size = max(1, self.batch_size // 2)
        msg = f"out of memory on {self.device}: batch size lowered to {self.batch_size} and the batch retried"
        log.warning(msg)
        self.notices.append(msg)

    def _forward(self, items: list, predict: bool, embed: bool) -> dict:
        torch = self._torch
        from refound_core.model.precision import autocast

        batch = self.featurizer.collate(items, self.config.image_size)
        t0 = time.perf_counter()
        with torch.inference_mode():
            with autocast(self.device, self.precision):
                out = self.model.forward_batch(batch)
            # The head runs in float32 on float32 CLS vectors: it is tiny, and bf16 outputs would be
            # quantised (a probability to 1/256, a population of ~500 to steps of 2).
            with torch.autocast(self.device.type, enabled=False):
                out = dataclasses.replace(out, poi_cls=out.poi_cls.float(), img_cls=out.img_cls.float(),
                                          hidden_states=None)
                res = {}
                if predict:
                    res["values"] = self.head.predict(out)
                if embed:
                    presence = out.presence
                    fused = self.head.fuse(out) if self.head is not None else out.average()
                    nan = torch.tensor(float("nan"), device=fused.device)
                    res["h_P"] = torch.where(presence[:, :1], out.poi_cls, nan)
                    res["h_S"] = torch.where(presence[:, 1:], out.img_cls, nan)
                    res["fused"] = fused
            res = {k: v.float().cpu().numpy() for k, v in res.items()}
            res["image_used"] = out.has_image.cpu().numpy()
        self.timings["model"] += time.perf_counter() - t0
        self.timings["batches"] += 1
        self.timings["predicted"] += len(items)
        self.timings["padded_tokens"] += int(batch["token_ids"].numel())
        self.timings["real_tokens"] += int(sum(e.num_tokens for e in items))
        return res

    def _result(self, sample, out: Optional[dict]) -> CellResult:
        r = CellResult(cell_id=sample.cell_id, bounds=tuple(float(v) for v in sample.bounds), crs=sample.crs,
                       poi_count=int(sample.num_pois), image_coverage=float(sample.image_coverage or 0.0),
                       sufficient=out is not None)
        if out is None:
            return r
        r.image_used = bool(out.get("image_used", False))
        if "values" in out:
            values = _inverse_target(out["values"].astype(np.float64), self.task_meta)
            r.values = values
            r.value = float(values[0]) if values.shape[0] == 1 else float(np.argmax(values))
        for name in EMBEDDINGS:
            if name in out:
                setattr(r, name, out[name].astype(np.float32))
        return r


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def load_predictor(checkpoint_dir, device: str = "auto", batch_size: Optional[int] = None,
                   min_image_coverage: Optional[float] = None, int8: bool = False) -> "Predictor":
    """A Predictor loaded once per process and reused (the plugin and the Processing algorithms
    call ``run_analysis`` many times; loading refound_base takes seconds).

    Keyed by the checkpoint folder, the modification time of its config.json and the device; only
    the most recently used model is kept, so switching checkpoints does not pile up GPU memory.
    ``batch_size`` (when given) is applied to the cached instance.
    """
    path = Path(checkpoint_dir).resolve()
    try:
        stamp = (path / "config.json").stat().st_mtime_ns
    except OSError:
        stamp = None  # let Predictor report the missing/damaged checkpoint
    key = (str(path), stamp, (device or "auto").lower(), min_image_coverage, bool(int8))
    with _CACHE_LOCK:
        pred = _CACHE.get(key)
        if pred is None:
            _CACHE.clear()
            pred = Predictor(path, device=device, batch_size=batch_size, min_image_coverage=min_image_coverage,
                             int8=int8)
            if stamp is not None:
                _CACHE[key] = pred
        elif batch_size:
            pred.batch_size = int(batch_size)
    return pred


def _inverse_target(values: np.ndarray, task_meta: dict) -> np.ndarray:
    """Undo the regression target normalisation stored with the head, as ``refound finetune``
    writes it (``training/finetune/loop.py`` TargetScaler): ``y = v * std + mean`` with
    ``task.target_scaler = {"mean", "std"}``, then ``expm1`` when ``task.log_target`` (the head
    learnt log1p targets). Binary/multiclass outputs and heads without metadata are unchanged."""
    if task_meta.get("kind", "regression") != "regression":
        return values
    scaler = task_meta.get("target_scaler")
    if isinstance(scaler, dict):
        values = values * float(scaler.get("std", 1.0)) + float(scaler.get("mean", 0.0))
    if task_meta.get("log_target"):
        with np.errstate(over="ignore"):
            # log1p targets are counts: expm1 of a slightly negative output is not a population
            values = np.maximum(np.expm1(values), 0.0)
    return values


_END = object()


def _prefetch(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (bounded queue).

    A thread, not worker processes: inside QGIS ``sys.executable`` is not a Python that can start
    multiprocessing workers (SETUP-NOTES pitfall 7), and the heavy parts (GDAL reads, the Rust
    tokenizer, torch) release the GIL. Exceptions in the thread are re-raised here; closing the
    consumer early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    t = threading.Thread(target=produce, name="refound-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + 60.0  # a producer stuck upstream is abandoned (daemon thread)
        while t.is_alive() and time.monotonic() < deadline:  # drain so a blocked put() can finish
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


