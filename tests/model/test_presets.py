"""Presets, bf16 autocast, and training smoke checks."""
from __future__ import annotations

import time

import pytest
import torch

from refound_core.model.config import preset
from refound_core.model.heads import ReFoundWithHead, TaskHead
from refound_core.model.precision import PrecisionChoice, autocast, choose_precision, cpu_bf16_features, describe_precision
from refound_core.model.refound import ReFound

BF16_MAX_ABS = 0.1      # docs/MODEL.md "Precision": bf16 autocast vs fp32 on LayerNorm'd outputs
BF16_MEAN_ABS = 0.01
BF16_MIN_COS = 0.999


def _expected_params(cfg) -> int:
    """Parameter count from the architecture's definition (not from the module tree)."""
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    ln = 2 * h
    emb = (cfg.vocab_size + cfg.type_vocab_size + cfg.max_word_pos + cfg.max_poi_pos + cfg.num_grid_ids
           + cfg.num_categories) * h + ln
    emb += (cfg.patch_size ** 2 * cfg.in_chans + 1) * h + 2 * h + (cfg.num_patches + 1) * h + ln  # patch, cls+mask, pos, LN
    emb += 2 * h  # modality
    attn = 4 * h * h + 4 * h + ln
    expert = 2 * h * f + f + h + ln
    experts = sum(3 if i >= cfg.fusion_start else 2 for i in range(n))
    return emb + n * attn + experts * expert


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return ReFound(preset("base")).eval()


def test_base_has_the_paper_shape(base_model, make_batch):
    cfg = base_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads) == (12, 768, 3072, 12)
    assert cfg.fusion_start == 10 and cfg.max_poi_tokens == 512 and cfg.image_size == 256 and cfg.patch_size == 16
    n = sum(p.numel() for p in base_model.parameters())
    assert n == _expected_params(cfg) == 176_510_976  # the figure reported in docs/MODEL.md
    with torch.no_grad():
        out = base_model.forward_batch(make_batch(cfg, batch=1, num_pois=(2,)))
    assert out.hidden_states.shape == (1, out.num_poi_tokens + 257, 768)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_build_and_run(name, make_batch):
    torch.manual_seed(0)
    model = ReFound(preset(name)).eval()
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) == _expected_params(cfg)
    with torch.no_grad():
        out = model.forward_batch(make_batch(cfg, batch=2, num_pois=(3, 1)))
    assert out.hidden_states.shape[-1] == cfg.hidden_size and torch.isfinite(out.hidden_states).all()


def test_bf16_autocast_close_to_fp32(tiny_model, make_batch):
    batch = make_batch(tiny_model.config, batch=8, num_pois=(5, 3, 0, 8))
    with torch.no_grad():
        ref = tiny_model.forward_batch(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_model.forward_batch(batch)
    diff = (low.hidden_states.float() - ref.hidden_states).abs()
    assert diff.max() < BF16_MAX_ABS and diff.mean() < BF16_MEAN_ABS
    assert diff.max() > 0  # it really ran in bf16
    for a, b in ((low.poi_cls, ref.poi_cls), (low.img_cls, ref.img_cls)):
        assert torch.nn.functional.cosine_similarity(a.float(), b, dim=-1).min() > BF16_MIN_COS


def test_tiny_forward_backward_batch_of_8(make_batch):
    """Smoke test of one training step; the time is printed (benchmark note in docs/MODEL.md)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = ReFoundWithHead(ReFound(cfg), TaskHead(cfg.hidden_size, kind="binary", fusion="attention")).train()
    batch = make_batch(cfg, batch=8, num_pois=(30, 12, 0, 25))
    for step in ("warm-up", "timed"):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).squeeze(-1), torch.ones(8))
        loss.backward()
        print(f"tiny forward+backward, batch 8 ({step}): {time.perf_counter() - start:.3f} s")
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    # unused by design: P/S experts of fusion layers, the mask embedding (no masking here)
    fs = cfg.fusion_start
    assert all(".ffn_poi." in n or ".ffn_img." in n or n.endswith("mask_token") for n in no_grad)
    assert any(f"layers.{fs}.ffn_poi" in n for n in no_grad)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cpu_precision_choice_from_cpu_flags(tmp_path, monkeypatch):
    import platform
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_bf16_features(str(amx)) == {"amx_bf16": True, "avx512_bf16": False, "source": str(amx)}
    choice = choose_precision("cpu", cpuinfo_path=str(amx))
    assert choice.enabled and choice.dtype is torch.bfloat16 and "amx_bf16" in choice.reason
    choice = choose_precision("cpu", cpuinfo_path=str(plain))
    assert not choice.enabled and choice.dtype is torch.float32
    assert not choose_precision("mps").enabled
    if not torch.cuda.is_available():
        assert not choose_precision("cuda").enabled
    assert describe_precision("cpu").startswith("cpu: ")


def test_autocast_context_follows_the_choice(tiny_model, make_batch):
    batch = make_batch(tiny_model.config, batch=2)
    off, on = PrecisionChoice("cpu", "float32", "test"), PrecisionChoice("cpu", "bfloat16", "test")
    with torch.no_grad():
        with autocast("cpu", choice=off):
            assert not torch.is_autocast_enabled("cpu")
        with autocast("cpu", choice=on):
            assert torch.is_autocast_enabled("cpu")
            assert tiny_model.embeddings.image.patch_embed(torch.randn(2, 768)).dtype == torch.bfloat16
