"""Predictor behaviour: length batching without 512 padding, insufficient cells, OOM back-off, cancel."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.inference._inference_fixtures import CATEGORIES, CRS, WORDS
from refound_core.data.sample import RegionSample
from refound_core.errors import InputError
from refound_core.inference import predictor as predictor_mod
from refound_core.inference.predictor import AnalysisCanceled, Predictor


def _samples(n=12, seed=3, image_size=64):
    """Regions with 0..many POIs, some with an image, some with neither."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x0, y0 = 500000.0 + 256 * i, 3000000.0
        k = [0, 1, 3, 8, 12, 20][i % 6]
        names = [" ".join(rng.choice(WORDS, size=2)) for _ in range(k)]
        cats = [CATEGORIES[j % len(CATEGORIES)] for j in range(k)]
        xy = np.column_stack([x0 + rng.uniform(1, 255, k), y0 + rng.uniform(1, 255, k)])
        img = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8) if i % 3 == 0 else None
        out.append(RegionSample(f"c{i}", (x0, y0, x0 + 256, y0 + 256), CRS, names, cats, xy, img,
                                1.0 if img is not None else 0.0))
    return out


@pytest.fixture()
def pred(uv_checkpoint):
    return Predictor(uv_checkpoint, device="cpu", batch_size=4)


def _spy(p, monkeypatch):
    calls = []
    real = p.model.forward_batch

    def spy(batch, **kw):
        calls.append({"width": batch["token_ids"].shape[1], "ids": list(batch["cell_ids"])})
        return real(batch, **kw)

    monkeypatch.setattr(p.model, "forward_batch", spy)
    return calls


def test_batches_padded_to_their_own_length_not_512(pred, monkeypatch):
    samples = _samples(24)
    calls = _spy(pred, monkeypatch)
    results = list(pred.predict_samples(samples))
    assert [r.cell_id for r in results] == [s.cell_id for s in samples]  # input order kept
    widths = [c["width"] for c in calls]
    assert max(widths) < pred.config.max_poi_tokens
    assert len(set(widths)) > 1, "batches of short regions must not be padded like long ones"
    assert all(w % 8 == 0 for w in widths)


def test_insufficient_cells_never_reach_the_model(pred, monkeypatch):
    samples = _samples(12)
    calls = _spy(pred, monkeypatch)
    results = {r.cell_id: r for r in pred.predict_samples(samples)}
    seen = {i for c in calls for i in c["ids"]}
    for s in samples:
        r = results[s.cell_id]
        empty = not s.has_pois and not s.has_image
        assert r.sufficient is not empty
        assert (s.cell_id in seen) is not empty
        assert math.isnan(r.value) if empty else 0.0 <= r.value <= 1.0
        assert r.poi_count == s.num_pois


def test_prediction_does_not_depend_on_batch_company(pred):
    samples = _samples(12)
    together = {r.cell_id: r.value for r in pred.predict_samples(samples)}
    pred.batch_size = 1
    alone = {r.cell_id: r.value for r in pred.predict_samples(samples)}
    vals = np.array([together[k] for k in together if not math.isnan(together[k])])
    np.testing.assert_allclose(vals, [alone[k] for k in together if not math.isnan(together[k])], atol=1e-4)
    assert np.ptp(vals) > 1e-3


def test_oom_halves_the_batch_and_continues(pred, monkeypatch, caplog):
    samples = _samples(12)
    expected = [r.value for r in pred.predict_samples(samples)]
    real = pred.model.forward_batch
    sizes = []

    def oom_above_two(batch, **kw):
        sizes.append(len(batch["cell_ids"]))
        if len(batch["cell_ids"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, **kw)

    monkeypatch.setattr(pred.model, "forward_batch", oom_above_two)
    with caplog.at_level("WARNING", logger="refound.inference"):
        got = [r.value for r in pred.predict_samples(samples)]
    np.testing.assert_allclose(np.nan_to_num(got, nan=-1), np.nan_to_num(expected, nan=-1), atol=1e-4)
    assert pred.batch_size == 2 and sizes[0] == 4 and max(sizes[1:]) == 2
    assert "batch size lowered to 2" in caplog.text and any("lowered" in n for n in pred.notices)


def test_oom_at_batch_size_one_is_a_clear_error(pred, monkeypatch):
    def always_oom(batch, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pred.model, "forward_batch", always_oom)
    with pytest.raises(InputError, match="batch size 1"):
        list(pred.predict_samples(_samples(4)))


def test_other_errors_are_not_mistaken_for_oom(pred, monkeypatch):
    def broken(batch, **kw):
        raise ValueError("shape mismatch")

    monkeypatch.setattr(pred.model, "forward_batch", broken)
    with pytest.raises(ValueError, match="shape mismatch"):
        list(pred.predict_samples(_samples(4)))
    assert pred.batch_size == 4


def test_cancel_stops_before_the_next_batch(pred, monkeypatch):
    calls = _spy(pred, monkeypatch)
    with pytest.raises(AnalysisCanceled):
        list(pred.predict_samples(_samples(24), is_canceled=lambda: len(calls) >= 1))
    assert len(calls) == 1


def test_embeddings_and_device_choice(pred, uv_checkpoint, monkeypatch):
    res = list(pred.embed_samples(_samples(6)))
    h = pred.config.hidden_size
    for r in res:
        if r.sufficient:
            assert r.fused.shape == (h,) and r.fused.dtype == np.float32 and np.isfinite(r.fused).all()
        else:
            assert r.fused is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, notice = predictor_mod.resolve_device("auto")
    assert dev.type == "cpu" and "CPU" in notice
    with pytest.raises(InputError, match="CUDA"):
        predictor_mod.resolve_device("cuda")
    with pytest.raises(InputError, match="device"):
        predictor_mod.resolve_device("tpu")


def test_predictor_loaded_once_per_process(uv_checkpoint, pop_checkpoint):
    from refound_core.inference.predictor import load_predictor

    a = load_predictor(uv_checkpoint, device="cpu")
    assert load_predictor(uv_checkpoint, device="cpu", batch_size=3) is a and a.batch_size == 3
    b = load_predictor(pop_checkpoint, device="cpu")
    assert b is not a and b.task == "population"
    assert load_predictor(uv_checkpoint, device="cpu") is not a  # only the last model is kept


def test_inverse_target_follows_finetune_metadata():
    from refound_core.inference.predictor import _inverse_target

    v = np.array([0.0, 1.0, -1.0])
    np.testing.assert_allclose(_inverse_target(v, {"kind": "regression", "target_scaler": {"mean": 2.0, "std": 0.5},
                                                   "log_target": True}), np.expm1([2.0, 2.5, 1.5]))
    np.testing.assert_allclose(_inverse_target(v, {"kind": "regression"}), v)
    np.testing.assert_allclose(_inverse_target(v, {"kind": "binary", "target_scaler": {"mean": 9, "std": 9}}), v)


def test_int8_predictor_is_quantised_close_to_fp32_and_says_so(uv_checkpoint):
    """--int8: the Linear layers really run int8 (the module types change), predictions stay near
    the float32 ones without being identical, describe() names it, and a GPU is refused."""
    samples = _samples(12)
    fp32 = Predictor(uv_checkpoint, device="cpu", batch_size=4)
    q = Predictor(uv_checkpoint, device="cpu", batch_size=4, int8=True)
    assert q.describe()["precision"] == "int8-dynamic" and not q.precision.enabled
    kinds = {type(m).__module__ for m in q.model.modules()}
    assert any("quantized" in k for k in kinds), kinds
    a = np.array([r.value for r in fp32.predict_samples(samples) if r.sufficient])
    b = np.array([r.value for r in q.predict_samples(samples) if r.sufficient])
    assert a.shape == b.shape and np.all((b >= 0) & (b <= 1))
    assert np.max(np.abs(a - b)) < 0.05 and not np.array_equal(a, b)
    with pytest.raises(InputError, match="CPU only"):
        _raise_cuda_int8(uv_checkpoint)


def _raise_cuda_int8(checkpoint):
    """Whether or not a GPU is present: the device resolves to CUDA, so the int8 check is reached."""
    import unittest.mock as mock

    with mock.patch.object(predictor_mod, "resolve_device", return_value=(torch.device("cuda"), None)), \
            mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
        Predictor(checkpoint, device="cuda", int8=True)
