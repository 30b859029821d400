"""Satellite image chips for grid cells, read from any GDAL raster (paper 5.1.1).

The paper's satellite image of a region is a 3-channel 256 x 256 RGB image at 1.0 m (256 m cells).
:class:`ChipReader` produces exactly that for any cell of :mod:`refound_core.data.grid`, from any
raster GDAL opens, whatever its CRS, resolution, band count or data type:

* windowed reads only: each chip is one small ``rasterio.vrt.WarpedVRT`` whose grid *is* the chip
  (cell bounds, cell CRS, ``size_px`` x ``size_px``), so GDAL reads just the blocks under the cell
  and reprojects/resamples them (bilinear; nearest for paletted rasters) - the raster never sits
  in memory whole;
* bands: the first three bands by default (RGB of RGB, RGBA or RGBN imagery) or ``bands=(r, g, b)``
  (1-based); a 1-band raster is replicated to grey RGB (``Chip.replicated`` / ``reader.replicated``
  flag it), a paletted one is expanded through its colour table, and a 2-band raster is refused;
* data type: uint8 is used as is; any other type is linearly rescaled per band from
  ``[p2, p98]`` to ``[0, 255]`` (clipped), where p2/p98 are the 2nd/98th percentiles of the band's
  valid pixels in a decimated read of at most 1024 px a side, computed once per reader;
  ``value_range=(lo, hi)`` replaces them by one fixed range for all bands;
* validity: nodata values, alpha bands, masks and pixels outside the raster are invalid. The chip's
  ``coverage`` is the fraction of its pixels that are valid (GDAL's warped alpha >= 128, i.e. at
  least half of the resampling kernel on valid source pixels); invalid pixels are 0 (black). A
  chip with no valid pixel - cell outside the raster, or nodata everywhere - has ``image=None`` and
  ``coverage=0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError

STATS_MAX_PX = 1024
PERCENTILES = (2.0, 98.0)


@dataclass
class Chip:
    """An RGB chip of one cell: ``image`` uint8 ``[S, S, 3]`` (row 0 = north) or None, and
    ``valid`` bool ``[S, S]``, True where the pixel holds data (None when every pixel does)."""

    image: Optional[np.ndarray]
    coverage: float
    replicated: bool = False
    valid: Optional[np.ndarray] = None


class ChipReader:
    """Reads RGB chips for cells from one raster; see the module docstring for the rules.

    Args:
        path: any raster GDAL opens (GeoTIFF, VRT, JPEG2000, ..., or a ``/vsi*`` path such as
            ``/vsicurl/https://.../cog.tif``: read as windows, never whole).
        size_px: chip side in pixels (paper: 256 for a 256 m cell, i.e. 1 m).
        bands: 1-based band indices ``(r, g, b)``; default the first three (or band 1 replicated).
        value_range: fixed ``(lo, hi)`` for non-uint8 rasters instead of the percentile stretch.

    Use as a context manager or call :meth:`close`. It is picklable (reopens lazily in a worker).
    """

    def __init__(self, path, size_px: int = 256, bands: Optional[Sequence[int]] = None,
                 value_range: Optional[Sequence[float]] = None):
        from refound_core.data.imagery_source import is_gdal_path

        self.remote = is_gdal_path(path)  # /vsicurl/, /vsis3/ ...: GDAL resolves it (no local check)
        self.path = path if self.remote else Path(path)
        if not self.remote and not self.path.exists():
            raise InputError(f"imagery raster {self.path} does not exist; check the path")
        if int(size_px) <= 0:
            raise InputError(f"chip size {size_px!r} must be a positive number of pixels (paper: 256)")
        self.size_px = int(size_px)
        self.value_range = tuple(float(v) for v in value_range) if value_range is not None else None
        if self.value_range is not None and not self.value_range[1] > self.value_range[0]:
            raise InputError(f"value range {value_range!r} must be (low, high) with high > low")
        self._src = None
        src = self._open()
        count = src.count
        self.dtype = np.dtype(src.dtypes[0])
        self.crs = src.crs
        if self.crs is None:
            raise InputError(f"imagery raster {self.path} has no CRS; assign one "
                             "(e.g. gdal_edit.py -a_srs EPSG:32650 FILE) and try again")
        from rasterio.enums import ColorInterp

        alpha = [i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha]
        self._alpha_band = alpha[0] if alpha else None
        self.paletted = count == 1 and src.colorinterp[0] == ColorInterp.palette
        if bands is not None:
            bands = tuple(int(b) for b in bands)
            if len(bands) not in (1, 3) or not all(1 <= b <= count for b in bands):
                raise InputError(f"bands {bands} are not valid for imagery raster {self.path} with {count} "
                                 f"band(s); give three 1-based indices between 1 and {count} (r,g,b) or one")
        colour = [b for b in range(1, count + 1) if b != self._alpha_band]  # grey+alpha is one colour band
        if bands is None and len(colour) >= 3:
            bands = tuple(colour[:3])
        elif bands is None and len(colour) == 1:
            bands = (colour[0],)
        elif bands is None:
            raise InputError(f"imagery raster {self.path} has {count} bands, which do not make an RGB image; "
                             "give an RGB (or RGBN) raster, or choose bands explicitly, e.g. bands=(1, 2, 2)")
        self.bands = bands
        self.replicated = len(bands) == 1 and not self.paletted
        self.warnings = [f"imagery raster {self.path} has one band: replicated to grey RGB"] if self.replicated else []
        self._stretch = None  # per-band (lo, hi) for non-uint8, computed on first use

    # ------------------------------------------------------------------ lifecycle
    def _open(self):
        if self._src is None:
            import rasterio

            try:
                self._src = rasterio.open(self.path)
            except rasterio.errors.RasterioIOError as exc:
                hint = ("check the URL/bucket, the network and the credentials GDAL needs (e.g. AWS_* "
                        "for /vsis3/)" if self.remote else "give a GeoTIFF or another GDAL raster")
                raise InputError(f"imagery raster {self.path} cannot be opened by GDAL ({exc}); {hint}") from None
        return self._src

    def close(self):
        if self._src is not None:
            self._src.close()
            self._src = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_src"] = None
        return state

    # ------------------------------------------------------------------ geometry
    def footprint(self, crs=None) -> tuple:
        """Raster bounds, in its own CRS or projected to ``crs`` (densified)."""
        src = self._open()
        b = tuple(src.bounds)
        if crs is None:
            return b
        from rasterio.warp import transform_bounds

        return tuple(transform_bounds(src.crs, crs, *b, densify_pts=21))

    def _overlaps(self, bounds, crs) -> bool:
        from rasterio.warp import transform_bounds

        src = self._open()
        try:
            xmin, ymin, xmax, ymax = transform_bounds(crs, src.crs, *bounds, densify_pts=21)
        except Exception:  # not projectable into the raster's CRS: it cannot overlap
            return False
        b = src.bounds
        return xmin < b.right and xmax > b.left and ymin < b.top and ymax > b.bottom

    # ------------------------------------------------------------------ reading
    def read_cell(self, cell) -> Chip:
        """Chip of a :class:`~refound_core.data.grid.Cell`."""
        return self.read(cell.bounds, cell.crs)

    def read(self, bounds, crs) -> Chip:
        """Chip covering ``bounds`` = (xmin, ymin, xmax, ymax) in ``crs``, resampled to size_px^2."""
        from rasterio.crs import CRS
        from rasterio.enums import Resampling
        from rasterio.transform import from_bounds
        from rasterio.vrt import WarpedVRT

        crs = CRS.from_user_input(crs)
        if not self._overlaps(bounds, crs):
            return Chip(None, 0.0, self.replicated)
        src = self._open()
        s = self.size_px
        transform = from_bounds(*bounds, width=s, height=s)
        resampling = Resampling.nearest if self.paletted else Resampling.bilinear
        # GDAL warps the validity (nodata, mask, alpha, outside) into an alpha band: the source's own
        # alpha band when it has one, else one added to the VRT.
        import rasterio

        try:
            with WarpedVRT(src, crs=crs, transform=transform, width=s, height=s, resampling=resampling,
                           add_alpha=self._alpha_band is None) as vrt:
                alpha = vrt.read(self._alpha_band or vrt.count)
                valid = alpha >= 128
                coverage = float(valid.mean())
                if coverage == 0.0:
                    return Chip(None, 0.0, self.replicated)
                data = vrt.read(list(self.bands))  # [len(bands), S, S] in the source dtype
        except rasterio.errors.RasterioError as exc:  # a block GDAL cannot decode: a damaged file
            raise InputError(f"imagery raster {self.path} cannot be read at {tuple(round(v) for v in bounds)} "
                             f"(GDAL: {str(exc).splitlines()[0]}); the file is damaged or truncated, "
                             "re-download or re-export it (check with gdalinfo -checksum)") from None
        rgb = self._to_rgb_uint8(data)
        rgb[~valid] = 0
        return Chip(rgb, coverage, self.replicated, None if coverage >= 1.0 else valid)

    def _to_rgb_uint8(self, data: np.ndarray) -> np.ndarray:
        if self.paletted:
            lut = np.zeros((256, 3), dtype=np.uint8)
            for idx, rgba in self._open().colormap(1).items():
                if 0 <= idx < 256:
                    lut[idx] = rgba[:3]
            return lut[data[0].astype(np.intp).clip(0, 255)]
        if self.dtype != np.uint8:
            data = self._rescale(data)
        if data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))

    def _rescale(self, data: np.ndarray) -> np.ndarray:
        lo, hi = self._stretch_ranges()
        scaled = (data.astype(np.float64) - lo[:, None, None]) / (hi - lo)[:, None, None] * 255.0
        return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)

    def _stretch_ranges(self) -> tuple:
        """Per-band (lo, hi) arrays: value_range, or p2/p98 of a decimated read (see module doc)."""
        nb = len(self.bands)
        if self.value_range is not None:
            return np.full(nb, self.value_range[0]), np.full(nb, self.value_range[1])
        if self._stretch is None:
            src = self._open()
            f = max(1.0, max(src.width, src.height) / STATS_MAX_PX)
            shape = (nb, max(1, int(src.height / f)), max(1, int(src.width / f)))
            sample = src.read(list(self.bands), out_shape=shape, masked=True)
            lo, hi = np.zeros(nb), np.ones(nb)
            for i in range(nb):
                vals = sample[i].compressed().astype(np.float64)
                vals = vals[np.isfinite(vals)]
                if vals.size:
                    lo[i], hi[i] = np.percentile(vals, PERCENTILES)
                if not hi[i] > lo[i]:
                    hi[i] = lo[i] + 1.0
            self._stretch = (lo, hi)
        return self._stretch
