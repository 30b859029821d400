"""Self-describing checkpoints: a folder that rebuilds the model without code changes and
without unpickling anything.

Layout (``format_version`` 1)::

    CKPT/
      config.json          {"format_version": 1, "refound_version", "model": ModelConfig,
                            "head": TaskHead spec or null, "task": metadata or null,
                            "files": {"tokenizer": ..., "category_vocab": ..., "codebook": ..., extra...}}
      model.safetensors    backbone weights (ReFound state dict)
      head.safetensors     task head weights (only when a head is saved)
      tokenizer/           POI-name tokenizer vocab folder (optional)
      category_vocab.*     POI category vocabulary (optional)
      codebook.safetensors visual-token codebook (optional)
      provenance.json      training data, teachers, git revision, date, refound version
      <extra files>        anything passed in ``extra_files``

Writes are atomic: everything goes to a temporary sibling folder which is then renamed into place.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

import refound_core
from refound_core.errors import CheckpointError
from refound_core.model.config import ModelConfig
from refound_core.model.heads import TaskHead
from refound_core.model.refound import ReFound

FORMAT_VERSION = 1
CONFIG_FILE, MODEL_FILE, HEAD_FILE, PROVENANCE_FILE = "config.json", "model.safetensors", "head.safetensors", "provenance.json"
TOKENIZER_DIR, CODEBOOK_FILE = "tokenizer", "codebook.safetensors"
CONVERT_HINT = ("official PaddlePaddle weights (.pdparams/.npz) are converted with "
                "`refound convert-paddle --weights FILE --config official_config.json --out CKPT`")


@dataclass
class LoadedCheckpoint:
    """Result of :func:`load_checkpoint`. ``files`` maps role -> absolute path of stored files
    (``tokenizer``, ``category_vocab``, ``codebook`` and extra files) that exist."""

    path: Path
    model: ReFound
    config: ModelConfig
    head: Optional[TaskHead] = None
    task: Optional[dict] = None
    files: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def git_revision(start: Optional[Path] = None) -> Optional[str]:
    """The git commit of the refound source tree, or None outside a repository / before the first commit."""
    where = Path(start or Path(refound_core.__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_checkpoint(path, model: ReFound, head: Optional[TaskHead] = None, *, task: Optional[dict] = None,
                    tokenizer_dir=None, category_vocab=None, codebook=None,
                    extra_files: Optional[dict] = None, provenance: Optional[dict] = None,
                    overwrite: bool = False) -> Path:
    """Write a checkpoint folder atomically and return its path.

    Args:
        path: target folder (must not exist unless ``overwrite``).
        model: the backbone; head: optional task head (saved to head.safetensors).
        task: task metadata, e.g. ``{"name": "urban_village", "kind": "binary", "target": ...}``.
        tokenizer_dir: a tokenizer vocab folder, copied to ``tokenizer/``.
        category_vocab: a path (copied, suffix kept), an object with ``save(path)``, or a JSON-able
            dict/list (written as ``category_vocab.json``).
        codebook: optional visual-token codebook, ``{name: tensor}`` or a ``.safetensors`` file
            -> codebook.safetensors.
        extra_files: ``{relative name: source}`` with source an existing path (file or folder),
            bytes (the file content) or a dict/list (written as JSON).
        provenance: training data, teachers ... merged over the automatic fields
            (git revision, date, refound version).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"checkpoint folder {path} already exists; choose another path or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {}
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if head is not None:
            save_file(_contiguous(head.state_dict()), str(tmp / HEAD_FILE), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            src = Path(tokenizer_dir)
            if not src.is_dir():
                raise CheckpointError(f"tokenizer folder {src} does not exist")
            shutil.copytree(src, tmp / TOKENIZER_DIR)
            files["tokenizer"] = TOKENIZER_DIR
        if category_vocab is not None:
            files["category_vocab"] = _write_category_vocab(category_vocab, tmp)
        if codebook is not None:
            if isinstance(codebook, dict):
                save_file(_contiguous(codebook), str(tmp / CODEBOOK_FILE))
            elif Path(codebook).is_file() and Path(codebook).suffix == ".safetensors":
                shutil.copyfile(codebook, tmp / CODEBOOK_FILE)
            else:
                raise CheckpointError(f"codebook must be a dict of tensors or a .safetensors file, got {codebook!r}")
            files["codebook"] = CODEBOOK_FILE
        for name, src in (extra_files or {}).items():
            _write_extra(tmp, name, src)
            files.setdefault(name, name)
        meta = {
            "format_version": FORMAT_VERSION,
            "refound_version": refound_core.__version__,
            "model": model.config.to_dict(),
            "head": head.spec() if head is not None else None,
            "task": task,
            "files": files,
        }
        _write_json(tmp / CONFIG_FILE, meta)
        prov = {"refound_version": refound_core.__version__, "git_revision": git_revision(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "training_data": None, "teachers": None}
        prov.update(provenance or {})
        _write_json(tmp / PROVENANCE_FILE, prov)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


TEACHER_ROLES = ("describer", "sentence", "visual", "vl", "tokenizer")


def teachers_of(provenance: Optional[dict]) -> dict:
    """Role -> identity of the teacher each pre-training objective distilled (from a checkpoint's
    ``provenance.json``; a fine-tuned head's provenance points at its base checkpoint's). Roles:
    describer + sentence (DLFM), visual (DVFM), vl (DVLFM), tokenizer (MGDM visual tokens).
    Empty when the checkpoint was not pre-trained here (random init, converted weights)."""
    prov = provenance or {}
    teachers = prov.get("teachers") or (prov.get("base_provenance") or {}).get("teachers") or {}
    out = {}
    for role in TEACHER_ROLES:
        entry = teachers.get(role)
        if isinstance(entry, dict) and entry.get("used"):
            out[role] = str(entry["used"])
        elif isinstance(entry, str):
            out[role] = entry
    return out


def teachers_line(provenance: Optional[dict]) -> str:
    """One line naming the teachers (names without their long parameter lists) and the target
    normalisation, for tables and reports; says so when none are recorded."""
    t = teachers_of(provenance)
    if not t:
        return "none recorded (not pre-trained by refound pretrain)"
    parts = [f"{role}={ident.split('(')[0]}" for role, ident in t.items()]
    prov = provenance or {}
    pre = prov.get("pretraining") or (prov.get("base_provenance") or {}).get("pretraining") or {}
    parts.append(f"targets={pre.get('teacher_targets', 'raw')}")
    return ", ".join(parts)


def checkpoint_identity(path) -> str:
    """A short stable id of a checkpoint's weights (size and modification time of its config and
    weight files), for caches and run journals that must notice a re-written checkpoint. A missing
    file counts as such, so an id is defined for any path."""
    import hashlib

    h = hashlib.sha256()
    for name in (CONFIG_FILE, MODEL_FILE):
        f = Path(path) / name
        if f.exists():
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f"{name}:-".encode())
    return h.hexdigest()[:16]


def load_checkpoint(path, map_location="cpu", *, with_head: bool = True) -> LoadedCheckpoint:
    """Rebuild model (and head) from a checkpoint folder. Only JSON and safetensors are read.

    Raises:
        CheckpointError: missing folder/file, other format version, missing/unexpected/mis-shaped tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the folder written by save_checkpoint")
    if path.is_file():
        hint = f"; {CONVERT_HINT}" if path.suffix in (".pdparams", ".npz") else ""
        raise CheckpointError(f"{path} is a file; a refound checkpoint is a folder with {CONFIG_FILE} and {MODEL_FILE}{hint}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        paddle = any(path.glob("*.pdparams"))
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a refound checkpoint"
                              + (f" (it holds PaddlePaddle weights; {CONVERT_HINT})" if paddle else ""))
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file} is not readable JSON ({exc}); the checkpoint is damaged") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        writer = meta.get("refound_version", "unknown")
        advice = (f"upgrade refound to {writer} or newer" if isinstance(version, int) and version > FORMAT_VERSION
                  else f"re-save it with refound {refound_core.__version__}; {CONVERT_HINT}")
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} written by refound {writer}; "
                              f"refound {refound_core.__version__} reads format_version {FORMAT_VERSION}; {advice}")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: bad model config ({exc})") from exc
    with torch.device("meta"):  # shapes only: the weights come from the file, no random init
        skeleton = ReFound(cfg, init_weights=False)
    model = ReFound.from_state_dict(cfg, _read_checked(skeleton, path / MODEL_FILE, map_location, "backbone"))
    head = None
    if with_head and meta.get("head"):
        try:
            with torch.device("meta"):
                head_skeleton = TaskHead.from_spec(meta["head"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_file}: bad head spec {meta['head']!r} ({exc})") from exc
        head = TaskHead.from_spec(meta["head"], _read_checked(head_skeleton, path / HEAD_FILE, map_location, "task head"))
    files = {role: str(path / rel) for role, rel in (meta.get("files") or {}).items() if (path / rel).exists()}
    prov_file = path / PROVENANCE_FILE
    provenance = json.loads(prov_file.read_text(encoding="utf-8")) if prov_file.exists() else {}
    return LoadedCheckpoint(path=path, model=model, config=cfg, head=head, task=meta.get("task"),
                            files=files, provenance=provenance, meta=meta)


def load_codebook(path, map_location="cpu") -> dict:
    """The visual-token codebook tensors stored in a checkpoint (empty dict when none)."""
    f = Path(path) / CODEBOOK_FILE
    return load_file(str(f), device=str(map_location)) if f.exists() else {}


def _read_checked(module: torch.nn.Module, file: Path, map_location, what: str) -> dict:
    """Tensors of ``file`` (safetensors only), checked against ``module``'s names and shapes."""
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} is missing; the {what} weights cannot be loaded")
    try:
        state = load_file(str(file), device=str(map_location))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc
    check_state_dict(module, state, str(file))
    return state


def check_state_dict(module: torch.nn.Module, state: dict, source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} tensors of wrong shape ({'; '.join(shapes[:3])})")
    if problems:
        raise CheckpointError(f"{source} does not match the model in config.json: " + ", ".join(problems)
                              + "; the checkpoint folder is inconsistent (re-save or re-convert it)")


def _contiguous(state: dict) -> dict:
    # safetensors wants contiguous tensors; ReFound has no tied weights, so nothing shares storage.
    return {k: v.detach().contiguous() for k, v in state.items()}


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def _write_category_vocab(vocab, folder: Path) -> str:
    if isinstance(vocab, (str, os.PathLike)):
        src = Path(vocab)
        if not src.is_file():
            raise CheckpointError(f"category vocabulary file {src} does not exist")
        name = "category_vocab" + (src.suffix or ".txt")
        shutil.copyfile(src, folder / name)
        return name
    if hasattr(vocab, "save"):
        name = "category_vocab.json"
        vocab.save(folder / name)
        return name
    if isinstance(vocab, (dict, list)):
        name = "category_vocab.json"
        _write_json(folder / name, vocab)
        return name
    raise CheckpointError(f"category_vocab must be a path, an object with save(path) or a dict/list, got {type(vocab).__name__}")


def _write_extra(folder: Path, name: str, src) -> None:
    dest = (folder / name).resolve()
    if folder.resolve() not in dest.parents:
        raise CheckpointError(f"extra file name {name!r} points outside the checkpoint folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        dest.write_bytes(src)
    elif isinstance(src, (dict, list)):
        _write_json(dest, src)
    elif isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        shutil.copytree(src, dest)
    elif isinstance(src, (str, os.PathLike)) and Path(src).is_file():
        shutil.copyfile(src, dest)
    else:
        raise CheckpointError(f"extra file {name!r}: source {src!r} is not an existing file or folder; "
                              "pass a path, bytes (file content) or a dict/list (written as JSON)")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished temp folder into place; an existing target is swapped out first and
    removed only after the new folder is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
