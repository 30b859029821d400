"""Which raster ``--imagery`` names: a local file, any GDAL path, or a STAC item / catalog.

* ``/vsicurl/https://...``, ``/vsis3/bucket/key.tif``, ``/vsizip/...`` and any other ``/vsi*``
  path, or a ``.vrt``: handed to GDAL as is (no local existence check); a cloud-optimised GeoTIFF
  is then read as windows (HTTP range requests), never downloaded whole.
* ``stac:PATH_OR_URL``: a STAC Item, ItemCollection or Catalog/Collection (JSON). Every item's
  image asset is used: the asset named ``visual`` when present, else the first asset whose media
  type is a GeoTIFF/COG (or whose roles contain ``visual``/``data``). ``http(s)`` hrefs are read
  through ``/vsicurl/``, ``s3://`` through ``/vsis3/``, relative hrefs relative to the JSON file.
  pystac is used when installed (it resolves links the same way); without it the JSON is read
  with the standard library (Items, ItemCollections and ``item``/``child`` links of a Catalog).
* Mosaic rule for several assets: one GDAL VRT (``gdal.BuildVRT``) over all of them, where the
  **first** asset (in catalog order) with a valid pixel wins: the sources are given to BuildVRT in
  reverse order (GDAL lets later sources overwrite earlier ones) and each source's no-data and mask
  stay transparent. All assets must share one CRS (else refused: reproject them first).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional
from urllib.parse import urljoin, urlparse

from refound_core.errors import InputError

STAC_PREFIX = "stac:"
IMAGE_TYPES = ("image/tiff", "image/vnd.stac.geotiff")


def is_gdal_path(path) -> bool:
    """True for paths GDAL resolves itself (``/vsi*``; a local existence check would be wrong)."""
    return isinstance(path, str) and path.startswith("/vsi")


def gdal_href(href: str) -> str:
    """A STAC asset href as a path GDAL opens (http -> /vsicurl/, s3 -> /vsis3/)."""
    scheme = urlparse(href).scheme
    if scheme in ("http", "https"):
        return "/vsicurl/" + href
    if scheme == "s3":
        return "/vsis3/" + href[len("s3://"):]
    if scheme == "file":
        return urlparse(href).path
    return href


def _load_json(href: str) -> dict:
    if urlparse(href).scheme in ("http", "https"):
        from urllib.request import urlopen

        with urlopen(href, timeout=60) as fh:  # noqa: S310  # nosec B310 - scheme checked above: http(s) only
            return json.load(fh)
    return json.loads(Path(href).read_text(encoding="utf-8"))


def _join(base: str, href: str) -> str:
    if urlparse(href).scheme or os.path.isabs(href):
        return href
    if urlparse(base).scheme in ("http", "https"):
        return urljoin(base, href)
    return str((Path(base).parent / href).resolve())


def _pick_asset(assets: dict) -> Optional[str]:
    """Key of the image asset of an item's ``assets`` (``{key: asset dict}``), None if none."""
    if "visual" in assets:
        return "visual"
    for k, a in assets.items():
        if str(a.get("type", "")).split(";")[0].strip() in IMAGE_TYPES:
            return k
    for k, a in assets.items():
        if {"visual", "data"} & set(a.get("roles") or ()):
            return k
    return None


def _items_plain(href: str, doc: dict, depth: int = 0) -> list:
    """``[(item id, asset href)]`` of a STAC document, with the standard library only."""
    kind = doc.get("type")
    if kind == "Feature":
        assets = doc.get("assets") or {}
        key = _pick_asset(assets)
        return [(doc.get("id", href), _join(href, assets[key]["href"]))] if key else []
    if kind == "FeatureCollection":
        return [x for f in doc.get("features", []) for x in _items_plain(href, f, depth)]
    if depth > 8:
        return []
    out = []
    for link in doc.get("links", []):
        if link.get("rel") in ("item", "child"):
            child = _join(href, link["href"])
            out += _items_plain(child, _load_json(child), depth + 1)
    return out


def _items_pystac(href: str) -> list:
    import pystac

    if _load_json(href).get("type") == "FeatureCollection":
        items = list(pystac.ItemCollection.from_file(href))
    else:
        obj = pystac.read_file(href)
        items = [obj] if isinstance(obj, pystac.Item) else list(obj.get_items(recursive=True))
    out = []
    for it in items:
        key = _pick_asset({k: a.to_dict() for k, a in it.assets.items()})
        if key:
            out.append((it.id, it.assets[key].get_absolute_href() or it.assets[key].href))
    return out


def stac_assets(ref: str) -> list:
    """The GDAL paths of the image assets of ``stac:PATH_OR_URL`` (catalog order)."""
    href = ref[len(STAC_PREFIX):]
    if not urlparse(href).scheme and not Path(href).exists():
        raise InputError(f"STAC document {href} does not exist; give a STAC item or catalog JSON after 'stac:'")
    try:
        try:
            import pystac  # noqa: F401
            found = _items_pystac(href)
        except ImportError:
            found = _items_plain(href, _load_json(href))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken document: one message naming it
        raise InputError(f"STAC document {href} cannot be read ({type(exc).__name__}: {exc}); give a STAC "
                         "Item, ItemCollection or Catalog JSON") from None
    if not found:
        raise InputError(f"STAC document {href} has no item with an image asset (a 'visual' asset or a GeoTIFF); "
                         "check the catalog")
    return [gdal_href(h) for _, h in found]


def build_mosaic(paths: list, vrt_path) -> str:
    """One VRT over ``paths``: first valid pixel wins (see the module docstring). Returns its path."""
    import rasterio
    from osgeo import gdal

    crss = set()
    for p in paths:
        with rasterio.open(p) as src:
            crss.add(src.crs.to_wkt() if src.crs else None)
    if len(crss) > 1:
        raise InputError(f"the {len(paths)} imagery assets are in {len(crss)} different CRSs; a mosaic needs one "
                         "CRS: reproject them (gdalwarp) or give one scene")
    gdal.UseExceptions()
    vrt = gdal.BuildVRT(str(vrt_path), list(reversed(paths)))  # later sources win in a VRT: reversed
    if vrt is None:
        raise InputError(f"GDAL could not build a mosaic of {paths}")
    vrt.FlushCache()
    vrt = None
    return str(vrt_path)


def resolve_imagery(imagery, workdir) -> Optional[str]:
    """``--imagery`` as one path GDAL opens (``stac:`` resolved, several assets mosaicked into
    ``workdir/mosaic.vrt``); None stays None; local paths are returned unchanged."""
    if imagery is None or not str(imagery).startswith(STAC_PREFIX):
        return imagery
    paths = stac_assets(str(imagery))
    if len(paths) == 1:
        return paths[0]
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return build_mosaic(paths, Path(workdir) / "mosaic.vrt")
