"""The predictor protocol: what :func:`~refound_core.inference.pipeline.run_analysis` needs of a model.

Two implementations, one interface, so every entry point runs the same code whether the model is
in this process or in a backend:

* :class:`refound_core.inference.predictor.Predictor`: the checkpoint loaded here (torch);
* :class:`refound_core.backend.remote.RemotePredictor`: a ``refound serve`` backend over
  loopback HTTP (``refound_core.backend.client``); no torch needed on this side.

This module only documents the protocol (``typing.Protocol``: nothing to inherit); it imports
nothing heavy.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Protocol


class CellPredictor(Protocol):
    """A model that turns RegionSamples into CellResults.

    Attributes:
        batch_size: regions per forward pass (or per backend request); settable.
        notices: human-readable notes gathered so far (device fallback, batch-size reductions).
        timings: seconds per stage, at least ``featurize`` and ``model`` (reset by run_analysis).
    """

    batch_size: int
    notices: list
    timings: dict

    def describe(self) -> dict:
        """At least ``model``, ``checkpoint``, ``image_size``, ``hidden_size``, ``task``, ``kind``,
        ``classes``, ``device``, ``precision`` (the keys of ``Predictor.describe``)."""

    def check_task(self, task: Optional[str]) -> str:
        """The task to predict (the head's own); InputError when the model has no such head."""

    def predict_samples(self, samples: Iterable, task: Optional[str] = None, progress: Optional[Callable] = None,
                        is_canceled: Optional[Callable] = None) -> Iterator:
        """One CellResult per sample, in order; ``is_canceled()`` True raises AnalysisCanceled."""

    def embed_samples(self, samples: Iterable, progress: Optional[Callable] = None,
                      is_canceled: Optional[Callable] = None) -> Iterator:
        """One CellResult per sample with ``h_P`` / ``h_S`` / ``fused`` (paper 4.3)."""
