"""``refound build-corpus``: materialise a real-imagery manifest into a region dataset folder.

The manifest (``data/manifests/*.json``, docs/REAL-DATA.md) names every source image by
repository, commit, path, licence and sha256; this command reads each one out of a fetched git
snapshot (``MIRROR/owner+name/repo``), checks its sha256, resamples it to the manifest's ground
resolution and cuts ``crop_px`` crops. Each crop becomes one cell with an image, no POIs, and
``cell_id = "<scene>/<col>_<row>"`` (the scene is the source image's id, so probes can group
cross-validation folds by scene). Crops that run past an image's edge keep their missing pixels
out of the image (``image_valid``, coverage < 1), as in ``refound build-dataset``.

A source may carry a ``mask`` (a raster of the same footprint, e.g. building = 255); per-crop
statistics of it over the valid pixels become the labels the manifest's ``label`` names (one name
or a list, from :data:`MASK_STATS`): ``building_fraction`` (positive share), ``building_count``
(connected footprints of at least 5 m²) and ``building_mean_area_m2`` (their mean area). That is
how the probe dataset is built (``refound probe``). Several ``--manifest`` files make one corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

from refound_core.errors import InputError

SOURCE_KEYS = ("id", "repo", "commit", "path", "sha256", "licence", "place", "native_gsd_m")
# Overhead imagery has no "up": a rotated or mirrored crop is as real a region as the original, and
# its teacher feature differs (the ImageNet teacher is not rotation invariant), so the dihedral
# group multiplies a small corpus without inventing pixels. Views k < 4 are rotations by k * 90
# degrees; k >= 4 mirror left-right first.
VIEWS = (1, 4, 8)
# A footprint smaller than this (m²) is mask noise (a few stray pixels after resampling), not a building.
MIN_FOOTPRINT_M2 = 5.0


def footprint_areas_m2(mask, gsd: float):
    """Areas (m²) of the connected positive regions of a crop's mask (4-connected), noise dropped."""
    import numpy as np
    from scipy import ndimage

    lab, n = ndimage.label(mask > 0.5)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * (gsd * gsd)
    return areas[areas >= MIN_FOOTPRINT_M2]


# per-crop label name -> statistic of (the crop's mask over its valid pixels, its footprint areas in m²)
MASK_STATS = {"building_fraction": lambda mask, areas: float(mask.mean()),
              "building_count": lambda mask, areas: float(len(areas)),
              "building_mean_area_m2": lambda mask, areas: float(areas.mean()) if len(areas) else 0.0}


def manifest_labels(manifest: dict) -> list:
    """The label names a manifest asks for: its ``label``, one name or a list (none: [])."""
    label = manifest.get("label")
    return [label] if isinstance(label, str) else list(label or [])


def mask_labels(mask, gsd: float, names) -> dict:
    """``{name: value}`` of the :data:`MASK_STATS` named, footprints labelled once per crop."""
    areas = footprint_areas_m2(mask, gsd)
    return {name: MASK_STATS[name](mask, areas) for name in names}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("example:\n  refound build-corpus --manifest data/manifests/real-imagery.json "
                "--mirror /work/.mirror --out runs/real_corpus_ds\n"
                "  (fetch each repository named in the manifest first; its snapshot must hold the commit)")
    p.add_argument("--manifest", required=True, action="append",
                   help="manifest JSON (data/manifests/real-imagery.json, real-imagery-extra.json, real-probe.json); "
                        "repeat to build one corpus from several (their labels must agree; size and resolution "
                        "defaults come from the first)")
    p.add_argument("--mirror", required=True,
                   help="folder of fetched git snapshots, one per repository as MIRROR/owner+name/repo")
    p.add_argument("--out", required=True, help="region dataset folder to create")
    p.add_argument("--gsd", type=float, default=None,
                   help="ground resolution of the crops in metres per pixel (0.3-2; default: the manifest's gsd_m)")
    p.add_argument("--crop", type=int, default=None, help="crop size in pixels (default: the manifest's crop_px, 256)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between crops in pixels (default: the manifest's stride_px, else --crop: no overlap)")
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="drop crops whose share of valid image pixels is below this (default 0.5)")
    p.add_argument("--views", type=int, choices=list(VIEWS), default=1,
                   help="dihedral views per crop: 1 = as is (default), 4 = the four 90-degree rotations, "
                        "8 = rotations and their mirror images. Each view is its own region (cell_id "
                        "<scene>/<col>_<row>_v<k>), so `refound teachers` caches a teacher target per view")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def load_manifest(path) -> dict:
    """The manifest as a dict, with one InputError naming the first thing wrong."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"manifest {path} does not exist; pass --manifest data/manifests/real-imagery.json") from None
    except ValueError as exc:
        raise InputError(f"manifest {path} is not valid JSON ({exc})") from None
    sources = manifest.get("sources")
    if not isinstance(sources, list) or not sources:
        raise InputError(f"manifest {path} has no 'sources' list")
    unknown = [n for n in manifest_labels(manifest) if n not in MASK_STATS]
    if unknown:
        raise InputError(f"manifest {path}: label {unknown[0]!r} is not a mask statistic; choose from "
                         f"{', '.join(MASK_STATS)}")
    seen = set()
    for i, src in enumerate(sources):
        missing = [k for k in SOURCE_KEYS if k not in src]
        if missing:
            raise InputError(f"manifest {path}: source {i} ({src.get('id', '?')}) lacks {', '.join(missing)}")
        if src["id"] in seen or "/" in src["id"]:
            raise InputError(f"manifest {path}: source id {src['id']!r} is repeated or contains '/'")
        seen.add(src["id"])
    return manifest


def snapshot_dir(mirror, repo: str) -> Path:
    """The git directory of ``repo``'s fetched snapshot under ``mirror``."""
    base = Path(mirror) / repo.replace("/", "+") / "repo"
    for cand in (base / ".git", base):
        if (cand / "HEAD").exists() or (cand / "objects").is_dir():
            return cand
    raise InputError(f"no snapshot of {repo} under {mirror} (expected {base}); fetch the repository first")


def read_blob(mirror, src: dict) -> bytes:
    """The bytes of one manifest file (image or mask), sha256-checked."""
    git_dir = snapshot_dir(mirror, src["repo"])
    ref = f"{src['commit']}:{src['path']}"
    res = subprocess.run(["git", "--git-dir", str(git_dir), "show", ref], capture_output=True)
    if res.returncode != 0:
        raise InputError(f"{src['repo']} snapshot has no {ref} ({res.stderr.decode(errors='replace').strip()}); "
                         "fetch a snapshot that holds this commit")
    digest = hashlib.sha256(res.stdout).hexdigest()
    if digest != src["sha256"]:
        raise InputError(f"{src['repo']}:{src['path']} has sha256 {digest}, the manifest says {src['sha256']}")
    return res.stdout


def _read_raster(blob: bytes, bands):
    import warnings

    import numpy as np
    import rasterio
    from rasterio.io import MemoryFile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with MemoryFile(blob) as mf, mf.open() as ds:
            return np.stack([ds.read(b) for b in bands], axis=-1)


def to_uint8(arr):
    """uint8 as is; deeper data (e.g. 11-bit satellite DNs) stretched per band from the 2nd to 98th percentile."""
    import numpy as np

    if arr.dtype == np.uint8:
        return arr
    out = np.empty(arr.shape, np.uint8)
    for b in range(arr.shape[-1]):
        lo, hi = np.percentile(arr[..., b], [2, 98])
        out[..., b] = np.clip((arr[..., b] - lo) * 255.0 / max(hi - lo, 1e-6), 0, 255).astype(np.uint8)
    return out


def resample(arr, scale: float, *, is_mask: bool = False):
    """Resize ``[H, W, C]`` uint8 (or ``[H, W]`` float mask) by ``scale`` (native gsd / target gsd).
    Area averaging when shrinking (no aliasing); a mask stays a fraction in [0, 1]."""
    import numpy as np
    from PIL import Image

    h, w = arr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return arr
    method = Image.BOX if scale < 1 else Image.BILINEAR
    if is_mask:
        return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize(size, method))
    return np.stack([np.asarray(Image.fromarray(arr[..., b]).resize(size, method)) for b in range(arr.shape[-1])], -1)


def crop_origins(length: int, crop: int, stride: int) -> list:
    """Top/left offsets of the crops along one axis: every ``stride`` and one flush with the far edge."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def merge_manifests(manifests, paths) -> dict:
    """One manifest from several: the sources one after another (ids unique over all), size and
    resolution defaults from the first; their labels must agree (a crop has one set of labels)."""
    first = dict(manifests[0])
    label_sets = {json.dumps(manifest_labels(m)) for m in manifests}
    if len(label_sets) > 1:
        raise InputError(f"manifests {', '.join(map(str, paths))} have different labels "
                         f"({', '.join(sorted(label_sets))}); build them into separate datasets")
    sources, seen = [], {}
    for m, path in zip(manifests, paths):
        for src in m["sources"]:
            if src["id"] in seen:
                raise InputError(f"source id {src['id']!r} is in both {seen[src['id']]} and {path}; ids must be unique")
            seen[src["id"]] = path
            sources.append(src)
    first["sources"] = sources
    first["name"] = "+".join(m.get("name", "") for m in manifests)
    return first


def iter_crops(image, mask, crop: int, stride: int, min_coverage: float):
    """``(col, row, chip, valid, coverage, mask_part)`` for each crop; padded pixels are invalid and
    ``mask_part`` (None without a mask) covers the valid pixels only."""
    import numpy as np

    h, w = image.shape[:2]
    for row, r0 in enumerate(crop_origins(h, crop, stride)):
        for col, c0 in enumerate(crop_origins(w, crop, stride)):
            chip = np.zeros((crop, crop, 3), np.uint8)
            valid = np.zeros((crop, crop), bool)
            part = image[r0:r0 + crop, c0:c0 + crop]
            chip[:part.shape[0], :part.shape[1]] = part
            valid[:part.shape[0], :part.shape[1]] = True
            coverage = float(valid.mean())
            if coverage < min_coverage:
                continue
            yield col, row, chip, valid, coverage, None if mask is None else mask[r0:r0 + crop, c0:c0 + crop]


def dihedral(arr, k: int):
    """View ``k`` (0-7) of a ``[H, W, ...]`` array: ``k % 4`` quarter turns, mirrored first when ``k >= 4``."""
    import numpy as np

    if k >= 4:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.rot90(arr, k % 4, axes=(0, 1)))


def build_corpus(manifest: dict, mirror, out, *, gsd=None, crop=None, stride=None, min_coverage: float = 0.5,
                 views: int = 1, overwrite: bool = False, manifest_path: str = "", log=print) -> dict:
    """Write the region dataset; returns a summary (crops per scene)."""
    import numpy as np

    from refound_core.data.dataset import RegionDatasetWriter
    from refound_core.data.sample import RegionSample

    gsd = float(gsd or manifest.get("gsd_m", 0.5))
    if not 0.3 <= gsd <= 2.0:
        raise InputError(f"--gsd {gsd:g} m is outside 0.3-2 m, the ground resolution ReFound's chips are made for")
    crop = int(crop or manifest.get("crop_px", 256))
    stride = int(stride or manifest.get("stride_px", crop))
    if crop < 16 or stride < 1:
        raise InputError(f"--crop {crop} / --stride {stride}: the crop must be >= 16 px and the stride >= 1")
    if views not in VIEWS:
        raise InputError(f"--views {views}: choose 1 (as is), 4 (rotations) or 8 (rotations and mirror images)")
    label_names = manifest_labels(manifest)
    cell = crop * gsd
    counts: dict = {}
    scenes = []
    provenance = {"kind": "real imagery", "manifest": manifest_path, "name": manifest.get("name", ""),
                  "gsd_m": gsd, "crop_px": crop, "stride_px": stride, "views": views,
                  "sources": [{k: s[k] for k in SOURCE_KEYS} | {"attribution": s.get("attribution", "")}
                              for s in manifest["sources"]]}
    with RegionDatasetWriter(out, crs="LOCAL:scene-grid", cell_size=cell, image_size=crop,
                             label_names=label_names, label_aux=["scene_index"],
                             provenance=provenance, overwrite=overwrite) as writer:
        for si, src in enumerate(manifest["sources"]):
            image = to_uint8(_read_raster(read_blob(mirror, src), src.get("bands", [1, 2, 3])))
            mask = None
            if label_names and src.get("mask"):
                m = src["mask"]
                raw = _read_raster(read_blob(mirror, {**src, **m}), [m.get("band", 1)])[..., 0]
                mask = (raw >= m.get("threshold", 1)).astype(np.float32)
            scale = float(src["native_gsd_m"]) / gsd
            image = resample(image, scale)
            mask = resample(mask, scale, is_mask=True) if mask is not None else None
            scenes.append({"index": si, "scene": src["id"], "place": src["place"], "licence": src["licence"]})
            n = 0
            for col, row, chip, valid, coverage, part in iter_crops(image, mask, crop, stride, min_coverage):
                x0, y1 = si * 1e5 + col * stride * gsd, -row * stride * gsd  # a virtual plane, one strip per scene
                labels = {} if part is None else mask_labels(part, gsd, label_names)
                for k in range(views):
                    cell_id = f"{src['id']}/{col}_{row}" + (f"_v{k}" if k else "")
                    writer.add(RegionSample(cell_id=cell_id, bounds=(x0, y1 - cell, x0 + cell, y1),
                                            crs="LOCAL:scene-grid", poi_names=[], poi_categories=[],
                                            poi_xy=np.zeros((0, 2)), image=dihedral(chip, k),
                                            image_coverage=coverage,
                                            image_valid=dihedral(valid, k) if coverage < 1 else None,
                                            labels=labels),
                               aux={"scene_index": si})
                    n += 1
            counts[src["id"]] = n
            log(f"  {src['id']}: {image.shape[1]}x{image.shape[0]} px at {gsd:g} m -> {n} crops ({src['place']})")
        writer.close(extra_meta={"scenes": scenes})
    return {"crops": sum(counts.values()), "scenes": len(counts), "per_scene": counts, "views": views}


def run(args) -> int:
    manifest = merge_manifests([load_manifest(m) for m in args.manifest], args.manifest)
    print(f"refound build-corpus: {len(manifest['sources'])} source images from {', '.join(args.manifest)}")
    summary = build_corpus(manifest, args.mirror, args.out, gsd=args.gsd, crop=args.crop, stride=args.stride,
                           min_coverage=args.min_coverage, views=args.views, overwrite=args.overwrite,
                           manifest_path=", ".join(map(str, args.manifest)))
    per_view = f" ({summary['crops'] // args.views} crops x {args.views} views)" if args.views > 1 else ""
    print(f"refound build-corpus: wrote {summary['crops']} regions{per_view} from {summary['scenes']} scenes "
          f"to {args.out}")
    return 0
