"""Convert the official PaddlePaddle ReFound weights (PaddlePaddle/PaddleSpatial,
research/ReFound) into a refound checkpoint.

Reads ``.npz`` (numpy, ``allow_pickle=False``) or ``.pdparams``. A ``.pdparams`` file is a Python
pickle of ``{name: numpy.ndarray}`` (``paddle.save`` of a state dict). Unpickling runs arbitrary
code, so it is read with :class:`NumpyOnlyUnpickler`, whose ``find_class`` resolves only the
numpy functions that rebuild arrays (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
``_frombuffer``, under both the numpy 1 ``numpy.core`` and numpy 2 ``numpy._core`` names, plus
``_codecs.encode`` restricted to latin-1, which protocol-2 pickles use for raw bytes) and refuses
every other global; paddle itself is never imported.

Name mapping and conventions: shared/parity/SEMANTICS.md sections 3, 4 and 7
(Paddle Linear weights are ``[in, out]`` -> transposed; q/k/v are concatenated into our fused
qkv; word-embedding row 0 is zeroed, which equals Paddle's padding_idx forward semantics).
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Optional

import numpy as np

from refound_core.errors import InputError
from refound_core.model.config import OFFICIAL_IMAGE_MEAN, OFFICIAL_IMAGE_STD, ModelConfig

ENC = "encoder."
# official task name -> (our task label name as in RegionSample.labels, head kind)
TASKS = {"uvd": ("urban_village", "binary"), "pop": ("population", "regression"), "cap": ("commercial", "regression")}
OFFICIAL_AGG = {"avr": "average", "attn": "attention"}


# ----------------------------------------------------------------------------- reading
def _numpy_globals() -> dict:
    """(module, name) -> callable, for exactly the functions numpy pickles arrays with."""
    recon = np.ndarray((0,)).__reduce__()[0]            # multiarray._reconstruct
    scalar = np.float32(0).__reduce__()[0]                # multiarray.scalar
    frombuffer = np.arange(2).__reduce_ex__(5)[0]         # numeric._frombuffer (protocol 5)
    allowed = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = recon
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocol <= 2 has no bytes opcode: array buffers are pickled as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """The only codec a protocol-2 numpy pickle needs; any other encoding is refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays (plus plain dicts/lists/str/numbers) and nothing else.

    Any other global (``os.system``, ``builtins.eval``, paddle classes ...) raises
    ``pickle.UnpicklingError`` before it is looked up, so a crafted file cannot run code.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids (not a plain paddle state dict)")


def read_pdparams(path) -> dict:
    """``{name: ndarray}`` from a ``.pdparams`` pickle without executing code from it."""
    path = Path(path)
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing"):
            raise InputError(f"{path}: {exc}. Only paddle.save'd state dicts of numpy arrays are read; "
                             "re-export the weights as a state dict (or .npz)") from exc
        raise InputError(f"{path} is not a readable .pdparams file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - truncated / not a pickle at all
        raise InputError(f"{path} is not a readable .pdparams file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict of named arrays")
    # paddle.save adds a name map ("StructuredToParameterName@@"); keep arrays only.
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_paddle_weights(path) -> dict:
    """``{official name: float32 ndarray}`` from ``.npz`` or ``.pdparams``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; pass the official .pdparams or .npz")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path} is not a readable .npz of arrays ({exc})") from exc
    elif path.suffix == ".pdparams":
        arrays = read_pdparams(path)
    else:
        raise InputError(f"{path}: unknown weights format {path.suffix!r}; expected .pdparams or .npz")
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


# ----------------------------------------------------------------------------- config
def config_from_official(official: dict, name: str = "refound_official") -> ModelConfig:
    """Map the official ``configuration.py`` dict onto ModelConfig."""
    try:
        if official.get("num_grid_x", 16) != official.get("num_grid_y", 16):
            raise InputError("official config has num_grid_x != num_grid_y; only square grids are supported")
        return ModelConfig(
            name=name,
            hidden_size=int(official["hidden_size"]),
            num_layers=int(official["num_hidden_layers"]),
            num_heads=int(official["num_attention_heads"]),
            intermediate_size=int(official["intermediate_size"]),
            fusion_layer_start=int(official["ps_layer_start_idx"]),
            use_moge=True,
            vocab_size=int(official["vocab_size"]),
            num_categories=int(official["poi_cate_num"]),
            max_poi_tokens=int(official["max_len_token"]),
            max_word_pos=int(official["max_len_token"]),
            max_poi_pos=int(official["max_len_poi"]),
            grid_cells=int(official.get("num_grid_x", 16)),
            image_size=int(official.get("image_size", 256)),
            patch_size=int(official.get("patch_size", 16)),
            in_chans=3,
            layer_norm_eps=float(official.get("layer_norm_eps", 1e-12)),
            hidden_dropout=float(official.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(official.get("attention_probs_dropout_prob", 0.1)),
            image_mean=OFFICIAL_IMAGE_MEAN,
            image_std=OFFICIAL_IMAGE_STD,
            type_vocab_size=int(official.get("type_vocab_size", 2)),
        )
    except KeyError as exc:
        raise InputError(f"official config lacks key {exc}; pass the configuration dict of the official code") from exc
    except ValueError as exc:
        raise InputError(f"official config is inconsistent: {exc}") from exc


# ----------------------------------------------------------------------------- names
_LAYER = re.compile(r"^transformer\.layer\.(\d+)\.(.+)$")
_EMBED = {
    "poi_embed_module.word_embedding_table.weight": "embeddings.poi.word_embed.weight",
    "poi_embed_module.token_type_embedding_table.weight": "embeddings.poi.token_type_embed",
    "poi_embed_module.word_level_pos_embedding_table.weight": "embeddings.poi.word_pos_embed.weight",
    "poi_embed_module.poi_level_pos_embedding_table.weight": "embeddings.poi.poi_pos_embed.weight",
    "poi_embed_module.grid_level_pos_embedding_table.weight": "embeddings.poi.grid_pos_embed.weight",
    "poi_embed_module.poi_cate_embedding_table.weight": "embeddings.poi.category_embed.weight",
    "poi_embed_module.LayerNorm.weight": "embeddings.poi.norm.weight",
    "poi_embed_module.LayerNorm.bias": "embeddings.poi.norm.bias",
    "img_embed_module.cls_token": "embeddings.image.cls_token",
    "img_embed_module.mask_token": "embeddings.image.mask_token",
    "img_embed_module.patch_to_emb.weight": "embeddings.image.patch_embed.weight",
    "img_embed_module.patch_to_emb.bias": "embeddings.image.patch_embed.bias",
    "img_embed_module.pos_1d_embedding_table.weight": "embeddings.image.pos_embed",
    "img_embed_module.LayerNorm.weight": "embeddings.image.norm.weight",
    "img_embed_module.LayerNorm.bias": "embeddings.image.norm.bias",
    "mod_embed_module.mod_embed_tabel.weight": "embeddings.modality_embed.weight",
}
_LAYER_PARTS = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "attn.norm",
}
_EXPERTS = {"poi": "ffn_poi", "img": "ffn_img", "ps": "ffn_ps"}
_TRANSPOSED = {"embeddings.image.patch_embed.weight"}


def _layer_name(i: int, rest: str) -> Optional[str]:
    mod, _, leaf = rest.rpartition(".")
    if mod in _LAYER_PARTS:
        return f"encoder.layers.{i}.{_LAYER_PARTS[mod]}.{leaf}"
    m = re.match(r"^(poi|img|ps)_(intermediate\.dense|output\.dense|output\.LayerNorm)$", mod)
    if m:
        part = {"intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "output.LayerNorm": "norm"}[m.group(2)]
        return f"encoder.layers.{i}.{_EXPERTS[m.group(1)]}.{part}.{leaf}"
    return None


def convert_encoder(weights: dict, cfg: ModelConfig) -> dict:
    """Official ``encoder.*`` arrays -> our ReFound state dict (numpy, float32)."""
    import torch

    out, qkv, unknown = {}, {}, []
    for name, arr in weights.items():
        if not name.startswith(ENC):
            continue
        key = name[len(ENC):]
        if key in _EMBED:
            ours = _EMBED[key]
            if ours in _TRANSPOSED:
                arr = arr.T
            elif ours == "embeddings.image.pos_embed":
                arr = arr[None]
            elif ours == "embeddings.poi.word_embed.weight":
                arr = arr.copy()
                arr[0] = 0.0  # Paddle padding_idx=0: [PAD] reads a zero vector
            out[ours] = arr
            continue
        m = _LAYER.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            sm = re.match(r"^attention\.selfattn\.(query|key|value)\.(weight|bias)$", rest)
            if sm:
                qkv.setdefault((i, sm.group(2)), {})[sm.group(1)] = arr
                continue
            ours = _layer_name(i, rest)
            if ours is not None:
                out[ours] = arr.T if ours.endswith(".weight") and arr.ndim == 2 else arr
                continue
        unknown.append(name)
    if unknown:
        raise InputError(f"official weights hold {len(unknown)} encoder tensors this converter does not know "
                         f"(e.g. {unknown[:3]}); they come from another version of the official code")
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise InputError(f"layer {i}: attention {leaf} lacks one of query/key/value")
        stack = [parts[p].T if leaf == "weight" else parts[p] for p in ("query", "key", "value")]
        out[f"encoder.layers.{i}.attn.qkv.{leaf}"] = np.concatenate(stack, axis=0)
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


def convert_head(weights: dict, task: str, prefix: Optional[str] = None) -> dict:
    """Official ``target_prediction.*`` / ``attn_agg.*`` (optionally under ``<task>::``) -> TaskHead names."""
    import torch

    names = {"target_prediction.dense": "mlp.fc1", "target_prediction.decoder": "mlp.fc2",
             "attn_agg.l1": "pool.l1", "attn_agg.l2": "pool.l2"}
    pre = prefix if prefix is not None else (f"{task}::" if any(k.startswith(f"{task}::") for k in weights) else "")
    out = {}
    for name, arr in weights.items():
        if not name.startswith(pre) or name[len(pre):].startswith(ENC) or (not pre and "::" in name):
            continue
        mod, _, leaf = name[len(pre):].rpartition(".")
        if mod in names:
            out[f"{names[mod]}.{leaf}"] = torch.from_numpy(np.ascontiguousarray(arr.T if arr.ndim == 2 else arr))
    return out


# ----------------------------------------------------------------------------- entry point
def convert(weights_path, config_path, out, task: Optional[str] = None, fusion: Optional[str] = None,
            tokenizer_dir=None, category_vocab=None, overwrite: bool = False) -> dict:
    """Convert official weights to a checkpoint folder; returns a summary dict.

    Args:
        weights_path: official ``.pdparams`` (or the fixture's ``.npz``).
        config_path: the official configuration as JSON (keys of ``configuration.py``).
        out: checkpoint folder to write.
        task: ``uvd`` | ``pop`` | ``cap`` to also convert that fine-tuned head, else backbone only.
        fusion: ``average`` | ``attention``; default from the config's ``agg`` (``avr`` / ``attn``).
    """
    import torch  # heavy imports only when converting

    from refound_core.model.checkpoint import check_state_dict, save_checkpoint
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound

    config_path = Path(config_path)
    try:
        official = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the official config {config_path} as JSON ({exc})") from exc
    cfg = config_from_official(official)
    weights = read_paddle_weights(weights_path)
    state = convert_encoder(weights, cfg)
    with torch.device("meta"):
        skeleton = ReFound(cfg, init_weights=False)
    check_state_dict(skeleton, state, f"{weights_path} (converted)")
    model = ReFound.from_state_dict(cfg, state)

    head, task_meta = None, None
    if task is not None:
        if task not in TASKS:
            raise InputError(f"--task {task!r} is not one of {sorted(TASKS)}")
        label, kind = TASKS[task]
        agg = official.get("agg", "avr")
        fusion = fusion or OFFICIAL_AGG.get(agg)
        if fusion is None:
            raise InputError(f"official config agg={agg!r} is neither 'avr' nor 'attn'; pass --fusion")
        head_state = convert_head(weights, task)
        if not head_state:
            raise InputError(f"{weights_path} holds no fine-tuned head (target_prediction.*) for task {task!r}; "
                             "convert without --task to get the backbone only")
        if fusion == "average":
            head_state = {k: v for k, v in head_state.items() if not k.startswith("pool.")}
        spec = dict(hidden_size=cfg.hidden_size, kind=kind, num_classes=1, fusion=fusion,
                    dropout=float(official.get("fdrop", cfg.hidden_dropout)))
        with torch.device("meta"):
            check_state_dict(TaskHead(**spec), head_state, f"{weights_path} head {task!r} (converted)")
        head = TaskHead.from_spec(spec, head_state)
        task_meta = {"name": label, "official_task": task, "kind": kind,
                     "output": "logit (sigmoid = probability)" if kind == "binary" else "raw regression value"}
    ignored = sorted(k for k in weights if not k.startswith(ENC) and "::" not in k
                     and not k.startswith(("target_prediction.", "attn_agg.")))
    prov = {"source": "official PaddlePaddle ReFound weights (PaddlePaddle/PaddleSpatial research/ReFound)",
            "converted_from": str(Path(weights_path).resolve()), "official_config": official,
            "training_data": "as released by the ReFound authors", "teachers": ["ChatGLM-6B + M3E-Base", "CN-CLIP ViT-L/14"]}
    save_checkpoint(out, model, head, task=task_meta, tokenizer_dir=tokenizer_dir, category_vocab=category_vocab,
                    provenance=prov, overwrite=overwrite)
    return {"out": str(out), "config": cfg.to_dict(), "num_params": sum(p.numel() for p in model.parameters()),
            "task": task_meta, "fusion": fusion if task else None, "ignored": ignored}
