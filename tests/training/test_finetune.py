"""Downstream protocol: metrics, splits, target scaling, ReFound methods, finetune/evaluate commands."""
import json

import numpy as np
import pytest

from training.finetune.evaluate import make_split, subsample
from training.finetune.loop import TargetScaler
from training.finetune.metrics import binary_metrics, choose_threshold, is_better, regression_metrics, task_metrics
from training.finetune.tasks import get_task

from tests.training.finetune_fixtures import make_checkpoint, make_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    ds = make_dataset(root / "ds")
    ckpt = make_checkpoint(root / "ckpt", ds)
    return root, ds, ckpt


def test_metrics_against_hand_computation():
    # AUC = fraction of (pos, neg) pairs ranked correctly: pos {0.9, 0.4}, neg {0.5, 0.1} -> 3 of 4
    m = binary_metrics([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1], threshold=0.5)
    assert m["AUC"] == pytest.approx(0.75)
    # threshold 0.5: predicted [1,0,1,0] -> tp 1, fp 1, fn 1 -> F1 = 0.5
    assert m["F1"] == pytest.approx(0.5) and m["threshold"] == 0.5
    # AUPRC = average precision: positives at ranks 1 (precision 1/1) and 3 (2/3) -> (1 + 2/3) / 2
    assert m["AUPRC"] == pytest.approx((1 + 2 / 3) / 2)
    r = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r["RMSE"] == pytest.approx(np.sqrt(4 / 3))
    assert r["MAE"] == pytest.approx(2 / 3)
    assert r["R2"] == pytest.approx(1 - 4 / 2)
    assert is_better("regression", {"RMSE": 1.0}, {"RMSE": 2.0})
    assert not is_better("binary", {"AUC": 0.6}, {"AUC": 0.7})


def test_f1_threshold_is_chosen_on_validation_not_fixed_at_half():
    # a head that ranks perfectly but whose probabilities all sit below 0.5 (badly calibrated):
    # at a fixed 0.5 its F1 would be 0; the threshold chosen on validation recovers F1 = 1
    y_val, p_val = [1, 1, 0, 0, 0], [0.30, 0.25, 0.10, 0.05, 0.20]
    assert choose_threshold(y_val, p_val) == pytest.approx(0.25)  # the lowest score keeping F1 = 1
    y_test, p_test = [1, 0, 1, 0], [0.40, 0.15, 0.28, 0.22]
    m = task_metrics("binary", y_test, p_test, y_val=y_val, val_pred=p_val)
    assert m["threshold"] == pytest.approx(0.25) and m["F1"] == pytest.approx(1.0)
    assert binary_metrics(y_test, p_test, threshold=0.5)["F1"] == 0.0
    # the threshold comes from validation only: test scores shifted down move nothing but F1
    shifted = task_metrics("binary", y_test, [p - 0.1 for p in p_test], y_val=y_val, val_pred=p_val)
    assert shifted["threshold"] == pytest.approx(0.25) and shifted["F1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="validation"):
        task_metrics("binary", y_test, p_test)


def test_paired_comparison_against_scipy_and_by_hand():
    from scipy import stats

    from training.finetune.evaluate import paired_comparison

    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.75, 0.80, 0.78, 0.80, 0.76]
    d = np.subtract(a, b)
    c = paired_comparison(a, b, higher_is_better=True)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert c["n"] == 5 and c["mean_diff"] == pytest.approx(d.mean())
    assert c["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    # t = mean / (sd / sqrt(n)) with 4 degrees of freedom, two-sided
    t = d.mean() / (d.std(ddof=1) / np.sqrt(5))
    assert c["p"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert c["p"] < 0.05 and c["a_better"]
    # for an error metric the same differences mean A is worse
    assert not paired_comparison(a, b, higher_is_better=False)["a_better"]
    # a difference inside the noise is not "better"
    assert not paired_comparison([0.8, 0.7, 0.9], [0.75, 0.78, 0.85], higher_is_better=True)["a_better"]


def test_layer_decay_scales_per_layer():
    """Head 1, top encoder layer d, each layer below d times the one above, embeddings d^(L+1)."""
    import torch

    from refound_core.model.config import refound_tiny
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound
    from training.finetune.loop import layer_decay_groups

    cfg = refound_tiny(vocab_size=200, num_categories=8)
    backbone, head = ReFound(cfg), TaskHead(cfg.hidden_size, kind="binary")
    d, n_layers = 0.5, cfg.num_layers
    groups = layer_decay_groups(backbone, head, 0.01, d)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in backbone.named_parameters():
        if name.startswith("encoder.layers."):
            i = int(name.split(".")[2])
            assert scale_of[id(p)] == pytest.approx(d ** (n_layers - i)), name
        elif name.startswith("embeddings."):
            assert scale_of[id(p)] == pytest.approx(d ** (n_layers + 1)), name
    for p in head.parameters():
        assert scale_of[id(p)] == 1.0
    top = [p for n, p in backbone.named_parameters() if n.startswith(f"encoder.layers.{n_layers - 1}.")]
    assert top and all(scale_of[id(p)] == pytest.approx(d) for p in top)
    assert all(isinstance(p, torch.nn.Parameter) for p in top)


def test_split_is_random_thirds_disjoint_and_seeded():
    y = np.arange(30, dtype=float)
    y[[3, 7]] = np.nan
    a, b = make_split(y, seed=1), make_split(y, seed=1)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    allidx = np.concatenate([a.train, a.val, a.test])
    assert len(allidx) == len(set(allidx)) == 28 and not {3, 7} & set(allidx)
    assert {len(a.train), len(a.val), len(a.test)} <= {9, 10}
    assert not np.array_equal(make_split(y, seed=2).train, a.train)
    half = subsample(a, 0.5, seed=1)
    assert set(half.train) <= set(a.train) and len(half.train) == round(len(a.train) / 2)
    yb = np.array([1.0] * 4 + [0.0] * 40)
    sb = make_split(yb, seed=0, negative_ratio=5, kind="binary")
    total = np.concatenate([sb.train, sb.val, sb.test])
    assert (yb[total] == 1).sum() == 4 and (yb[total] == 0).sum() == 20


def test_target_scaler_round_trip_in_original_units():
    task = get_task("population")
    y = np.array([0.0, 10.0, 1000.0, 55.0])
    s = TargetScaler.fit(task, y)
    z = s.encode(task, y)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    np.testing.assert_allclose(s.decode(task, z), y, rtol=1e-9, atol=1e-9)


def test_custom_task_and_unknown_task_message():
    t = get_task("green_share", kind="regression")
    assert t.label == "green_share" and t.kind == "regression"
    with pytest.raises(ValueError, match="--task-kind"):
        get_task("no_such_task")


def test_feature_based_selects_best_validation_epoch_and_caches(tiny, tmp_path):
    from training.finetune.methods import EvalContext
    from training.finetune.refound_methods import ReFoundLinear

    root, ds, ckpt = tiny
    ctx = EvalContext(dataset=ds, checkpoint=str(ckpt), epochs=2, batch_size=8, cache_dir=str(tmp_path),
                      options={"feature_epochs": 6})
    task = get_task("population")
    split = make_split(ds.labels["population"], seed=0)
    res = ReFoundLinear(ctx).run(task, split, seed=1)
    assert res.test_pred.shape == (len(split.test),) and np.all(np.isfinite(res.test_pred))
    rmse = [h["val_RMSE"] for h in res.history]
    assert res.best_epoch == int(np.argmin(rmse))
    cached = list(tmp_path.glob("refound-*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    ReFoundLinear(ctx).run(task, split, seed=2)
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not recomputed


def test_finetune_command_writes_a_predicting_checkpoint(tiny, tmp_path):
    import torch

    from refound_core.data.featurize import collate  # noqa: F401
    from refound_core.model.checkpoint import load_checkpoint
    from training.cli import main
    from training.finetune.regions import featurizer_for_checkpoint

    root, ds, ckpt = tiny
    out = tmp_path / "uv"
    rc = main(["finetune", "--checkpoint", str(ckpt), "--data", str(ds.folder), "--task", "urban_village",
               "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    loaded = load_checkpoint(out)
    assert loaded.head is not None and loaded.task["name"] == "urban_village" and loaded.task["kind"] == "binary"
    assert set(loaded.task["test_metrics"]) == {"AUC", "AUPRC", "F1", "threshold"}
    feat = featurizer_for_checkpoint(loaded)
    enc = [feat.encode(ds[i], np.random.default_rng(0)) for i in range(4)]
    batch = feat.collate(enc, loaded.config.image_size)
    with torch.no_grad():
        p = loaded.head.predict(loaded.model.forward_batch(batch))
    assert p.shape == (4, 1) and torch.all((p >= 0) & (p <= 1))
    # an existing --out is refused, never overwritten
    assert main(["finetune", "--checkpoint", str(ckpt), "--data", str(ds.folder), "--task", "population",
                 "--epochs", "1", "--out", str(out)]) == 2


def test_evaluate_writes_tables_with_provenance(tiny, tmp_path):
    from training.cli import main

    root, ds, ckpt = tiny
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(ds.folder), "--checkpoint", str(ckpt), "--task", "population",
               "--methods", "refound_feature,refound_scratch_feature", "--runs", "2", "--feature-epochs", "3",
               "--data-scale", "100,50", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "synthetic test fixture" in md and "refound_feature" in md and "± " in md
    rep = json.loads((out / "results.json").read_text())
    runs = rep["tasks"]["population"]["results"]["1.0"]["refound_feature"]["runs"]
    assert len(runs) == 2 and all(np.isfinite(r["RMSE"]) for r in runs)
    splits = json.loads((out / "split.json").read_text())["population"]
    assert set(splits) == {"run0", "run1"}
    for split in splits.values():
        assert not set(split["train"]) & set(split["test"])
    # every run draws its own split (and the same splits serve every method: paired comparison)
    assert splits["run0"]["test"] != splits["run1"]["test"]
    assert [r["split_seed"] for r in runs] == [0, 1]
    paired = rep["tasks"]["population"]["paired"]["1.0"]
    assert paired["reference"] == "refound_feature"
    assert paired["against"]["refound_scratch_feature"]["R2"]["n"] == 2
    assert "Paired by split" in md
    assert (out / "data_scale.png").stat().st_size > 1000


def test_warmup_then_linear_decay_schedule():
    import torch

    from training.finetune.loop import warmup_linear

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2 warm-up steps (1/2, 2/2 of the peak), then 8 steps falling linearly towards 0
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])


def test_evaluate_journal_reuses_finished_runs_and_notices_changed_settings(tiny, tmp_path, monkeypatch):
    from training.cli import main
    from training.finetune.refound_methods import ReFoundLinear

    root, ds, ckpt = tiny
    calls = []
    real_run = ReFoundLinear.run

    def counting_run(self, task, split, seed):
        calls.append(seed)
        return real_run(self, task, split, seed)

    monkeypatch.setattr(ReFoundLinear, "run", counting_run)
    out = tmp_path / "eval"
    base = ["evaluate", "--data", str(ds.folder), "--checkpoint", str(ckpt), "--task", "population",
            "--methods", "refound_feature", "--feature-epochs", "2", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(base + ["--runs", "1"]) == 0
    first = json.loads((out / "results.json").read_text())["tasks"]["population"]["results"]["1.0"]["refound_feature"]
    assert len(calls) == 1
    # a larger --runs only trains the missing run; the finished one is taken from runs.jsonl as it was
    assert main(base + ["--runs", "2"]) == 0
    assert len(calls) == 2 and calls[1] != calls[0]
    rows = json.loads((out / "results.json").read_text())["tasks"]["population"]["results"]["1.0"]["refound_feature"]["runs"]
    assert len(rows) == 2 and rows[0] == first["runs"][0]
    # a line cut short by a kill is ignored, not fatal
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"key": "abc", "row": {"run"')
    # another budget is another experiment: nothing is reused
    assert main(base + ["--runs", "2", "--warmup-epochs", "1"]) == 0
    assert len(calls) == 4
    assert "warm-up 1" in (out / "results.md").read_text()
    # and the runs journaled after the cut line are found again
    assert main(base + ["--runs", "2", "--warmup-epochs", "1"]) == 0
    assert len(calls) == 4
