"""Input checks done before any work, shared by the CLI and the plugin (both call
:func:`refound_core.inference.pipeline.run_analysis`, which calls :func:`preflight`).

Each check raises :class:`~refound_core.errors.InputError` naming the input, what is wrong and
what to do, or returns notices: conversions that are done by a fixed rule and that the user
should know about (docs/ROBUSTNESS.md lists them all). Pure Python + GDAL bindings: no QGIS, no torch.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Optional

from refound_core.errors import InputError

# Above this many cells a run prints its cost estimate first (the plugin asks for confirmation).
COST_WARN_CELLS = 20_000
# Rough CPU throughput of the base model (cells per second) for the estimate; GPUs are ~20x faster.
CPU_CELLS_PER_S = 8.0
GPU_CELLS_PER_S = 160.0


# -- argparse types: a bad number is refused by the parser (exit 2, the flag named) ---------------
def _number(text, kind, what):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (NaN and infinity are refused)")
    return v


def positive_float(text) -> float:
    v = _number(text, float, "a positive number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return v


def positive_int(text) -> int:
    v = _number(text, int, "a positive whole number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return v


# -- outputs ----------------------------------------------------------------------------------
def check_output(path, overwrite: bool = False, what: str = "output") -> Path:
    """The output file can be written: its folder is a folder (or can be made) and writable, and
    an existing file is only replaced when ``overwrite``."""
    p = Path(path)
    parent = p.parent
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise InputError(f"{what} {p}: {anc} is a file, not a folder; choose an output path in a folder")
            _probe_writable(anc, p, what)
            break
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise InputError(f"{what} {p} already exists; pass --overwrite to replace it, or choose another name")
    return p


def _probe_writable(folder: Path, target: Path, what: str) -> None:
    """Create and remove a file in ``folder``: permission bits alone miss read-only mounts,
    /proc and the like (and root passes every os.access check)."""
    probe = folder / f".{target.name}.probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise InputError(f"cannot write {what} {target}: {folder} is not writable ({exc.strerror}); "
                         "choose another folder") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


class OutputLock:
    """``DIR/.NAME.lock`` (created exclusively, holding the owner's pid) while a run writes NAME,
    so a second run on the same output refuses instead of sharing its temp file. A lock whose
    process is gone (a killed run) is taken over."""

    def __init__(self, target):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._held = False

    def acquire(self) -> "OutputLock":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _lock_alive(self.path):
                    raise InputError(f"output {self.target} is being written by another run (lock {self.path}); "
                                     "wait for it to finish or choose another output") from None
                self.path.unlink(missing_ok=True)  # stale: its process was killed
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._held = True
            return self
        raise InputError(f"cannot take the lock {self.path} for output {self.target}; remove it and try again")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- imagery ----------------------------------------------------------------------------------
def check_imagery(path) -> list:
    """Opens, has a CRS and a usable band layout, and its data can be read (first and last row
    of every band: a truncated GeoTIFF fails there). Returns notices for the conversion rules:
    1 band -> grey RGB; not uint8 -> per-band 2nd-98th percentile stretch to 0-255."""
    import rasterio
    from rasterio.windows import Window

    from refound_core.data.imagery import ChipReader

    notices = []
    with ChipReader(path) as reader:
        src = reader._open()
        try:
            for row in sorted({0, src.height - 1}):
                src.read(list(reader.bands), window=Window(0, row, src.width, 1))
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"imagery raster {path} is damaged or truncated (GDAL: {str(exc).splitlines()[0]}); "
                             "re-download or re-export it (check with gdalinfo -checksum)") from None
        if reader.replicated:
            notices.append(f"imagery raster {path} has one band: used as grey RGB (the band copied to R, G, B)")
        if reader.dtype != "uint8" and not reader.paletted:
            notices.append(f"imagery raster {path} is {reader.dtype}, not 8-bit: each band stretched from its "
                           "2nd-98th percentile to 0-255")
    return notices


def check_imagery_overlap(path, bounds, crs) -> None:
    """InputError when the raster does not overlap ``bounds`` (in ``crs``) at all."""
    from refound_core.data.imagery import ChipReader

    with ChipReader(path) as reader:
        if not reader._overlaps(tuple(bounds), crs):
            fb = ", ".join(f"{v:.0f}" for v in reader.footprint())
            raise InputError(f"imagery raster {path} (bounds {fb} in {reader.crs}) does not overlap the extent "
                             f"({', '.join(f'{v:.0f}' for v in bounds)} in {crs}); check the extent, its CRS, "
                             "or the raster")


# -- POIs -------------------------------------------------------------------------------------
MAX_NAME_CHARS = 200  # longer names are cut: the tokenizer keeps far fewer tokens anyway


def check_pois(table, path, name_field: str = "name") -> list:
    """POIs are usable: at least one feature with coordinates, not every name empty. Caps names
    at MAX_NAME_CHARS. Returns notices (polygons/lines taken at a point on their surface)."""
    import numpy as np

    n = len(table.names)
    if n == 0:
        raise InputError(f"POI file {path} has no features with coordinates; give a layer with POIs "
                         "(or leave --pois out for an imagery-only run)")
    if not any(str(s).strip() for s in table.names):
        raise InputError(f"POI file {path}: every value of the name field {name_field!r} is empty (NULL); "
                         "choose the field that holds the names with --name-field")
    long = np.array([len(s) > MAX_NAME_CHARS for s in table.names], dtype=bool)
    if long.any():
        table.names[long] = [s[:MAX_NAME_CHARS] for s in table.names[long]]
    return []


def geometry_notice(path, layer=None) -> Optional[str]:
    """A notice when the POI layer is not points (its features are taken at a point on their surface)."""
    import pyogrio

    try:
        gtype = str(pyogrio.read_info(str(path), layer=layer).get("geometry_type") or "")
    except Exception:  # noqa: BLE001 - read_pois reports unreadable files with its own message
        return None
    if gtype and "point" not in gtype.lower():
        return f"POI file {path} holds {gtype} features, not points: each is taken at a point on its surface"
    return None


# -- cost ---------------------------------------------------------------------------------------
def cost_estimate(cells: int, device: str = "cpu") -> str:
    """``"about N cells, roughly M min on cpu"`` for the run's confirmation / warning."""
    rate = GPU_CELLS_PER_S if str(device).startswith("cuda") else CPU_CELLS_PER_S
    minutes = cells / rate / 60.0
    return f"about {cells:,} cells, roughly {minutes:,.0f} min on {'GPU' if rate == GPU_CELLS_PER_S else 'CPU'}"
