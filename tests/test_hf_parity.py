"""Numerical parity with HF transformers' Swinv2 (an independent implementation), via the
official checkpoint format: HF weights -> ``hf_to_official`` -> ``load_official_state_dict``.

Every HF parameter is perturbed first (HF initialises the post-norms to gamma=1/beta=0, biases to 0,
logit_scale to ln 10 ...) so no weight is trivially zero, one or shared, and a swapped mapping
would show up in the logits.

Where HF differs from the official code (checked against docs/swinv2-reference.md §3.5):

* HF adds the shifted-window mask TWICE in ``Swinv2SelfAttention.forward`` (``scores.view(...) +
  mask`` and then ``scores + mask`` again), so masked pairs get -200 instead of the official -100.
  Our model follows the official code (-100, added once).  With realistic logit scales both
  values make ``exp`` underflow to 0 and the logits agree; the difference only shows when a masked
  pair's logit exceeds the unmasked ones by roughly 100, which ``test_hf_adds_the_shift_mask_twice``
  constructs.  The end-to-end comparisons therefore need no adjustment.
* Initialisation only (weights are copied, so no effect here): HF does not zero-initialise
  ``norm1``/``norm2`` (official ``_init_respostnorm``); HF pads inputs that are not a multiple of
  the window while the official model is tied to one input size; HF skips the /(M-1)
  normalisation of the coords table for a 1x1 window (official divides by zero).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import swinv2  # noqa: E402
from swinv2.weights import load_official_state_dict, official_state_dict  # noqa: E402

try:
    from tests.hf_reference import (build_hf_model, hf_config, hf_to_official,  # noqa: E402
                                    official_param_keys, perturb_)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from hf_reference import (build_hf_model, hf_config, hf_to_official,  # noqa: E402
                              official_param_keys, perturb_)

ATOL = 1e-4
TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
# SwinV2-B widths and heads; depth reduced from (2,2,18,2) to keep the CPU test fast.
BASE_SHALLOW = dict(embed_dim=128, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32))


pytestmark = pytest.mark.usefixtures("single_thread")


def _create_model(variant, **kw):
    factory = getattr(swinv2, "create_model", None)
    if factory is None:  # package __init__ not wired yet
        from swinv2.model import create_model as factory
    return factory(variant, **kw)


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _images(img_size, batch=2, seed=1):
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_pair():
    hf = build_hf_model(hf_config(**TINY, window_size=8, image_size=256, num_labels=1000), seed=0)
    perturb_(hf, seed=1)
    official = hf_to_official(hf.state_dict())
    # drop_path_rate > 0 on purpose: eval() must disable stochastic depth.
    ours = _create_model("tiny", img_size=256, window_size=8, num_classes=1000, drop_path_rate=0.3).eval()
    report = load_official_state_dict(ours, official)
    x = _images(256)
    return hf, ours, official, report, x, _logits(hf, x)


def test_conversion_consumes_and_produces_every_key(tiny_pair):
    hf, ours, official, report, _, _ = tiny_pair
    model_params = {k for k, _ in ours.named_parameters()}
    assert set(official) == official_param_keys(TINY["depths"]) == model_params
    assert sum(v.numel() for v in official.values()) == sum(p.numel() for p in hf.parameters())
    assert report.head_action == "loaded"
    assert sorted(report.loaded) == sorted(model_params)
    # logit_scale keeps its (nH, 1, 1) shape; qkv is (3C, C) with no bias; k has no bias
    assert official["layers.0.blocks.0.attn.logit_scale"].shape == (3, 1, 1)
    assert official["layers.0.blocks.0.attn.qkv.weight"].shape == (288, 96)
    assert "layers.0.blocks.0.attn.qkv.bias" not in official


def test_tiny_256_w8_logits_match_hf(tiny_pair):
    hf, ours, _, _, x, ref = tiny_pair
    assert not ours.training
    out = _logits(ours, x)
    assert out.shape == ref.shape == (2, 1000)
    assert ref.abs().max() > 0.5  # not a degenerate all-zero comparison
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_eval_disables_drop_path(tiny_pair):
    _, ours, _, _, x, ref = tiny_pair
    try:
        ours.train()
        with torch.no_grad():
            torch.manual_seed(0)
            train_out = ours(x[:1])
    finally:
        ours.eval()
    # drop_path_rate=0.3 is live in train mode (so the eval match above is not vacuous) ...
    assert (train_out - ref[:1]).abs().max() > 1e-3
    # ... and eval() switches it off again
    torch.testing.assert_close(_logits(ours, x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("corruption", ["swap_norm1_norm2", "swap_k_v_rows", "swap_q_v_bias"])
def test_wrong_mapping_is_detected(tiny_pair, corruption):
    """The parity check is sensitive to the mapping choices that the HF names make easy to get
    wrong (HF's ``layernorm_before`` is applied AFTER attention, i.e. it is norm1)."""
    _, _, official, _, x, ref = tiny_pair
    bad = dict(official)
    blk = "layers.2.blocks.3."
    if corruption == "swap_norm1_norm2":
        for p in ("weight", "bias"):
            bad[blk + f"norm1.{p}"], bad[blk + f"norm2.{p}"] = official[blk + f"norm2.{p}"], official[blk + f"norm1.{p}"]
    elif corruption == "swap_k_v_rows":
        q, k, v = official[blk + "attn.qkv.weight"].chunk(3, dim=0)
        bad[blk + "attn.qkv.weight"] = torch.cat([q, v, k], dim=0)
    else:
        bad[blk + "attn.q_bias"], bad[blk + "attn.v_bias"] = official[blk + "attn.v_bias"], official[blk + "attn.q_bias"]
    model = _create_model("tiny", img_size=256, window_size=8, num_classes=1000, drop_path_rate=0.0).eval()
    load_official_state_dict(model, bad)
    assert (_logits(model, x[:1]) - ref[:1]).abs().max() > 1e-3


def test_base_192_w12_to_256_w16_window_transfer():
    """22K-style pre-training geometry 192/W12 -> fine-tune geometry 256/W16 with
    pretrained_window_sizes (12,12,12,6) (the official *_192to256_22kto1k_ft configs)."""
    pws = (12, 12, 12, 6)
    hf192 = build_hf_model(hf_config(**BASE_SHALLOW, window_size=12, image_size=192, num_labels=1000), seed=2)
    perturb_(hf192, seed=3)

    # 1) parity at the pre-training geometry (stage 3 is 12x12 = one window, stage 4 clipped to 6)
    ours192 = _create_model("base", img_size=192, window_size=12, num_classes=1000, drop_path_rate=0.2,
                            depths=BASE_SHALLOW["depths"]).eval()
    load_official_state_dict(ours192, hf_to_official(hf192.state_dict()))
    x192 = _images(192, seed=4)
    torch.testing.assert_close(_logits(ours192, x192), _logits(hf192, x192), atol=ATOL, rtol=0)

    # 2) the W12 checkpoint as the official code would save it (buffers for W12 included) ...
    ckpt = official_state_dict(ours192)
    assert ckpt["model"]["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 23, 23, 2)

    # ... loaded into the 256/W16 model: window buffers dropped and rebuilt
    ours256 = _create_model("base", img_size=256, window_size=16, num_classes=1000, drop_path_rate=0.2,
                            pretrained_window_sizes=pws, depths=BASE_SHALLOW["depths"]).eval()
    report = load_official_state_dict(ours256, ckpt)
    assert report.head_action == "loaded"
    assert any("relative_coords_table" in k for k in report.dropped_buffers)
    assert any("attn_mask" in k for k in report.dropped_buffers)
    assert ours256.state_dict()["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 31, 31, 2)

    # HF's params are window-independent and its buffers non-persistent: same weights, new geometry.
    hf256 = build_hf_model(hf_config(**BASE_SHALLOW, window_size=16, image_size=256, num_labels=1000,
                                     pretrained_window_sizes=pws), seed=5)
    hf256.load_state_dict(hf192.state_dict())
    x256 = _images(256, seed=6)
    ref = _logits(hf256, x256)
    out = _logits(ours256, x256)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)

    # extrapolated coordinates are really used: the stage-1 table edge is 15/11*8 -> log2(1+x)/3
    edge = math.log2(1 + 15 / 11 * 8) / 3
    table = ours256.state_dict()["layers.0.blocks.0.attn.relative_coords_table"]
    assert table.abs().max().item() == pytest.approx(edge, abs=1e-6)

    # and they matter: without pretrained_window_sizes the logits move
    plain = _create_model("base", img_size=256, window_size=16, num_classes=1000, drop_path_rate=0.0,
                          depths=BASE_SHALLOW["depths"]).eval()
    load_official_state_dict(plain, ckpt)
    assert (_logits(plain, x256[:1]) - ref[:1]).abs().max() > 1e-3


def _crafted_window():
    """One 2x2 window (N=4), C=2, 1 head, identity q, negated k, identity v, no biases, logit
    scale at its clamp (100).  Query 0 has cosine -1 with keys 0,1 (same region) and +1 with keys
    2,3 (other region, masked)."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]])
    region = torch.tensor([0, 0, 1, 1])
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)[None]  # (nW=1, N, N)
    return x, mask


def _official_window_attention(x, mask_value_multiplier, mask):
    # the official formula with identity q / -identity k / identity v, logit scale 100, CPB bias
    # replaced by a constant (added to every pair, so it cancels in the softmax)
    q = torch.nn.functional.normalize(x, dim=-1)
    k = torch.nn.functional.normalize(-x, dim=-1)
    scores = q @ k.transpose(-1, -2) * 100.0 + mask_value_multiplier * mask[0]
    return scores.softmax(-1) @ x


def test_hf_adds_the_shift_mask_twice():
    """Documents the HF difference: HF's masked pairs get 2*(-100); official/ours get -100."""
    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

    x, mask = _crafted_window()
    cfg = hf_config(embed_dim=2, depths=(1,), num_heads=(1,), window_size=2, image_size=8)
    attn = Swinv2SelfAttention(cfg, dim=2, num_heads=1, window_size=2, pretrained_window_size=[0, 0]).eval()
    with torch.no_grad():
        attn.query.weight.copy_(torch.eye(2)); attn.query.bias.zero_()
        attn.key.weight.copy_(-torch.eye(2))
        attn.value.weight.copy_(torch.eye(2)); attn.value.bias.zero_()
        attn.logit_scale.fill_(math.log(100.0))
        attn.continuous_position_bias_mlp[2].weight.zero_()  # constant bias 16*sigmoid(0)
        hf_out = attn(x, mask)[0]
    once = _official_window_attention(x, 1.0, mask)
    twice = _official_window_attention(x, 2.0, mask)
    assert (once - twice).abs().max() > 0.5  # the construction makes the mask value visible
    torch.testing.assert_close(hf_out, twice, atol=1e-5, rtol=0)

    # our WindowAttention follows the official code: -100 added once
    from swinv2.attention import WindowAttention

    ours = WindowAttention(dim=2, window_size=2, num_heads=1).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([torch.eye(2), -torch.eye(2), torch.eye(2)]))
        ours.q_bias.zero_(); ours.v_bias.zero_()
        ours.proj.weight.copy_(torch.eye(2)); ours.proj.bias.zero_()
        ours.logit_scale.fill_(math.log(100.0))
        ours.cpb_mlp[2].weight.zero_()
        ours_out = ours(x, mask=mask)
    torch.testing.assert_close(ours_out, once, atol=1e-5, rtol=0)
