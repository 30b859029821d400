"""Each pre-training objective against an independent numpy computation (paper Eqs. 3-7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from refound_core.losses import (ABLATIONS, LossConfig, PretrainHeads, compute_cmsa, compute_dlfm, compute_dvfm,
                                 compute_dvfm_patch, compute_dvlfm, compute_losses, compute_mgdm)
from refound_core.model.config import refound_tiny
from refound_core.model.refound import ReFoundOutput

H = 8


def _out(b=5, lp=6, n=4, seed=0, has_pois=None, has_image=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, lp + 1 + n, H, generator=g)
    return ReFoundOutput(hidden_states=hidden, poi_cls=hidden[:, 0], img_cls=hidden[:, lp], num_poi_tokens=lp,
                         has_pois=torch.ones(b, dtype=torch.bool) if has_pois is None else has_pois,
                         has_image=torch.ones(b, dtype=torch.bool) if has_image is None else has_image)


def _heads(**kw):
    cfg = refound_tiny(hidden_size=H, num_heads=2, vocab_size=11, image_size=32, patch_size=16, grid_cells=4)
    torch.manual_seed(1)
    return PretrainHeads(cfg, LossConfig(), llm_dim=3, vfm_dim=5, codebook_size=7, proj_dim=4, **kw)


def _lin(layer: nn.Linear, x: np.ndarray) -> np.ndarray:
    return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _np(t):
    return t.detach().double().numpy()


def test_dlfm_is_minus_mean_cosine_over_regions_with_pois_and_teacher():
    heads = _heads()
    has_pois = torch.tensor([True, True, False, True, True])
    out = _out(has_pois=has_pois)
    u_p = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    valid = torch.tensor([True, False, True, True, True])
    u_p[1] = float("nan")  # an invalid cache row must not poison the loss
    got = compute_dlfm(out, {"u_P": u_p, "u_P_valid": valid}, heads)
    rows = [0, 3, 4]  # valid teacher AND has POIs
    want = -_cos(_lin(heads.sigma_poi, _np(out.poi_cls))[rows], _np(u_p)[rows]).mean()
    assert got["dlfm"].item() == pytest.approx(want, rel=1e-5)
    got["dlfm"].backward()
    assert torch.isfinite(heads.sigma_poi.weight.grad).all()


def test_dvfm_uses_image_cls_and_skips_regions_without_image():
    heads = _heads()
    has_image = torch.tensor([True, False, True, True, False])
    out = _out(has_image=has_image)
    u_s = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    got = compute_dvfm(out, {"u_S": u_s}, heads)
    rows = [0, 2, 3]
    want = -_cos(_lin(heads.sigma_sate, _np(out.img_cls))[rows], _np(u_s)[rows]).mean()
    assert got["dvfm"].item() == pytest.approx(want, rel=1e-5)


def test_dense_dvfm_is_minus_mean_patch_cosine_over_valid_patches_only():
    cfg = refound_tiny(hidden_size=H, num_heads=2, vocab_size=11, image_size=32, patch_size=16, grid_cells=4)
    torch.manual_seed(1)
    heads = PretrainHeads(cfg, LossConfig(w_dvfm_patch=1.0), llm_dim=3, vfm_dim=5, codebook_size=7, proj_dim=4,
                          patch_dim=3)
    has_image = torch.tensor([True, False, True, True, True])
    out = _out(has_image=has_image, seed=6)
    patch_valid = torch.ones(5, 4, dtype=torch.bool)
    patch_valid[2, 1:] = False  # a partly covered image: three patches without image data
    out.patch_valid = patch_valid
    target = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(7))
    got = compute_dvfm_patch(out, {"patch_features": target, "u_S_valid": torch.tensor([1, 1, 1, 0, 1]).bool()}, heads)
    pred = _lin(heads.sigma_patch, _np(out.hidden_states[:, 7:11]))  # lp = 6: [P] + 5 tokens, then [S]
    keep = [(0, j) for j in range(4)] + [(2, 0)] + [(4, j) for j in range(4)]  # row 1 no image, row 3 no u_S
    want = -np.mean([_cos(pred[i, j][None], _np(target)[i, j][None])[0] for i, j in keep])
    assert got["dvfm_patch"].item() == pytest.approx(want, rel=1e-5)
    # What sits in the excluded patches' targets cannot change the loss.
    target2 = target.clone()
    target2[1] = 1e3
    target2[2, 1:] = -7.0
    target2[3] = torch.nan
    again = compute_dvfm_patch(out, {"patch_features": target2, "u_S_valid": torch.tensor([1, 1, 1, 0, 1]).bool()},
                               heads)
    assert again["dvfm_patch"].item() == pytest.approx(want, rel=1e-5)


def test_dense_dvfm_runs_only_with_dvfm_and_a_positive_weight():
    assert "dvfm_patch" not in LossConfig().active()  # the paper's five by default
    assert LossConfig(w_dvfm_patch=0.5).active() == ("dlfm", "dvfm", "dvfm_patch", "dvlfm", "mgdm", "cmsa")
    assert "dvfm_patch" not in LossConfig(w_dvfm_patch=0.5, dvfm=False).active()
    with pytest.raises(ValueError):
        LossConfig(w_dvfm_patch=-1.0)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _kl_rows(p, q):  # KL(p || q) per row
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def test_dvlfm_matches_eq5_rows_and_columns_with_temperature():
    heads = _heads()
    has_pois = torch.tensor([True, True, True, False, True])
    has_image = torch.tensor([True, True, False, True, True])
    out = _out(has_pois=has_pois, has_image=has_image, seed=4)
    v = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    t = 0.07
    got = compute_dvlfm(out, {"v_S": v}, heads, temperature=t)

    zp = _lin(heads.mu_poi, _np(out.poi_cls))
    zs = _lin(heads.mu_sate, _np(out.img_cls))
    vs = _np(v)
    rows = [0, 1, 4]        # POIs and an image (the teacher's row i is region i's image embedding)
    cols = [0, 1, 3, 4]     # an image
    student = np.array([[_cos(zp[i], zs[j]) for j in cols] for i in rows]) / t
    teacher = np.array([[_cos(vs[i], vs[j]) for j in cols] for i in rows]) / t
    row_term = _kl_rows(_softmax(teacher, 1), _softmax(student, 1)).mean()
    col_term = _kl_rows(_softmax(teacher, 0).T, _softmax(student, 0).T).mean()
    assert got["dvlfm_row"].item() == pytest.approx(row_term, rel=1e-4)
    assert got["dvlfm_col"].item() == pytest.approx(col_term, rel=1e-4)
    assert got["dvlfm"].item() == pytest.approx(row_term + col_term, rel=1e-4)


def test_dvlfm_is_zero_when_student_matches_teacher():
    heads = _heads()
    with torch.no_grad():  # identity projections onto the first 4 dims
        for lin in (heads.mu_poi, heads.mu_sate):
            lin.weight.copy_(torch.eye(4, H))
            lin.bias.zero_()
    out = _out(seed=6)
    out.hidden_states[:, 0] = out.hidden_states[:, out.num_poi_tokens]  # POI CLS == image CLS
    out = ReFoundOutput(out.hidden_states, out.hidden_states[:, 0], out.hidden_states[:, out.num_poi_tokens],
                        out.num_poi_tokens, out.has_pois, out.has_image)
    v = out.img_cls[:, :4].clone()
    got = compute_dvlfm(out, {"v_S": v}, heads)
    assert got["dvlfm"].item() == pytest.approx(0.0, abs=1e-5)


def _mlp_to_linear(heads):
    """Swap the MGDM MLPs for single linear layers so numpy can reproduce the logits."""
    torch.manual_seed(7)
    heads.mgdm_poi = nn.Linear(H, 11)
    heads.mgdm_sate = nn.Linear(H, 7)
    return heads


def _ce(logits, labels):
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    return -logp[np.arange(len(labels)), labels].mean()


def test_mgdm_is_cross_entropy_on_masked_tokens_and_masked_patches():
    heads = _mlp_to_linear(_heads())
    lp, n = 6, 4
    has_image = torch.tensor([True, True, False, True, True])
    out = _out(lp=lp, n=n, has_image=has_image, seed=8)
    mlm_mask = torch.zeros(5, lp, dtype=torch.bool)
    mlm_mask[0, 2] = mlm_mask[1, 1] = mlm_mask[1, 4] = mlm_mask[4, 5] = True
    labels = torch.randint(0, 11, (5, lp), generator=torch.Generator().manual_seed(9))
    masked = torch.zeros(5, n, dtype=torch.bool)
    masked[0, [0, 3]] = masked[2, 1] = masked[3, 2] = masked[4, 1] = True
    tokens = torch.randint(0, 7, (5, n), generator=torch.Generator().manual_seed(10))
    tok_valid = torch.tensor([True, True, True, True, False])
    got = compute_mgdm(out, {"mlm_mask": mlm_mask, "mlm_labels": labels, "masked_patches": masked,
                             "visual_tokens": tokens, "visual_tokens_valid": tok_valid}, heads)

    h = _np(out.hidden_states)
    poi_pos = [(0, 2), (1, 1), (1, 4), (4, 5)]
    poi_want = _ce(np.stack([_lin(heads.mgdm_poi, h[b, i]) for b, i in poi_pos]),
                   np.array([labels[b, i].item() for b, i in poi_pos]))
    # region 2 has no image, region 4 no valid visual tokens: only (0,0), (0,3), (3,2) count
    img_pos = [(0, 0), (0, 3), (3, 2)]
    img_want = _ce(np.stack([_lin(heads.mgdm_sate, h[b, lp + 1 + j]) for b, j in img_pos]),
                   np.array([tokens[b, j].item() for b, j in img_pos]))
    assert got["mgdm_poi"].item() == pytest.approx(poi_want, rel=1e-5)
    assert got["mgdm_img"].item() == pytest.approx(img_want, rel=1e-5)
    assert got["mgdm"].item() == pytest.approx(poi_want + img_want, rel=1e-5)


def test_mgdm_heads_are_two_layer_mlps_and_stay_in_graph_without_masks():
    heads = _heads()
    linears = [m for m in heads.mgdm_poi.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(H, H), (H, 11)]
    out = _out()
    none = torch.zeros(5, 6, dtype=torch.bool)
    got = compute_mgdm(out, {"mlm_mask": none, "mlm_labels": torch.zeros(5, 6, dtype=torch.long),
                             "masked_patches": torch.zeros(5, 4, dtype=torch.bool),
                             "visual_tokens": torch.zeros(5, 4, dtype=torch.long)}, heads)
    assert got["mgdm"].item() == 0.0
    got["mgdm"].backward()  # a graph-connected zero: every head parameter gets a (zero) gradient
    assert all(p.grad is not None and not p.grad.any() for p in heads.mgdm_poi.parameters())
    assert all(p.grad is not None for p in heads.mgdm_sate.parameters())


def test_cmsa_is_bce_over_eligible_positions():
    heads = _heads()  # grid 4 x 4, patches 2 x 2
    lp, n = 6, 4
    out = _out(lp=lp, n=n, has_image=torch.tensor([True, True, True, True, False]), seed=11)
    grid = torch.tensor([[0, 1, 1, 16, 16, 18]] * 5)   # CLS, POI in cell 1 (+SEP), POI in cell 16 (+SEP), pad
    poi_mask = torch.tensor([[1, 1, 1, 1, 1, 0]] * 5, dtype=torch.bool)
    mlm_mask = torch.zeros(5, lp, dtype=torch.bool)
    mlm_mask[1, 1] = True
    masked = torch.tensor([[True, False, False, False]] * 5)  # NW patch masked: cell 1 -> 1, cell 16 -> 0
    got = compute_cmsa(out, {"grid_pos": grid, "poi_mask": poi_mask, "mlm_mask": mlm_mask, "masked_patches": masked},
                       heads)
    h = _np(out.hidden_states)
    logits, ys = [], []
    for b in range(4):              # region 4 has no image
        for i, y in ((1, 1), (2, 1), (3, 0), (4, 0)):
            if (b, i) == (1, 1):    # masked POI token: excluded
                continue
            logits.append(_lin(heads.cmsa, h[b, i])[0])
            ys.append(y)
    z, y = np.array(logits), np.array(ys, dtype=float)
    p = 1 / (1 + np.exp(-z))
    want = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert got["cmsa"].item() == pytest.approx(want, rel=1e-5)
    assert got["cmsa_pos_rate"].item() == pytest.approx(y.mean(), rel=1e-6)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablations_drop_exactly_their_terms(ablation):
    expected_off = {"dlfm": {"dlfm"}, "dvfm": {"dvfm"}, "dvlfm": {"dvlfm"}, "dist": {"dlfm", "dvfm", "dvlfm"},
                    "mgdm": {"mgdm", "cmsa"}, "cmsa": {"cmsa"}}[ablation]
    cfg = LossConfig().without(ablation)
    on = {"dlfm", "dvfm", "dvlfm", "mgdm", "cmsa"} - expected_off
    assert set(cfg.active()) == on
    assert cfg.masking == ("mgdm" in on)
    mcfg = refound_tiny(hidden_size=H, num_heads=2, vocab_size=11, image_size=32, patch_size=16, grid_cells=4)
    heads = PretrainHeads(mcfg, cfg, llm_dim=3, vfm_dim=5, codebook_size=7)
    built = {name for name, _ in heads.named_children()}
    owner = {"sigma_poi": "dlfm", "sigma_sate": "dvfm", "mu_poi": "dvlfm", "mu_sate": "dvlfm",
             "mgdm_poi": "mgdm", "mgdm_sate": "mgdm", "cmsa": "cmsa"}
    assert {owner[b] for b in built} == on

    out = _out(lp=6, n=4)
    batch = {"u_P": torch.randn(5, 3), "u_S": torch.randn(5, 5), "v_S": torch.randn(5, 6),
             "grid_pos": torch.tensor([[0, 1, 1, 16, 16, 18]] * 5), "poi_mask": torch.ones(5, 6, dtype=torch.bool),
             "mlm_mask": torch.zeros(5, 6, dtype=torch.bool), "mlm_labels": torch.zeros(5, 6, dtype=torch.long),
             "masked_patches": torch.ones(5, 4, dtype=torch.bool), "visual_tokens": torch.zeros(5, 4, dtype=torch.long)}
    terms = compute_losses(out, batch, heads, cfg)
    objectives = {k for k in terms if k in owner.values()}
    assert objectives == on
    total = sum(terms[k] for k in on)
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_cmsa_without_mgdm_never_runs_and_weights_apply():
    assert "cmsa" not in LossConfig(mgdm=False, cmsa=True).active()
    with pytest.raises(ValueError):
        LossConfig().without("moge")  # a model switch, not a loss switch
    heads = _heads()
    out = _out()
    batch = {"u_P": torch.randn(5, 3)}
    one = compute_losses(out, batch, heads, LossConfig(dvfm=False, dvlfm=False, mgdm=False))
    two = compute_losses(out, batch, heads, LossConfig(dvfm=False, dvlfm=False, mgdm=False, w_dlfm=2.5))
    assert two["loss"].item() == pytest.approx(2.5 * one["loss"].item(), rel=1e-6)
