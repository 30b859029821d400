"""Wire format of the local ReFound backend (``refound serve``); see docs/BACKEND.md.

Shared by the server and the stdlib-only client, so this module uses the Python standard library
only (no numpy, no torch): the QGIS plugin imports it inside QGIS's own Python.

Nothing received is ever unpickled or evaluated. A request is either

* a *frame* (``Content-Type: application/vnd.refound.frame``): the 4 magic bytes ``RFND``, a
  little-endian uint32 header length, the UTF-8 JSON header, then raw little-endian array bytes
  that the header points into by ``offset``/``nbytes``; or
* plain JSON (``Content-Type: application/json``): the same header, arrays carried inline as
  ``data_b64`` (base64 of the same raw bytes).

Array references are ``{"dtype": "uint8", "shape": [H, W, 3], "offset": o, "nbytes": n}`` (frame)
or ``{"dtype": ..., "shape": ..., "data_b64": "..."}`` (JSON). Every field is checked here
(types, shapes, dtypes, ranges, sizes) before anything reaches the model.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Optional

PROTOCOL_VERSION = "refound-backend/1"
FRAME_CONTENT_TYPE = "application/vnd.refound.frame"
JSON_CONTENT_TYPE = "application/json"
MAGIC = b"RFND"
TOKEN_HEADER = "Authorization"  # value: "Bearer <token>"

TASKS = ("urban_village", "population", "commercial")
EMBEDDING_NAMES = ("h_P", "h_S", "fused")

# Limits (the server may lower max_body_bytes; the others are sanity bounds on one request).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_SAMPLES = 1024
MAX_POIS_PER_SAMPLE = 100_000
MAX_NAME_CHARS = 1_000
MAX_IMAGE_SIDE = 4096
MAX_HEADER_BYTES = 48 * 1024 * 1024

# dtype name -> (struct code, itemsize); little-endian on the wire.
DTYPES = {"uint8": ("B", 1), "float32": ("f", 4), "float64": ("d", 8)}


class ProtocolError(Exception):
    """A request or response that breaks the protocol. ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class WireArray:
    """A decoded array reference: raw little-endian bytes plus dtype and shape (no numpy here)."""

    dtype: str
    shape: tuple
    data: bytes

    def to_list(self) -> list:
        """Flat Python list of the values (stdlib decoding, used by the client)."""
        code, size = DTYPES[self.dtype]
        n = len(self.data) // size
        return list(struct.unpack(f"<{n}{code}", self.data))


@dataclass
class WireSample:
    """One region sample as received (validated, still framework-free)."""

    cell_id: str
    bounds: tuple
    crs: str
    poi_names: list = field(default_factory=list)
    poi_categories: list = field(default_factory=list)
    poi_xy: list = field(default_factory=list)  # [(x, y), ...]
    image: Optional[WireArray] = None
    image_coverage: float = 0.0


# ---------------------------------------------------------------------------------------- framing
def pack_frame(header: dict, buffers: list) -> bytes:
    """``MAGIC | uint32 header length | header JSON | buffers...`` (header refs must match)."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *buffers])


def unpack_frame(body: bytes) -> tuple:
    """``(header dict, payload memoryview)`` of a frame; ProtocolError when malformed."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise ProtocolError("body is not a ReFound frame: it must start with the 4 bytes 'RFND' "
                            f"(Content-Type {FRAME_CONTENT_TYPE}); send JSON with Content-Type "
                            f"{JSON_CONTENT_TYPE} instead")
    (n,) = struct.unpack("<I", body[4:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise ProtocolError(f"frame header length {n} does not fit in a body of {len(body)} bytes")
    header = _load_json(bytes(body[8:8 + n]), "frame header")
    return header, memoryview(body)[8 + n:]


def _load_json(raw: bytes, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def decode_body(body: bytes, content_type: str) -> tuple:
    """``(header, payload or None)`` for either content type."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == FRAME_CONTENT_TYPE:
        return unpack_frame(body)
    if ctype in (JSON_CONTENT_TYPE, ""):
        return _load_json(body, "request body"), None
    raise ProtocolError(f"unsupported Content-Type {content_type!r}; use {FRAME_CONTENT_TYPE} or "
                        f"{JSON_CONTENT_TYPE}", status=415)


def array_ref(dtype: str, shape, data: bytes, offset: Optional[int]) -> dict:
    """Header entry for an array: frame reference when ``offset`` is given, base64 otherwise."""
    ref = {"dtype": dtype, "shape": [int(s) for s in shape], "nbytes": len(data)}
    if offset is None:
        ref["data_b64"] = base64.b64encode(data).decode("ascii")
    else:
        ref["offset"] = int(offset)
    return ref


def read_array(ref, payload, what: str, dtype: str = None, ndim: int = None) -> WireArray:
    """Resolve and check one array reference (dtype, shape, byte count, bounds)."""
    if not isinstance(ref, dict):
        raise ProtocolError(f"{what} must be an array reference object, got {type(ref).__name__}")
    dt = ref.get("dtype")
    if dt not in DTYPES:
        raise ProtocolError(f"{what}: dtype {dt!r} is not supported; use one of {sorted(DTYPES)}")
    if dtype is not None and dt != dtype:
        raise ProtocolError(f"{what}: dtype must be {dtype!r}, got {dt!r}")
    shape = ref.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in shape)):
        raise ProtocolError(f"{what}: shape must be a list of non-negative integers, got {shape!r}")
    if ndim is not None and len(shape) != ndim:
        raise ProtocolError(f"{what}: expected {ndim} dimensions, got shape {shape}")
    count = 1
    for s in shape:
        count *= s
    need = count * DTYPES[dt][1]
    if "data_b64" in ref:
        if not isinstance(ref["data_b64"], str):
            raise ProtocolError(f"{what}: data_b64 must be a base64 string")
        try:
            data = base64.b64decode(ref["data_b64"], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"{what}: data_b64 is not valid base64") from None
    elif "offset" in ref:
        if payload is None:
            raise ProtocolError(f"{what}: 'offset' references need a frame body ({FRAME_CONTENT_TYPE}); "
                                "in a JSON body send 'data_b64'")
        off = ref["offset"]
        if not isinstance(off, int) or isinstance(off, bool) or off < 0 or off + need > len(payload):
            raise ProtocolError(f"{what}: offset {off!r} + {need} bytes lies outside the payload "
                                f"({len(payload)} bytes)")
        data = bytes(payload[off:off + need])
    else:
        raise ProtocolError(f"{what}: an array reference needs 'offset' (frame) or 'data_b64' (JSON)")
    if len(data) != need:
        raise ProtocolError(f"{what}: shape {shape} of {dt} needs {need} bytes, got {len(data)}")
    return WireArray(dt, tuple(shape), data)


# ----------------------------------------------------------------------------------- validation
def _finite(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _sample(obj, payload, i: int) -> WireSample:
    w = f"samples[{i}]"
    if not isinstance(obj, dict):
        raise ProtocolError(f"{w} must be an object")
    cell_id = obj.get("cell_id")
    if not isinstance(cell_id, str) or not cell_id or len(cell_id) > 200:
        raise ProtocolError(f"{w}.cell_id must be a non-empty string of at most 200 characters")
    bounds = obj.get("bounds")
    if not isinstance(bounds, list) or len(bounds) != 4:
        raise ProtocolError(f"{w}.bounds must be [xmin, ymin, xmax, ymax]")
    b = tuple(_finite(v, f"{w}.bounds[{k}]") for k, v in enumerate(bounds))
    if not (b[0] < b[2] and b[1] < b[3]):
        raise ProtocolError(f"{w}.bounds {list(b)} is empty or inverted; need xmin < xmax and ymin < ymax")
    crs = obj.get("crs")
    if not isinstance(crs, str) or not crs or len(crs) > 5000:
        raise ProtocolError(f"{w}.crs must be a CRS string such as 'EPSG:32650'")
    pois = obj.get("pois", [])
    if not isinstance(pois, list):
        raise ProtocolError(f"{w}.pois must be a list of [name, category, x, y]")
    if len(pois) > MAX_POIS_PER_SAMPLE:
        raise ProtocolError(f"{w}.pois holds {len(pois)} POIs, more than the limit {MAX_POIS_PER_SAMPLE}")
    names, cats, xy = [], [], []
    for k, p in enumerate(pois):
        if not isinstance(p, list) or len(p) != 4:
            raise ProtocolError(f"{w}.pois[{k}] must be [name, category, x, y]")
        name, cat, x, y = p
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise ProtocolError(f"{w}.pois[{k}] name must be a string of at most {MAX_NAME_CHARS} characters")
        if cat is not None and (isinstance(cat, bool) or not isinstance(cat, (str, int))):
            raise ProtocolError(f"{w}.pois[{k}] category must be a string, an integer or null")
        names.append(name)
        cats.append(None if cat is None else str(cat))
        xy.append((_finite(x, f"{w}.pois[{k}] x"), _finite(y, f"{w}.pois[{k}] y")))
    image = None
    if obj.get("image") is not None:
        image = read_array(obj["image"], payload, f"{w}.image", dtype="uint8", ndim=3)
        h, wd, c = image.shape
        if c != 3 or not (1 <= h <= MAX_IMAGE_SIDE and 1 <= wd <= MAX_IMAGE_SIDE):
            raise ProtocolError(f"{w}.image shape {list(image.shape)} must be [H, W, 3] with 1 <= H, W <= "
                                f"{MAX_IMAGE_SIDE} (RGB, row 0 = north)")
    cov = obj.get("image_coverage", 1.0 if image is not None else 0.0)
    cov = _finite(cov, f"{w}.image_coverage")
    if not 0.0 <= cov <= 1.0:
        raise ProtocolError(f"{w}.image_coverage {cov} must lie in [0, 1]")
    if image is None:
        cov = 0.0
    return WireSample(cell_id, b, crs, names, cats, xy, image, cov)


def parse_samples_request(header, payload) -> tuple:
    """``(task or None, [WireSample], extras dict)`` from a /predict or /embed header."""
    if not isinstance(header, dict):
        raise ProtocolError("request must be a JSON object with a 'samples' list")
    task = header.get("task")
    if task is not None and task not in TASKS:
        raise ProtocolError(f"task {task!r} is unknown; use one of {list(TASKS)} or null for the checkpoint's task")
    samples = header.get("samples")
    if not isinstance(samples, list):
        raise ProtocolError("request needs 'samples': a list of region samples")
    if len(samples) > MAX_SAMPLES:
        raise ProtocolError(f"request holds {len(samples)} samples, more than the limit {MAX_SAMPLES}; "
                            "split it into smaller requests")
    parsed = [_sample(s, payload, i) for i, s in enumerate(samples)]
    seen = set()
    for s in parsed:
        if s.cell_id in seen:
            raise ProtocolError(f"cell_id {s.cell_id!r} appears twice in one request")
        seen.add(s.cell_id)
    ret = header.get("return", list(EMBEDDING_NAMES))
    if not isinstance(ret, list) or not all(r in EMBEDDING_NAMES for r in ret):
        raise ProtocolError(f"'return' must be a list drawn from {list(EMBEDDING_NAMES)}")
    return task, parsed, {"return": ret}


# ------------------------------------------------------------------------------ client encoding
def _as_image_bytes(image) -> tuple:
    """``(bytes, [H, W, 3])`` of an image given as a numpy-like array (buffer protocol) or a
    ``(bytes, (H, W, 3))`` pair. Uses ``memoryview`` so numpy is not needed here."""
    if isinstance(image, tuple) and len(image) == 2 and isinstance(image[0], (bytes, bytearray)):
        return bytes(image[0]), [int(s) for s in image[1]]
    mv = memoryview(image)
    if mv.format not in ("B", "<B", "=B") or mv.ndim != 3:
        raise ProtocolError(f"image must be uint8 with shape [H, W, 3], got format {mv.format!r} and "
                            f"shape {list(mv.shape)}")
    return mv.tobytes(order="C"), list(mv.shape)


def _get(sample, name, default=None):
    return sample.get(name, default) if isinstance(sample, dict) else getattr(sample, name, default)


def encode_samples(samples, task=None, frame: bool = True, extras: Optional[dict] = None) -> tuple:
    """``(body bytes, content type)`` for a list of RegionSample-like objects or dicts.

    A sample needs ``cell_id``, ``bounds``, ``crs``; optionally ``poi_names``,
    ``poi_categories``, ``poi_xy`` (N x 2), ``image`` (uint8 H x W x 3) and ``image_coverage``.
    """
    items, buffers, offset = [], [], 0
    for s in samples:
        names = list(_get(s, "poi_names", []) or [])
        cats = list(_get(s, "poi_categories", []) or [])
        xy = _get(s, "poi_xy", None)
        xy = [] if xy is None else [(float(p[0]), float(p[1])) for p in xy]
        if not (len(names) == len(cats) == len(xy)):
            raise ProtocolError(f"sample {_get(s, 'cell_id')!r}: poi_names, poi_categories and poi_xy "
                                "must have the same length")
        pois = [[str(n), None if c is None else (c if isinstance(c, int) else str(c)), x, y]
                for n, c, (x, y) in zip(names, cats, xy)]
        item = {"cell_id": str(_get(s, "cell_id")), "bounds": [float(v) for v in _get(s, "bounds")],
                "crs": str(_get(s, "crs")), "pois": pois, "image": None,
                "image_coverage": float(_get(s, "image_coverage", 0.0) or 0.0)}
        image = _get(s, "image", None)
        if image is not None:
            data, shape = _as_image_bytes(image)
            item["image"] = array_ref("uint8", shape, data, offset if frame else None)
            if frame:
                buffers.append(data)
                offset += len(data)
        items.append(item)
    header = {"protocol": PROTOCOL_VERSION, "task": task, "samples": items, **(extras or {})}
    if frame:
        return pack_frame(header, buffers), FRAME_CONTENT_TYPE
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8"), JSON_CONTENT_TYPE


def json_safe_number(v):
    """NaN/inf -> None (JSON has no NaN; NULL means 'not predicted')."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
