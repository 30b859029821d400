"""Where the cells' data comes from: the :class:`CellSource` interface and its file implementation.

:func:`refound_core.inference.pipeline.run_analysis` owns the grid, the blocks, prefetching,
batching, cancellation and sharding; a source only answers three questions:

1. :meth:`CellSource.locate`: in which metric grid CRS does the request's area lie, and what is
   the area's bounding box there? (Files answer with pyproj through ``Grid.for_extent``; the
   QGIS plugin's ``QgisCellSource`` with QGIS's own transforms.)
2. :meth:`CellSource.prepare`: get ready to read the cells of this grid (open files, check the
   imagery covers the area).
3. :meth:`CellSource.read_block`: the :class:`~refound_core.data.sample.RegionSample` of each
   cell of one block (a rectangle of cells, the unit of sharding), in the block's order.

Seams for later work: a polygon AOI is a source whose ``locate`` also returns which cells to keep
(``GridFrame``); a resumable run skips blocks whose output shard exists; analytics read
embedding outputs back through a source over those files.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from refound_core.errors import InputError

IMAGE_THREADS = 4  # concurrent windowed chip reads (GDAL releases the GIL while reading)


@dataclass
class GridFrame:
    """A request's area in grid terms, as a source resolved it.

    Attributes:
        crs: the metric grid CRS (``"EPSG:32650"``): the area's own when it is metric, else the UTM
            zone of its centre (the rule of ``refound_core.data.grid.Grid.for_extent``).
        bounds: ``(xmin, ymin, xmax, ymax)`` of the area in ``crs``; None when the source brings
            its own cells (ready samples: :meth:`CellSource.own_blocks`).
        notices: human-readable notes for the run's summary (e.g. which CRS was assumed).
        keep: optional ``keep(cell) -> bool``: only those cells of the bounds are analysed (the
            seam for polygon AOIs; the plugin's head training keeps its labelled cells).
    """

    crs: str
    bounds: Optional[tuple]
    notices: list = field(default_factory=list)
    keep: Optional[Callable] = None


class CellSource(ABC):
    """Cells' POIs and image chips for :func:`~refound_core.inference.pipeline.run_analysis`.

    ``timer`` (set by run_analysis) is ``timer(stage, seconds)`` for the run's stage breakdown.
    ``read_block`` runs in the pipeline's prefetch thread, one block at a time.
    """

    timer: Callable[[str, float], None] = staticmethod(lambda stage, seconds: None)

    @abstractmethod
    def locate(self, request) -> GridFrame:
        """The grid CRS and the area's bounds in it; InputError for an unusable area."""

    def prepare(self, grid, ranges: tuple, image_size: int) -> None:
        """Ready to read cells of ``grid`` (``refound_core.data.grid.CellGrid``) inside ``ranges``
        (``(col0, col1, row0, row1)``) with chips of ``image_size`` pixels."""

    @abstractmethod
    def read_block(self, cells: list) -> list:
        """One RegionSample per cell (``refound_core.data.grid.Cell``), same order."""

    def own_blocks(self, block_cells: int) -> Iterator[list]:
        """Blocks of ready samples, for a source whose ``locate`` returns no bounds."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and threads (called once, whatever happened)."""


class SampleSource(CellSource):
    """Ready RegionSamples (the synthetic city, tests, callers with their own adapter): no grid,
    streamed block by block in their own order."""

    def __init__(self, samples: Iterable):
        self._iter = iter(samples)
        self._first = next(self._iter, None)

    def locate(self, request) -> GridFrame:
        return GridFrame(self._first.crs if self._first is not None else "EPSG:3857", None)

    def read_block(self, cells: list) -> list:
        raise NotImplementedError("SampleSource brings its own cells (own_blocks)")

    def own_blocks(self, block_cells: int) -> Iterator[list]:
        block = [] if self._first is None else [self._first]
        for s in self._iter:
            if len(block) >= block_cells:
                yield block
                block = []
            block.append(s)
        if block:
            yield block


class FileCellSource(CellSource):
    """POIs from a vector file (GeoPackage, Shapefile, GeoJSON, CSV, .osm.pbf through
    ``refound_core.data.poi_sources``) and imagery from a GDAL raster (windowed rasterio chips,
    a small pool of reader threads).

    Args:
        pois, poi_layer, name_field, category_field: the POI file and its mapping (None: no POIs).
        imagery: raster path (None: POI-only).
    """

    def __init__(self, pois: Optional[str] = None, imagery: Optional[str] = None, poi_layer: Optional[str] = None,
                 name_field: str = "name", category_field: str = "category"):
        if pois is None and imagery is None:
            raise InputError("neither POIs nor imagery given: every cell would lack data; pass --pois and/or --imagery")
        from refound_core.data.imagery_source import is_gdal_path

        for what, p in (("POI file", pois), ("imagery raster", imagery)):
            if p is not None and not is_gdal_path(p) and not Path(p).exists():
                raise InputError(f"{what} {p} does not exist; check the path")
        self.poi_path, self.imagery = pois, imagery
        self.poi_layer, self.name_field, self.category_field = poi_layer, name_field, category_field
        self.pois = None
        self.grid = None
        self._local = threading.local()
        self._readers: list = []
        self._pool: Optional[ThreadPoolExecutor] = None
        self.image_size = 256

    @classmethod
    def from_request(cls, request) -> "FileCellSource":
        return cls(request.pois, request.imagery, request.poi_layer, request.name_field, request.category_field)

    def locate(self, request) -> GridFrame:
        from refound_core.data.grid import Grid
        from refound_core.data.imagery import ChipReader

        if request.extent is None:
            raise InputError("no extent given; pass --extent XMIN,YMIN,XMAX,YMAX[,CRS]")
        notices = []
        extent_crs = request.extent_crs
        if self.poi_path is not None:
            from refound_core.data.poi_sources import read_pois

            t0 = time.perf_counter()
            self.pois = read_pois(self.poi_path, name_field=self.name_field, category_field=self.category_field,
                                  layer=self.poi_layer)
            from refound_core.data.validate import check_pois, geometry_notice

            for n in check_pois(self.pois, self.poi_path, self.name_field) + [geometry_notice(self.poi_path,
                                                                                              self.poi_layer)]:
                if n:  # a conversion rule applied: said when it happens (the CLI's stderr, the plugin's log)
                    logging.getLogger("refound.inference").warning("%s", n)
                    notices.append(n)
            self.timer("poi_join", time.perf_counter() - t0)
            if extent_crs is None:
                extent_crs = self.pois.crs
                notices.append(f"extent taken to be in the POI file's CRS {self.pois.crs}")
        if extent_crs is None:  # imagery only
            with ChipReader(self.imagery) as r:
                extent_crs = r.crs.to_wkt()
        t0 = time.perf_counter()
        grid = Grid.for_extent(request.extent, extent_crs, request.cell_size)
        bounds = grid.to_grid_bounds(*request.extent, extent_crs=extent_crs)
        self.timer("grid", time.perf_counter() - t0)
        return GridFrame(grid.crs, tuple(bounds), notices)

    def prepare(self, grid, ranges: tuple, image_size: int) -> None:
        self.grid, self.image_size = grid, int(image_size)
        if self.pois is not None:
            t0 = time.perf_counter()
            col0, col1, row0, row1 = ranges
            pois = self.pois.to_crs(grid.crs)
            cols, rows = grid.cell_indices(pois.x, pois.y)
            keep = (cols >= col0) & (cols < col1) & (rows >= row0) & (rows < row1)
            self.pois = pois.take(np.flatnonzero(keep))  # only the area's POIs are kept in memory
            self.timer("poi_join", time.perf_counter() - t0)
        if self.imagery is not None:
            self._check_imagery(grid, ranges)
            self._pool = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="refound-chips")

    def _check_imagery(self, grid, ranges: tuple) -> None:
        """Fail early on a bad raster or one far from the area (it would predict blank chips)."""
        from refound_core.data.imagery import ChipReader
        from refound_core.data.validate import check_imagery_overlap

        ChipReader(self.imagery, size_px=self.image_size).close()
        col0, col1, row0, row1 = ranges
        s = grid.cell_size
        check_imagery_overlap(self.imagery, (col0 * s, row0 * s, col1 * s, row1 * s), grid.crs)

    def _reader(self):
        from refound_core.data.imagery import ChipReader

        r = getattr(self._local, "reader", None)
        if r is None:  # one GDAL dataset handle per thread (handles are not thread-safe)
            r = ChipReader(self.imagery, size_px=self.image_size)
            self._local.reader = r
            self._readers.append(r)
        return r

    def _read_chip(self, cell):
        t0 = time.perf_counter()
        chip = self._reader().read_cell(cell)  # a damaged file raises InputError (imagery.py)
        self.timer("image_reads", time.perf_counter() - t0)
        return chip

    def read_block(self, cells: list) -> list:
        from refound_core.data.poi_sources import assign_to_cells
        from refound_core.data.sample import RegionSample

        chips = self._pool.map(self._read_chip, cells) if self._pool is not None else None
        t0 = time.perf_counter()
        assign = None
        if self.pois is not None and len(self.pois):
            assign = assign_to_cells(self.pois.x, self.pois.y, self.grid, cells)
        out = []
        for i, cell in enumerate(cells):
            if assign is not None:
                idx = assign.indices(i)
                names, cats = self.pois.names[idx].tolist(), self.pois.categories[idx].tolist()
                xy = np.column_stack([self.pois.x[idx], self.pois.y[idx]])
            else:
                names, cats, xy = [], [], np.zeros((0, 2))
            out.append(RegionSample(cell.id, cell.bounds, cell.crs, names, cats, xy))
        self.timer("poi_join", time.perf_counter() - t0)
        if chips is not None:
            for s, chip in zip(out, chips):
                s.image, s.image_coverage, s.image_valid = chip.image, float(chip.coverage), chip.valid
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for r in self._readers:
            r.close()


def source_for_request(request) -> CellSource:
    """The source a plain request names: its ready samples, else its files."""
    if request.samples is not None:
        return SampleSource(request.samples)
    return FileCellSource.from_request(request)
