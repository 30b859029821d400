"""The region dataset folder: cells with their POIs, satellite image chips and labels, on disk.

Written once by :class:`RegionDatasetWriter` (cell by cell, so peak memory does not grow with the
city), read many times by :class:`RegionDataset` (an indexable of :class:`RegionSample`, streamed
from memory maps, safe in DataLoader workers). Layout, format version 1 (docs/DATA-FORMAT.md)::

    DS/
      meta.json             format_version, crs, cell_size, image_size, bounds, counts, provenance
      cells.parquet         one row per cell: cell_id, col, row, bounds, poi_start, poi_count, image_coverage
      pois.arrow            Arrow IPC file (memory-mapped): name, category, x, y, value.<field>...
      images.u8             raw uint8 [N, S, S, 3] (row 0 = north; zeros where there is no image)
      image_valid.bits      pixel validity of partial chips: np.packbits of bool [S, S] per cell
                            (read only for cells with 0 < image_coverage < 1; absent in older folders)
      labels.parquet        cell_id + one float64 column per label (NaN = unknown) + auxiliary columns
      category_vocab.json   CategoryVocab of the POI categories (refound_core.data.vocab)
      tokenizer/            PoiTokenizer extended with the data's CJK characters (refound_core.data.tokenizer)
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.data.sample import RegionSample
from refound_core.errors import InputError

FORMAT_VERSION = 1
META = "meta.json"
CELLS = "cells.parquet"
POIS = "pois.arrow"
IMAGES = "images.u8"
IMAGE_VALID = "image_valid.bits"
LABELS = "labels.parquet"
VOCAB = "category_vocab.json"
TOKENIZER = "tokenizer"
VALUE_PREFIX = "value."

_CELL_ID = re.compile(r"/(-?\d+)_(-?\d+)$")


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask (mkdtemp/mkstemp create private 0700/0600 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1)
    os.chmod(tmp, _umask_mode(0o666))
    os.replace(tmp, path)


class RegionDatasetWriter:
    """Streams cells into a new dataset folder, built in ``DS.tmp-xxxx`` and renamed on :meth:`close`.

    Args:
        folder: the dataset folder to create.
        crs, cell_size, image_size: the grid and chip size every sample must match.
        poi_value_fields: per-POI numeric fields to keep (``sample.poi_values[field]``).
        label_names: the label columns (``sample.labels[name]``; absent -> NaN).
        label_aux: extra per-cell numbers stored beside the labels (e.g. ``urban_village_overlap``).
        provenance: free-form dict stored in ``meta.json`` (sources, synthetic/real, seed...).
        overwrite: replace an existing folder (else InputError).
        flush_cells, flush_pois: buffer sizes; they bound the writer's memory.

    Use as a context manager: on an exception the temporary folder is removed and nothing appears.
    """

    def __init__(self, folder, *, crs: str, cell_size: float, image_size: int,
                 poi_value_fields: Sequence[str] = (), label_names: Sequence[str] = (),
                 label_aux: Sequence[str] = (), provenance: Optional[dict] = None, overwrite: bool = False,
                 flush_cells: int = 2048, flush_pois: int = 65536):
        import pyarrow as pa

        self.folder = Path(folder)
        if self.folder.exists() and not overwrite:
            raise InputError(f"output {self.folder} already exists; choose another --out or pass --overwrite")
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.folder.name}.tmp-", dir=self.folder.parent))
        os.chmod(self.tmp, _umask_mode(0o777))
        self.overwrite = overwrite
        self.crs, self.cell_size, self.image_size = str(crs), float(cell_size), int(image_size)
        self.value_fields = list(poi_value_fields)
        self.label_names = list(label_names)
        self.label_aux = list(label_aux)
        self.provenance = dict(provenance or {})
        self._flush_cells, self._flush_pois = int(flush_cells), int(flush_pois)
        self._poi_schema = pa.schema([("name", pa.string()), ("category", pa.string()), ("x", pa.float64()),
                                      ("y", pa.float64())]
                                     + [(VALUE_PREFIX + f, pa.float64()) for f in self.value_fields])
        self._poi_sink = pa.OSFile(str(self.tmp / POIS), "wb")
        self._poi_writer = pa.ipc.new_file(self._poi_sink, self._poi_schema)
        self._images = open(self.tmp / IMAGES, "wb")
        self._valid = open(self.tmp / IMAGE_VALID, "wb")
        self._valid_bytes = -(-image_size * image_size // 8)
        self._cells_writer = None
        self._labels_writer = None
        self._cell_buf: dict = {k: [] for k in ("cell_id", "col", "row", "xmin", "ymin", "xmax", "ymax",
                                                 "poi_start", "poi_count", "image_coverage")}
        self._label_buf: dict = {k: [] for k in ["cell_id", *self.label_names, *self.label_aux]}
        self._poi_buf: list = []
        self._poi_buffered = 0
        self.num_cells = 0
        self.num_pois = 0
        self.num_images = 0
        self._bounds = [math.inf, math.inf, -math.inf, -math.inf]
        self._categories: set = set()
        self._closed = False

    # ------------------------------------------------------------------ writing
    def add(self, sample: RegionSample, aux: Optional[dict] = None) -> int:
        """Append one cell; returns its index. ``aux`` holds the ``label_aux`` values."""
        if self._closed:
            raise RuntimeError("dataset writer is closed")
        if sample.crs != self.crs:
            raise ValueError(f"sample {sample.cell_id} is in {sample.crs}, the dataset in {self.crs}")
        s = self.image_size
        if sample.image is not None:
            img = np.asarray(sample.image)
            if img.shape != (s, s, 3) or img.dtype != np.uint8:
                raise ValueError(f"sample {sample.cell_id}: image {img.shape} {img.dtype}, expected ({s}, {s}, 3) uint8")
            self._images.write(np.ascontiguousarray(img).tobytes())
            coverage = float(sample.image_coverage)
            self.num_images += coverage > 0
        else:  # a hole, not written zeros: POI-only datasets stay small on disk (sparse file)
            self._images.seek(s * s * 3, os.SEEK_CUR)
            coverage = 0.0
        if sample.image is not None and sample.image_valid is not None and 0.0 < coverage < 1.0:
            mask = np.asarray(sample.image_valid, dtype=bool)
            if mask.shape != (s, s):
                raise ValueError(f"sample {sample.cell_id}: image_valid {mask.shape}, expected ({s}, {s})")
            self._valid.write(np.packbits(mask).tobytes())
        else:  # fully valid (or no image): a hole, as above
            self._valid.seek(self._valid_bytes, os.SEEK_CUR)
        n = sample.num_pois
        xy = np.asarray(sample.poi_xy, dtype=np.float64).reshape(-1, 2)
        if len(sample.poi_categories) != n or xy.shape[0] != n:
            raise ValueError(f"sample {sample.cell_id}: {n} names, {len(sample.poi_categories)} categories, "
                             f"{xy.shape[0]} locations")
        if n:
            cols = {"name": [str(v) for v in sample.poi_names], "category": [str(v) for v in sample.poi_categories],
                    "x": xy[:, 0], "y": xy[:, 1]}
            for f in self.value_fields:
                v = sample.poi_values.get(f)
                cols[VALUE_PREFIX + f] = np.full(n, np.nan) if v is None else np.asarray(v, dtype=np.float64)
            self._poi_buf.append(cols)
            self._poi_buffered += n
            self._categories.update(c for c in cols["category"] if c)
            if self._poi_buffered >= self._flush_pois:
                self._flush_poi_buf()
        m = _CELL_ID.search(sample.cell_id)
        col, row = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        b = [float(v) for v in sample.bounds]
        for key, val in zip(("cell_id", "col", "row", "xmin", "ymin", "xmax", "ymax", "poi_start", "poi_count",
                             "image_coverage"), (sample.cell_id, col, row, *b, self.num_pois, n, coverage)):
            self._cell_buf[key].append(val)
        self._label_buf["cell_id"].append(sample.cell_id)
        for name in self.label_names:
            v = sample.labels.get(name)
            self._label_buf[name].append(np.nan if v is None else float(v))
        for name in self.label_aux:
            v = (aux or {}).get(name)
            self._label_buf[name].append(np.nan if v is None else float(v))
        self._bounds = [min(self._bounds[0], b[0]), min(self._bounds[1], b[1]),
                        max(self._bounds[2], b[2]), max(self._bounds[3], b[3])]
        self.num_pois += n
        self.num_cells += 1
        if len(self._cell_buf["cell_id"]) >= self._flush_cells:
            self._flush_tables()
        return self.num_cells - 1

    def _flush_poi_buf(self):
        import pyarrow as pa

        if not self._poi_buf:
            return
        arrays = [pa.array([v for part in self._poi_buf for v in part[f.name]], type=f.type)
                  if f.type == pa.string() else pa.array(np.concatenate([part[f.name] for part in self._poi_buf]))
                  for f in self._poi_schema]
        self._poi_writer.write_batch(pa.record_batch(arrays, schema=self._poi_schema))
        self._poi_buf, self._poi_buffered = [], 0

    def _flush_tables(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._cell_buf["cell_id"]:
            return
        cells = pa.table({"cell_id": pa.array(self._cell_buf["cell_id"], pa.string()),
                          "col": pa.array(self._cell_buf["col"], pa.int64()),
                          "row": pa.array(self._cell_buf["row"], pa.int64()),
                          **{k: pa.array(self._cell_buf[k], pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")},
                          "poi_start": pa.array(self._cell_buf["poi_start"], pa.int64()),
                          "poi_count": pa.array(self._cell_buf["poi_count"], pa.int32()),
                          "image_coverage": pa.array(self._cell_buf["image_coverage"], pa.float32())})
        labels = pa.table({"cell_id": pa.array(self._label_buf["cell_id"], pa.string()),
                           **{k: pa.array(self._label_buf[k], pa.float64())
                              for k in [*self.label_names, *self.label_aux]}})
        if self._cells_writer is None:
            self._cells_writer = pq.ParquetWriter(str(self.tmp / CELLS), cells.schema)
            self._labels_writer = pq.ParquetWriter(str(self.tmp / LABELS), labels.schema)
        self._cells_writer.write_table(cells)
        self._labels_writer.write_table(labels)
        for buf in (self._cell_buf, self._label_buf):
            for v in buf.values():
                v.clear()

    # ------------------------------------------------------------------ finishing
    def close(self, *, build_vocab: bool = True, build_tokenizer: bool = True, extra_meta: Optional[dict] = None) -> Path:
        """Finish the files, write vocab, tokenizer and ``meta.json``, and move the folder in place."""
        if self._closed:
            return self.folder
        if self.num_cells == 0:
            self.abort()
            raise InputError(f"no cell of the requested extent holds POIs or imagery, so dataset {self.folder} "
                             "would be empty; check that the extent, POIs and imagery overlap")
        self._flush_poi_buf()
        self._flush_tables()
        self._poi_writer.close()
        self._poi_sink.close()
        self._images.truncate(self.num_cells * self.image_size ** 2 * 3)  # materialise a trailing hole
        self._images.close()
        self._valid.truncate(self.num_cells * self._valid_bytes)
        self._valid.close()
        self._cells_writer.close()
        self._labels_writer.close()
        vocab_info = tok_info = None
        if build_vocab:
            vocab_info = self._write_vocab()
        if build_tokenizer:
            tok_info = self._write_tokenizer()
        b = self._bounds
        meta = {
            "format": "refound-region-dataset", "format_version": FORMAT_VERSION,
            "crs": self.crs, "cell_size": self.cell_size, "image_size": self.image_size,
            "bounds": b, "num_cells": self.num_cells, "num_pois": self.num_pois, "num_images": int(self.num_images),
            "poi_value_fields": self.value_fields, "label_names": self.label_names, "label_aux": self.label_aux,
            "files": {"cells": CELLS, "pois": POIS, "images": IMAGES, "labels": LABELS,
                      "category_vocab": vocab_info, "tokenizer": tok_info},
            "provenance": self.provenance,
        }
        meta.update(extra_meta or {})
        _write_json_atomic(self.tmp / META, meta)
        self._closed = True
        self._move_into_place()
        return self.folder

    def _write_vocab(self) -> Optional[str]:
        try:
            from refound_core.data.vocab import CategoryVocab
        except ImportError:  # built by another part of the project; the dataset is usable without it
            return None
        CategoryVocab.build(sorted(self._categories)).save(self.tmp / VOCAB)
        os.chmod(self.tmp / VOCAB, _umask_mode(0o666))
        return VOCAB

    def _write_tokenizer(self) -> Optional[str]:
        try:
            from refound_core.data.tokenizer import PoiTokenizer

            tok = PoiTokenizer.default()
        except (ImportError, InputError):  # no tokenizer module / default vocabulary: skip, say so in meta
            return None
        import pyarrow as pa

        with pa.memory_map(str(self.tmp / POIS), "r") as source:
            reader = pa.ipc.open_file(source)
            names = (n for i in range(reader.num_record_batches)
                     for n in reader.get_batch(i).column(0).to_pylist())
            tok.extend_with_characters(names)
        tok.save(self.tmp / TOKENIZER)
        return TOKENIZER

    def _move_into_place(self):
        old = None
        if self.folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{self.folder.name}.old-", dir=self.folder.parent))
            os.replace(self.folder, old / "ds")
        os.replace(self.tmp, self.folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self):
        """Drop everything written so far (the target folder is left untouched)."""
        for h in (self._images, self._valid, self._poi_sink):
            try:
                h.close()
            except Exception:
                pass
        for w in (self._cells_writer, self._labels_writer):
            if w is not None:
                try:
                    w.close()
                except Exception:
                    pass
        self._closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


class RegionDataset:
    """A region dataset folder as an indexable of :class:`RegionSample` (torch-free).

    ``cells.parquet`` and ``labels.parquet`` are loaded as small numpy arrays; POIs and images are
    memory-mapped on first access in each process (after a fork or unpickling in a DataLoader
    worker they are reopened), so nothing city-sized is copied.

    Attributes: ``meta``, ``crs``, ``cell_size``, ``image_size``, ``cell_ids`` (list of str),
    ``image_coverage`` (float32 [N]), ``poi_count`` (int [N]), ``labels`` ({name: float64 [N]}),
    ``label_names``, ``label_aux`` ({name: float64 [N]}).
    """

    def __init__(self, folder):
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise InputError(f"{self.folder} is not a region dataset (no {META}); build one with "
                             "`refound build-dataset --out DIR ...`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{meta_path} is not valid JSON ({exc}); rebuild the dataset") from None
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"region dataset {self.folder} has format_version {version!r}, this version of refound "
                             f"reads {FORMAT_VERSION}; rebuild it with `refound build-dataset`")
        self.crs = self.meta["crs"]
        self.cell_size = float(self.meta["cell_size"])
        self.image_size = int(self.meta["image_size"])
        self.label_names = list(self.meta.get("label_names", []))
        self.value_fields = list(self.meta.get("poi_value_fields", []))
        cells = pq.read_table(self.folder / CELLS)
        self.cell_ids = cells.column("cell_id").to_pylist()
        self.bounds = np.stack([cells.column(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")], axis=1)
        self.col = cells.column("col").to_numpy()
        self.row = cells.column("row").to_numpy()
        self.poi_start = cells.column("poi_start").to_numpy()
        self.poi_count = cells.column("poi_count").to_numpy()
        self.image_coverage = cells.column("image_coverage").to_numpy()
        labels = pq.read_table(self.folder / LABELS)
        self.labels = {k: labels.column(k).to_numpy() for k in self.label_names}
        self.label_aux = {k: labels.column(k).to_numpy() for k in self.meta.get("label_aux", [])}
        n = len(self.cell_ids)
        size = (self.folder / IMAGES).stat().st_size
        if size != n * self.image_size * self.image_size * 3:
            raise InputError(f"{self.folder / IMAGES} holds {size} bytes, not {n} images of {self.image_size} px; "
                             "the dataset is incomplete, rebuild it")
        self._index = None
        self._pid = None
        self._images = None
        self._pois = None

    def __len__(self) -> int:
        return len(self.cell_ids)

    def __repr__(self) -> str:
        return f"RegionDataset({str(self.folder)!r}, {len(self)} cells, {self.crs}, {self.cell_size:g} m)"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = state["_pois"] = None  # memory maps are reopened in each process
        state["_pid"] = None
        return state

    def _open(self):
        if self._pid != os.getpid() or self._images is None:
            import pyarrow as pa

            s = self.image_size
            self._images = np.memmap(self.folder / IMAGES, dtype=np.uint8, mode="r", shape=(len(self), s, s, 3)) \
                if len(self) else np.zeros((0, s, s, 3), np.uint8)
            self._pois = pa.ipc.open_file(pa.memory_map(str(self.folder / POIS), "r")).read_all()
            self._pid = os.getpid()

    @property
    def images(self) -> np.ndarray:
        """uint8 ``[N, S, S, 3]`` memory map of every chip."""
        self._open()
        return self._images

    def cells(self) -> list:
        """The grid cells (:class:`refound_core.data.grid.Cell`) in dataset order."""
        from refound_core.data.grid import Cell

        return [Cell(cid, int(c), int(r), tuple(float(v) for v in b), self.crs)
                for cid, c, r, b in zip(self.cell_ids, self.col, self.row, self.bounds)]

    @property
    def label_info(self) -> dict:
        """``{label: {"kind", "stat", "classes", "source", ...}}`` for labels added by
        :func:`add_label_column` (``refound add-label``); the built-in labels have none."""
        return dict(self.meta.get("label_info") or {})

    def index_of(self, cell_id: str) -> int:
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self.cell_ids)}
        try:
            return self._index[cell_id]
        except KeyError:
            raise KeyError(f"cell {cell_id!r} is not in {self!r}") from None

    def __getitem__(self, i: int) -> RegionSample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} cells")
        self._open()
        start, count = int(self.poi_start[i]), int(self.poi_count[i])
        pois = self._pois.slice(start, count)
        coverage = float(self.image_coverage[i])
        image = np.array(self._images[i]) if coverage > 0 else None
        valid = self._image_valid(i) if 0.0 < coverage < 1.0 else None
        xy = np.stack([pois.column("x").to_numpy(), pois.column("y").to_numpy()], axis=1) if count \
            else np.zeros((0, 2), np.float64)
        labels = {k: float(v[i]) for k, v in self.labels.items() if not np.isnan(v[i])}
        return RegionSample(
            cell_id=self.cell_ids[i], bounds=tuple(float(v) for v in self.bounds[i]), crs=self.crs,
            poi_names=pois.column("name").to_pylist(), poi_categories=pois.column("category").to_pylist(),
            poi_xy=xy.astype(np.float64, copy=False), image=image, image_coverage=coverage, labels=labels,
            poi_values={f: pois.column(VALUE_PREFIX + f).to_numpy() for f in self.value_fields}, image_valid=valid)

    def _image_valid(self, i: int) -> Optional[np.ndarray]:
        """bool ``[S, S]`` pixel validity of cell ``i`` (None for folders written before the mask was stored)."""
        path = self.folder / IMAGE_VALID
        if not path.exists():
            return None
        s = self.image_size
        nbytes = -(-s * s // 8)
        with open(path, "rb") as fh:
            fh.seek(i * nbytes)
            raw = np.frombuffer(fh.read(nbytes), dtype=np.uint8)
        if raw.size != nbytes:
            return None
        return np.unpackbits(raw)[:s * s].reshape(s, s).astype(bool)

    @property
    def vocab_path(self) -> Optional[Path]:
        name = (self.meta.get("files") or {}).get("category_vocab")
        return self.folder / name if name else None

    @property
    def tokenizer_path(self) -> Optional[Path]:
        name = (self.meta.get("files") or {}).get("tokenizer")
        return self.folder / name if name else None

    def load_vocab(self):
        from refound_core.data.vocab import CategoryVocab

        if self.vocab_path is None:
            raise InputError(f"region dataset {self.folder} has no category vocabulary; rebuild it")
        return CategoryVocab.load(self.vocab_path)

    def load_tokenizer(self):
        from refound_core.data.tokenizer import PoiTokenizer

        if self.tokenizer_path is None:
            raise InputError(f"region dataset {self.folder} has no tokenizer folder; rebuild it")
        return PoiTokenizer.load(self.tokenizer_path)


BUILTIN_LABELS = ("urban_village", "population", "commercial")
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_new_label(ds: "RegionDataset", name: str, overwrite: bool = False) -> None:
    """One InputError when ``name`` cannot become a new label column of ``ds``."""
    if not _LABEL_NAME.match(name or ""):
        raise InputError(f"label name {name!r} must be a letter or _ then letters, digits or _ (at most 64); "
                         "it becomes the task name of `refound evaluate --task NAME`")
    if name in ds.meta.get("label_aux", []):
        raise InputError(f"{name!r} is an auxiliary column of {ds.folder}; choose another --name")
    if name in ds.label_names and not overwrite:
        what = "a built-in label" if name in BUILTIN_LABELS else "a label"
        raise InputError(f"{ds.folder} already has {what} {name!r}; choose another --name or pass --overwrite")


def add_label_column(folder, name: str, values: np.ndarray, info: dict, overwrite: bool = False) -> Path:
    """Add (or with ``overwrite`` replace) one label column of an existing region dataset.

    ``labels.parquet`` is rewritten to a temporary file and moved in place, then ``meta.json``
    (``label_names`` + ``label_info[name] = info``); a column the meta does not name is ignored
    by readers, so a kill between the two leaves a readable dataset without the new label.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = RegionDataset(folder)
    check_new_label(ds, name, overwrite)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(ds):
        raise InputError(f"label {name!r} has {len(values)} values for the {len(ds)} cells of {ds.folder}")
    table = pq.read_table(ds.folder / LABELS)
    column = pa.array(values, pa.float64())
    if name in table.column_names:
        table = table.set_column(table.column_names.index(name), name, column)
    else:
        table = table.append_column(name, column)
    fd, tmp = tempfile.mkstemp(prefix=f".{LABELS}.", suffix=".tmp", dir=ds.folder)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, ds.folder / LABELS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = dict(ds.meta)
    if name not in meta.get("label_names", []):
        meta["label_names"] = [*meta.get("label_names", []), name]
    meta["label_info"] = {**(meta.get("label_info") or {}), name: info}
    _write_json_atomic(ds.folder / META, meta)
    return ds.folder
