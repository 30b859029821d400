"""The backend as a model: :class:`RemotePredictor` has the predictor protocol
(:mod:`refound_core.inference.model_api`) and runs it in a ``refound serve`` process.

``run_analysis`` drives it exactly like the in-process Predictor: same sources, same blocks, same
sinks; only the forward passes happen in the backend, one HTTP request per batch, so a cancel
stops within one batch (and ``cancel()`` also tells the backend). Per-cell outputs beyond the
fixed ones come back in the response and land in ``CellResult.extra``, so every sink writes them.
Needs numpy (CellResult vectors) but never torch.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator, Optional

from refound_core.backend import protocol
from refound_core.backend.client import BackendCanceled, BackendClient, BackendError
from refound_core.errors import InputError

_KNOWN = {"cell_id", "value", "values", "sufficient", "poi_count", "image_coverage", "image_used", "bounds", *protocol.EMBEDDING_NAMES}


class RemotePredictor:
    """A backend at ``url`` with ``token``, or an existing ``client``.

    Args:
        batch_size: samples per request. embeddings: the vectors ``embed_samples`` asks for.
        description: where the model runs, for messages (``local backend /venv/bin/python``).
    """

    def __init__(self, url: str = "", token: str = "", batch_size: int = 16,
                 embeddings: tuple = protocol.EMBEDDING_NAMES, description: str = "", client=None):
        self.client = client if client is not None else BackendClient(url, token)
        self.batch_size = max(1, int(batch_size or 16))
        self.embeddings = tuple(embeddings)
        self.description = description or f"backend at {getattr(self.client, 'url', '?')}"
        self.notices: list = []
        self.timings = {"featurize": 0.0, "model": 0.0}
        self._info: Optional[dict] = None
        self._canceled = False

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        """The backend's /info (model, head, device, precision ...), fetched once."""
        if self._info is None:
            try:
                self.client.health()
                self._info = dict(self.client.info())
            except BackendError as exc:
                raise InputError(str(exc)) from None
            self._info.setdefault("device", self.description)
        return dict(self._info)

    @property
    def kind(self) -> Optional[str]:
        return self.describe().get("kind")

    @property
    def classes(self) -> Optional[list]:
        return self.describe().get("classes")

    def check_task(self, task: Optional[str]) -> str:
        own = self.describe().get("task")
        where = self.description
        if not own:
            raise InputError(f"the model of the {where} holds no task head (a pre-trained backbone); compute "
                             "region embeddings instead, or serve a checkpoint fine-tuned for a task")
        if task is not None and task != own:
            raise InputError(f"the model of the {where} was fine-tuned for {own!r}, not {task!r}; serve a "
                             f"checkpoint fine-tuned for {task}")
        return own

    # ------------------------------------------------------------------ protocol
    def predict_samples(self, samples: Iterable, task: Optional[str] = None, progress: Optional[Callable] = None,
                        is_canceled: Optional[Callable] = None) -> Iterator:
        task = self.check_task(task)
        return self._run(samples, lambda chunk: self.client.predict(chunk, task=task), progress, is_canceled)

    def embed_samples(self, samples: Iterable, progress: Optional[Callable] = None,
                      is_canceled: Optional[Callable] = None) -> Iterator:
        return self._run(samples, lambda chunk: self.client.embed(chunk, which=self.embeddings), progress,
                         is_canceled)

    def cancel(self) -> None:
        """Stop this run and the backend's running request (best effort; the backend may be gone)."""
        self._canceled = True
        try:
            self.client.cancel()
        except Exception:  # noqa: BLE001 - cancel is best effort
            pass

    # ------------------------------------------------------------------ machinery
    def _run(self, samples, call, progress, is_canceled) -> Iterator:
        from refound_core.inference.predictor import AnalysisCanceled

        self._canceled = False
        done, chunk = 0, []

        def send(chunk):
            if self._canceled or (is_canceled is not None and is_canceled()):
                raise AnalysisCanceled("analysis canceled")
            t0 = time.perf_counter()
            try:
                got = call(chunk)
            except BackendCanceled:
                raise AnalysisCanceled("analysis canceled") from None
            except BackendError as exc:
                raise InputError(str(exc)) from None
            self.timings["model"] = self.timings.get("model", 0.0) + time.perf_counter() - t0
            return [_cell_result(s, r) for s, r in zip(chunk, got)]

        for s in samples:
            chunk.append(s)
            if len(chunk) >= self.batch_size:
                yield from send(chunk)
                done += len(chunk)
                chunk = []
                if progress is not None:
                    progress(done, None)
        if chunk:
            yield from send(chunk)
            if progress is not None:
                progress(done + len(chunk), None)


def _number(v) -> float:
    return math.nan if v is None else float(v)


def _cell_result(sample, r: dict):
    """A backend's per-cell dict as the CellResult the in-process Predictor would have yielded."""
    import numpy as np

    from refound_core.inference.results import CellResult

    out = CellResult(cell_id=str(r.get("cell_id", sample.cell_id)), bounds=tuple(float(v) for v in sample.bounds),
                     crs=sample.crs, value=_number(r.get("value")), poi_count=int(r.get("poi_count") or 0),
                     image_coverage=float(r.get("image_coverage") or 0.0), sufficient=bool(r.get("sufficient")),
                     image_used=bool(r.get("image_used")))
    if r.get("values") is not None:
        out.values = np.array([_number(v) for v in r["values"]], dtype=np.float64)
    for name in protocol.EMBEDDING_NAMES:
        if r.get(name) is not None:
            setattr(out, name, np.asarray(r[name], dtype=np.float32))
    out.extra = {k: v for k, v in r.items() if k not in _KNOWN}
    return out
