"""``refound build-dataset``: a region dataset folder from POI + imagery files or a synthetic city.

Cells are the 256 m grid of paper 5.1.1 (``refound_core.data.grid``); each gets its POIs, a
satellite chip and, when sources are given, the three downstream labels of paper 5.1.2
(urban village by > 20 % overlap, population by area weighting, commercial activeness as the sum
of a POI value field). The folder is built as ``OUT.tmp-xxxx`` and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SYNTHCITY_FILES = {"imagery": "imagery.tif", "pois": "pois.gpkg", "urban_village": "urban_villages.gpkg",
                   "population": "population.tif", "meta": "meta.json"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset folder to create")
    src = parser.add_argument_group("from files")
    src.add_argument("--pois", help="POI file: GeoPackage / Shapefile / GeoJSON, or an OpenStreetMap .osm.pbf")
    src.add_argument("--imagery", help="satellite imagery raster (any GDAL format; RGB or RGBN)")
    src.add_argument("--extent", help="XMIN,YMIN,XMAX,YMAX[,CRS] (default: the imagery's footprint, else the POIs' "
                                      "bounds; CRS default: the imagery's, else the POIs')")
    src.add_argument("--name-field", default="name", help="POI name attribute (default: name)")
    src.add_argument("--category-field", default="category", help="POI category attribute (default: category)")
    src.add_argument("--value-field", default=None,
                     help="numeric POI attribute (e.g. reviews); its per-cell sum is the commercial label")
    src.add_argument("--population", help="population raster (persons per pixel) or polygons with --population-field")
    src.add_argument("--population-field", default="population", help="population attribute of polygons")
    src.add_argument("--urban-village", help="urban-village polygons (cells > 20%% covered are positive)")
    src.add_argument("--from-synthcity", metavar="DIR", help="a synthetic city folder from `refound synthcity`")
    opt = parser.add_argument_group("grid and chips")
    opt.add_argument("--cell-size", type=float, default=256.0, help="cell side in metres (paper: 256)")
    opt.add_argument("--image-size", type=int, default=256, help="chip side in pixels (paper: 256)")
    opt.add_argument("--grid-crs", default=None, help="metric CRS of the grid (default: the extent's, or its UTM zone)")
    opt.add_argument("--bands", default=None, help="1-based imagery bands R,G,B (default: the first three)")
    opt.add_argument("--max-cells", type=int, default=2_000_000, help="refuse extents with more cells")
    opt.add_argument("--keep-empty", action="store_true", help="keep cells with neither POIs nor imagery")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    opt.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from refound_core.errors import InputError

    if args.from_synthcity:
        clash = [f"--{k.replace('_', '-')}" for k in ("pois", "imagery", "extent", "population", "urban_village")
                 if getattr(args, k)]
        if clash:
            raise InputError(f"--from-synthcity reads everything from the city folder; drop {', '.join(clash)}")
        spec = synthcity_spec(args.from_synthcity)
    else:
        if not args.pois:
            raise InputError("give --pois FILE (and usually --imagery RASTER), or --from-synthcity DIR")
        spec = dict(pois=args.pois, imagery=args.imagery, extent=args.extent, name_field=args.name_field,
                    category_field=args.category_field, value_field=args.value_field, population=args.population,
                    population_field=args.population_field, urban_village=args.urban_village,
                    provenance={"synthetic": False, "seed": None})
    bands = _parse_bands(args.bands) if args.bands else None
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"build-dataset: {msg}", flush=True))
    out = build(out=args.out, cell_size=args.cell_size, image_size=args.image_size, grid_crs=args.grid_crs,
                bands=bands, max_cells=args.max_cells, keep_empty=args.keep_empty, overwrite=args.overwrite,
                log=log, **spec)
    log(f"wrote {out}")
    return 0


def _parse_bands(text: str) -> tuple:
    from refound_core.errors import InputError

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--bands {text!r} must be 1-based band numbers such as 1,2,3") from None


def synthcity_spec(folder) -> dict:
    """Inputs of a synthetic city folder (names agreed with ``refound synthcity``)."""
    from refound_core.errors import InputError

    d = Path(folder)
    missing = [name for name in SYNTHCITY_FILES.values() if not (d / name).is_file()]
    if missing:
        raise InputError(f"synthetic city folder {d} lacks {', '.join(missing)}; generate it with "
                         "`refound synthcity --out DIR`")
    try:
        meta = json.loads((d / SYNTHCITY_FILES["meta"]).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{d / SYNTHCITY_FILES['meta']} is not valid JSON ({exc}); regenerate the city") from None
    return dict(pois=str(d / SYNTHCITY_FILES["pois"]), imagery=str(d / SYNTHCITY_FILES["imagery"]), extent=None,
                name_field="name", category_field="category", value_field="reviews",
                population=str(d / SYNTHCITY_FILES["population"]), population_field="population",
                urban_village=str(d / SYNTHCITY_FILES["urban_village"]),
                provenance={"synthetic": True, "seed": meta.get("seed"), "synthcity": str(d),
                            "synthcity_meta": meta})


def parse_extent(text):
    """``XMIN,YMIN,XMAX,YMAX[,CRS]`` -> ((xmin, ymin, xmax, ymax), crs or None)."""
    from refound_core.errors import InputError

    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (4, 5):
        raise InputError(f"--extent {text!r} must be XMIN,YMIN,XMAX,YMAX or XMIN,YMIN,XMAX,YMAX,CRS")
    try:
        box = tuple(float(v) for v in parts[:4])
    except ValueError:
        raise InputError(f"--extent {text!r}: the first four values must be numbers") from None
    return box, (parts[4] if len(parts) == 5 else None)


def build(*, out, pois, imagery=None, extent=None, name_field="name", category_field="category", value_field=None,
          population=None, population_field="population", urban_village=None, provenance=None,
          cell_size=256.0, image_size=256, grid_crs=None, bands=None, max_cells=2_000_000, keep_empty=False,
          overwrite=False, log=print) -> Path:
    """Build a region dataset folder; returns its path. Every bad input raises InputError."""
    import numpy as np

    from refound_core.data import labels as L
    from refound_core.data.dataset import RegionDatasetWriter
    from refound_core.data.grid import Grid, crs_string, looks_like_lonlat, parse_crs
    from refound_core.data.imagery import ChipReader
    from refound_core.data.poi_sources import assign_to_cells, read_pois
    from refound_core.data.sample import RegionSample
    from refound_core.errors import InputError

    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists; choose another --out or pass --overwrite")
    reader = ChipReader(imagery, size_px=image_size, bands=bands) if imagery else None
    if reader is not None and reader.warnings:
        for w in reader.warnings:
            log(f"warning: {w}")
    table = read_pois(pois, name_field=name_field, category_field=category_field,
                      value_fields=(value_field,) if value_field else ())
    log(f"read {len(table):,} POIs from {pois}")

    # The extent and its CRS: given, else the imagery footprint, else the POIs' bounds.
    default_crs = reader.crs.to_wkt() if reader is not None else table.crs
    if extent is not None:
        box, ext_crs = parse_extent(extent) if isinstance(extent, str) else (tuple(extent[:4]), None)
        if ext_crs is None:
            if looks_like_lonlat(*box) and not parse_crs(default_crs).is_geographic:
                raise InputError(f"--extent {extent} looks like longitude/latitude but no CRS was given and the "
                                 "default CRS is projected; append the CRS, e.g. ...,EPSG:4326")
            ext_crs = default_crs
    elif reader is not None:
        box, ext_crs = reader.footprint(), default_crs
    else:
        if len(table) == 0:
            raise InputError(f"POI file {pois} holds no POIs and no --imagery or --extent was given, so there is "
                             "no area to grid; give --extent")
        box, ext_crs = table.bounds(), default_crs
        if box[0] == box[2] or box[1] == box[3]:  # a single POI: pad so the extent has an area
            box = (box[0] - 1e-6, box[1] - 1e-6, box[2] + 1e-6, box[3] + 1e-6)
    if grid_crs:
        grid = Grid(grid_crs, cell_size, max_cells)
    else:
        grid = Grid.for_extent(box, ext_crs, cell_size, max_cells)
    cells = grid.cells_for_extent(*box, extent_crs=ext_crs)
    log(f"grid {grid.crs}, {cell_size:g} m cells: {len(cells):,} cells")

    table = table.to_crs(grid.crs)
    assignment = assign_to_cells(table.x, table.y, grid, cells)
    if reader is not None:
        fp = reader.footprint(grid.crs)
        b = np.asarray([c.bounds for c in cells])
        if not ((b[:, 0] < fp[2]) & (b[:, 2] > fp[0]) & (b[:, 1] < fp[3]) & (b[:, 3] > fp[1])).any():
            raise InputError(f"the extent does not overlap imagery {imagery} (footprint {tuple(round(v) for v in fp)} "
                             f"in {grid.crs}); give an --extent inside the raster or another raster")

    label_values, aux = {}, {}
    if urban_village:
        uv, frac = L.urban_village_from_polygons(urban_village, cells)
        label_values["urban_village"], aux["urban_village_overlap"] = uv.astype(np.float64), frac
        log(f"urban village: {int(uv.sum()):,} positive cells (> {L.UV_THRESHOLD:.0%} overlap)")
    if population:
        label_values["population"] = (L.population_from_raster(population, cells) if L.is_raster(population)
                                      else L.population_from_polygons(population, cells, population_field))
        log(f"population: {np.nansum(label_values['population']):,.0f} persons over the grid")
    if value_field:
        label_values["commercial"] = L.commercial_activeness(table.values[value_field], assignment)
        log(f"commercial activeness: sum of {value_field!r} per cell")

    prov = dict(provenance or {})
    prov.setdefault("synthetic", False)
    prov["sources"] = {k: str(v) for k, v in dict(pois=pois, imagery=imagery, population=population,
                                                  urban_village=urban_village).items() if v}
    prov["created_by"] = "refound build-dataset"
    prov["extent"] = {"bounds": list(box), "crs": crs_string(ext_crs) if _has_epsg(ext_crs) else str(ext_crs)}
    writer = RegionDatasetWriter(out, crs=grid.crs, cell_size=cell_size, image_size=image_size,
                                 poi_value_fields=(value_field,) if value_field else (),
                                 label_names=list(label_values), label_aux=list(aux), provenance=prov,
                                 overwrite=overwrite)
    step = max(1, -(-len(cells) // 10))  # progress every 10 %
    skipped = 0
    with writer:
        for i, cell in enumerate(cells):
            idx = assignment.indices(i)
            chip = reader.read_cell(cell) if reader is not None else None
            has_image = chip is not None and chip.image is not None
            if not keep_empty and idx.size == 0 and not has_image:
                skipped += 1
            else:
                writer.add(RegionSample(
                    cell_id=cell.id, bounds=cell.bounds, crs=cell.crs,
                    poi_names=table.names[idx].tolist(), poi_categories=table.categories[idx].tolist(),
                    poi_xy=np.stack([table.x[idx], table.y[idx]], axis=1),
                    image=chip.image if has_image else None, image_coverage=chip.coverage if has_image else 0.0,
                    image_valid=chip.valid if has_image else None,
                    labels={k: v[i] for k, v in label_values.items() if np.isfinite(v[i])},
                    poi_values={k: v[idx] for k, v in table.values.items()}),
                    aux={k: v[i] for k, v in aux.items()})
            if (i + 1) % step == 0 or i + 1 == len(cells):
                log(f"{i + 1:,}/{len(cells):,} cells ({100 * (i + 1) // len(cells)}%), kept {writer.num_cells:,}, "
                    f"{writer.num_pois:,} POIs, {int(writer.num_images):,} images")
        if reader is not None:
            reader.close()
        writer.close()
    if skipped:
        log(f"skipped {skipped:,} cells with neither POIs nor imagery (--keep-empty keeps them)")
    if assignment.outside:
        log(f"{assignment.outside:,} POIs lie outside the extent")
    log(f"done in {time.time() - t0:.1f} s")
    return out


def _has_epsg(crs) -> bool:
    try:
        from refound_core.data.grid import parse_crs

        return parse_crs(crs).to_epsg() is not None
    except Exception:
        return False


if __name__ == "__main__":  # pragma: no cover - `refound build-dataset` is the entry point
    from training.cli import main

    sys.exit(main(["build-dataset", *sys.argv[1:]]))
