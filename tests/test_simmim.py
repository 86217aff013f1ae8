"""SimMIM: masks (train/data/masking.py), the model and its loss (swinv2/simmim.py), the official
SimMIM checkpoint format both ways, and the task (train/tasks/simmim.py). Tiny models only."""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import swinv2
from swinv2.config import SwinV2Config
from swinv2.simmim import (SimMIM, load_simmim_state_dict, masked_l1_terms, normalize_targets, save_simmim_state_dict,
                           simmim_loss, simmim_state_dict)
from swinv2_train.data.masking import MaskGenerator, sample_mask_rng

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)


def tiny_config(img_size=64, window_size=4, **kw) -> SwinV2Config:
    return SwinV2Config(img_size=img_size, window_size=window_size, num_classes=0, **{**TINY, **kw})


def tiny_simmim(seed=0, norm_target_window=0, perturb=True, **kw) -> SimMIM:
    torch.manual_seed(seed)
    model = SimMIM(tiny_config(**kw), norm_target_window=norm_target_window)
    if perturb:  # the res-post norms start at 0, which would make every block the identity
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def batch(n=2, img_size=64, ratio=0.6, mask_patch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, img_size, img_size, generator=gen)
    masks = MaskGenerator(img_size, mask_patch, 4, ratio)
    m = torch.stack([masks(seed * 100 + i) for i in range(n)])
    return x, m


# ------------------------------------------------------------------------------------ masks
def test_mask_exact_ratio_and_granularity():
    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    assert (gen.num_cells, gen.num_masked, gen.token_grid) == (36, 22, 48)  # ceil(36 * 0.6) = 22
    for seed in range(20):
        mask = gen(seed)
        assert mask.shape == (48, 48) and mask.dtype == torch.bool
        assert int(mask.sum()) == 22 * 8 * 8  # exactly 22 cells of 8x8 tokens
        cells = mask.view(6, 8, 6, 8)  # (cell row, token row in cell, cell col, token col in cell)
        assert torch.equal(cells, cells[:, :1, :, :1].expand_as(cells))  # constant over each 32-px cell
        assert torch.equal(gen.cell_mask(seed), cells[:, 0, :, 0])


def test_mask_ratio_rounds_up_and_other_geometries():
    assert MaskGenerator(64, 16, 4, 0.5).num_masked == 8  # 16 cells
    assert MaskGenerator(64, 16, 4, 0.51).num_masked == 9  # ceil(8.16)
    m = MaskGenerator(224, 32, 4, 0.6)(3)
    assert m.shape == (56, 56) and int(m.sum()) == math.ceil(49 * 0.6) * 64


def test_mask_cells_are_uniform():
    gen = MaskGenerator(192, 32, 4, 0.6)
    rng = random.Random(0)
    freq = torch.stack([gen.cell_mask(rng).float() for _ in range(3000)]).mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 22 / 36), atol=0.04), freq


def test_mask_determinism_seed_and_resume():
    gen = MaskGenerator(192, 32, 4, 0.6)
    assert torch.equal(gen(7), gen(7))
    assert torch.equal(gen(random.Random(7)), gen(7))
    assert not torch.equal(gen(7), gen(8))
    # per sample: a pure function of (seed, epoch, stream, index): a stream resumed at index 5
    # draws what an uninterrupted one draws, and the draw order does not matter
    full = [gen(sample_mask_rng(0, 1, 2, i)) for i in range(10)]
    resumed = [gen(sample_mask_rng(0, 1, 2, i)) for i in range(5, 10)]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    assert len({tuple(m.flatten().tolist()) for m in full}) == 10
    for other in (sample_mask_rng(1, 1, 2, 3), sample_mask_rng(0, 2, 2, 3), sample_mask_rng(0, 1, 3, 3)):
        assert not torch.equal(gen(other), full[3])


@pytest.mark.parametrize("args, word", [((192, 30, 4, 0.6), "divide"), ((192, 32, 3, 0.6), "multiple"),
                                        ((192, 32, 4, 0.0), "mask_ratio"), ((192, 32, 4, 1.0), "mask_ratio")])
def test_mask_generator_errors(args, word):
    with pytest.raises(ValueError, match=word):
        MaskGenerator(*args)


# ------------------------------------------------------------------------------------ loss
def direct_loss(images, reconstruction, mask, patch):
    """The official loss written out with loops over the masked tokens."""
    total, pixels = 0.0, 0
    B, C = images.shape[:2]
    for b in range(B):
        for i in range(mask.shape[1]):
            for j in range(mask.shape[2]):
                if mask[b, i, j]:
                    sl = (b, slice(None), slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
                    total += (images[sl] - reconstruction[sl]).abs().sum().item()
                    pixels += patch * patch
    return total / (pixels + 1e-5) / C


def direct_normalized(images, window):
    """Per pixel and channel: (x - mean) / sqrt(unbiased var + 1e-6) over the window cut at the border."""
    out = torch.empty_like(images)
    r = window // 2
    B, C, H, W = images.shape
    for i in range(H):
        for j in range(W):
            patch = images[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].reshape(B, C, -1)
            var = patch.var(dim=-1, unbiased=True) if patch.shape[-1] > 1 else torch.zeros(B, C)
            out[:, :, i, j] = (images[:, :, i, j] - patch.mean(-1)) / torch.sqrt(var + 1e-6)
    return out


def test_loss_equals_direct_computation_on_hand_built_batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    recon = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)  # patch 4: a 4x4 token grid
    mask[0, 0, 1] = mask[0, 3, 3] = mask[1, 2, 0] = True
    mask[1, :, 2] = True
    want = direct_loss(images, recon, mask, 4)
    got = simmim_loss(images, recon, mask, patch_size=4)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-6)
    # unmasked pixels do not count
    recon2 = recon.clone()
    recon2[0, :, :4, :4] += 100.0  # token (0, 0) of image 0 is not masked
    assert simmim_loss(images, recon2, mask, 4).item() == pytest.approx(got.item(), rel=1e-6)
    with_norm = simmim_loss(images, recon, mask, 4, norm_target_window=5)
    assert with_norm.item() == pytest.approx(direct_loss(direct_normalized(images, 5), recon, mask, 4), rel=1e-5)


@pytest.mark.parametrize("window", [1, 3, 5, 47])
def test_norm_targets_match_a_direct_window_computation(window):
    images = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(window), dtype=torch.float64)
    torch.testing.assert_close(normalize_targets(images, window), direct_normalized(images, window).float(),
                               rtol=1e-4, atol=1e-4)


def test_norm_target_window_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        normalize_targets(torch.zeros(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="odd"):
        SimMIM(tiny_config(), norm_target_window=46)


@pytest.mark.parametrize("window", [0, 47])
def test_model_loss_is_the_official_formula(window):
    model = tiny_simmim(norm_target_window=window).eval()
    x, m = batch()
    with torch.no_grad():
        rec = model.reconstruct(x, m)
        loss = model(x, m)
    assert rec.shape == x.shape
    target = direct_normalized(x.double(), window).float() if window else x
    assert loss.item() == pytest.approx(direct_loss(target, rec, m, 4), rel=1e-4)
    assert 0 < m.float().mean() < 1


def test_mask_token_replaces_masked_embeddings():
    model = tiny_simmim().eval()
    enc = model.encoder
    x, _ = batch(n=1)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 3, 5] = True
    with torch.no_grad():
        tokens = enc.embed_masked(x, mask)
        plain = enc.patch_embed(x)
    assert torch.equal(tokens[0, 3 * 16 + 5], enc.mask_token[0, 0])
    keep = torch.ones(256, dtype=torch.bool)
    keep[3 * 16 + 5] = False
    assert torch.equal(tokens[0, keep], plain[0, keep])
    with pytest.raises(ValueError, match=r"\(B, 16, 16\)"):
        model(x, torch.zeros(1, 8, 8, dtype=torch.bool))


def test_mask_token_init_and_no_head():
    torch.manual_seed(0)
    model = SimMIM(SwinV2Config(img_size=64, window_size=4, num_classes=1000, **TINY))  # num_classes ignored
    assert model.encoder.num_classes == 0 and isinstance(model.encoder.head, torch.nn.Identity)
    tok = model.encoder.mask_token
    assert tok.shape == (1, 1, 16) and tok.requires_grad and 0.003 < tok.std().item() < 0.04
    assert model.encoder_stride == 32
    conv = model.decoder[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (128, 32 * 32 * 3, (1, 1))
    assert model.decoder[1].upscale_factor == 32


# ------------------------------------------------------------------------------------ checkpoint format
def official_simmim_keys(depths, resolutions, window):
    """The official SimMIM(SwinTransformerV2ForSimMIM) state-dict keys, written from the official
    definitions: SwinTransformerV2 with num_classes=0 (no head), ape=False, patch_norm=True,
    every block registering relative_coords_table / relative_position_index and, only when the
    block shifts (odd block of a stage larger than the window), attn_mask; PatchMerging at the end of
    stages 0..n-2; then encoder.mask_token and decoder.0 (the Conv2d of nn.Sequential(conv, shuffle))."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    block_keys = ["norm1.weight", "norm1.bias", "attn.logit_scale", "attn.q_bias", "attn.v_bias",
                  "attn.relative_coords_table", "attn.relative_position_index", "attn.cpb_mlp.0.weight",
                  "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight", "attn.qkv.weight", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                  "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, (depth, res) in enumerate(zip(depths, resolutions)):
        for j in range(depth):
            keys += [f"layers.{i}.blocks.{j}.{k}" for k in block_keys]
            if j % 2 == 1 and res > window:
                keys.append(f"layers.{i}.blocks.{j}.attn_mask")
        if i < len(depths) - 1:
            keys += [f"layers.{i}.downsample.reduction.weight", f"layers.{i}.downsample.norm.weight",
                     f"layers.{i}.downsample.norm.bias"]
    keys += ["norm.weight", "norm.bias", "mask_token"]
    return {"encoder." + k for k in keys} | {"decoder.0.weight", "decoder.0.bias"}


def test_state_dict_is_the_official_simmim_key_set():
    model = tiny_simmim(perturb=False)
    sd = model.state_dict()
    assert set(sd) == official_simmim_keys((2, 2, 2, 2), (16, 8, 4, 2), window=4)
    assert sd["encoder.mask_token"].shape == (1, 1, 16)
    assert sd["decoder.0.weight"].shape == (3072, 128, 1, 1) and sd["decoder.0.bias"].shape == (3072,)
    assert not any(k.startswith("head") or ".head." in k for k in sd)
    exported = simmim_state_dict(model)["model"]
    assert set(exported) == set(sd)
    # a wrapped state dict (DeepSpeed / DDP "module.") exports under the same official names
    assert set(simmim_state_dict({"module." + k: v for k, v in sd.items()})["model"]) == set(sd)


def test_export_loads_strictly_back(tmp_path):
    src = tiny_simmim(seed=0)
    path = tmp_path / "simmim.pth"
    save_simmim_state_dict(src, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    dst = tiny_simmim(seed=5)
    dst.load_state_dict(ckpt["model"], strict=True)
    again = tiny_simmim(seed=9)
    load_simmim_state_dict(again, path)
    x, m = batch()
    with torch.no_grad():
        want = src(x, m)
        assert dst(x, m).item() == want.item() and again(x, m).item() == want.item()


def test_export_refuses_a_classifier_state_dict():
    torch.manual_seed(0)
    classifier = swinv2.SwinTransformerV2(SwinV2Config(img_size=64, window_size=4, num_classes=10, **TINY))
    with pytest.raises(ValueError, match="mask_token"):
        simmim_state_dict(classifier)


def test_simmim_file_starts_a_fine_tune_with_window_transfer(tmp_path):
    # the official SimMIM recipe: pre-train 192 / W12, fine-tune 224 / W14 with pretrained windows 12,12,12,6
    src = tiny_simmim(seed=0, img_size=192, window_size=12)
    path = tmp_path / "simmim_192_w12.pth"
    save_simmim_state_dict(src, path)
    torch.manual_seed(1)
    classifier = swinv2.SwinTransformerV2(SwinV2Config(
        img_size=224, window_size=14, num_classes=10, pretrained_window_sizes=(12, 12, 12, 6), **TINY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = swinv2.load_official_state_dict(classifier, str(path))
    text = " | ".join(report.messages)
    assert "SimMIM-only" in text and "encoder.mask_token" in text
    assert "decoder.0.weight" in text and "decoder.0.bias" in text
    assert "W12->W14" in text and "W6->W7" in text
    assert report.head_action == "reinitialised" and any("head" in str(w.message) for w in caught)
    enc = src.encoder.state_dict()
    own = classifier.state_dict()
    assert len(report.loaded) == len([k for k in own if not k.startswith("head.")
                                      and not any(w in k for w in swinv2.weights.BUFFER_KEYWORDS)])
    for key in ("patch_embed.proj.weight", "layers.2.blocks.1.attn.cpb_mlp.0.weight",
                "layers.3.blocks.0.attn.logit_scale", "norm.weight"):
        assert torch.equal(own[key], enc[key])
    with torch.no_grad():
        assert torch.isfinite(classifier(torch.randn(1, 3, 224, 224))).all()


# ------------------------------------------------------------------------------------ kernels, checkpointing, bf16
def loss_and_grads(model, x, m):
    model.zero_grad(set_to_none=True)
    loss = model(x, m)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention, checkpointing", [("fused", None), ("sequential", None),
                                                      ("reference", "block"), ("reference", "half"),
                                                      ("fused", "block")])
def test_kernels_and_activation_checkpointing_match_reference(attention, checkpointing):
    ref = tiny_simmim(seed=0, norm_target_window=5).train()
    other = SimMIM(tiny_config(attention=attention), norm_target_window=5).train()
    other.load_state_dict(ref.state_dict(), strict=True)
    if checkpointing:
        assert swinv2.apply_activation_checkpointing(other, granularity=checkpointing) == 8
    x, m = batch()
    want, want_grads = loss_and_grads(ref, x, m)
    got, got_grads = loss_and_grads(other, x, m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert want_grads["encoder.mask_token"].abs().sum() > 0 and want_grads["decoder.0.weight"].abs().sum() > 0


def test_bf16_forward_backward():
    model = tiny_simmim(seed=0, norm_target_window=5)
    x, m = batch()
    with torch.no_grad():
        want = model(x, m)
    model = model.to(torch.bfloat16).train()
    loss = model(x, m)  # fp32 images in: the model casts its input, the targets stay fp32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.mask_token.grad.dtype == torch.bfloat16 and torch.isfinite(model.encoder.mask_token.grad).all()
    assert loss.item() == pytest.approx(want.item(), rel=0.05)


# ------------------------------------------------------------------------------------ the task
def test_task_config_settings():
    from swinv2_train.tasks.simmim import SimMIMConfig
    node = OmegaConf.structured(SimMIMConfig)  # what task=simmim selects
    settings = SimMIMConfig.of(node)
    assert (settings.mask_patch_size, settings.mask_ratio, settings.norm_target_window, settings.recon_every) == \
        (32, 0.6, 47, 1000)
    off = SimMIMConfig.of(OmegaConf.merge(node, {"norm_target": {"enable": False}, "mask_ratio": 0.75}))
    assert (off.mask_patch_size, off.mask_ratio, off.norm_target_window, off.recon_every) == (32, 0.75, 0, 1000)
    assert SimMIMConfig.of({"mask_ratio": 0.5}).mask_ratio == 0.5  # a plain dict: the rest from the defaults
    with pytest.raises(ValueError, match="odd"):
        SimMIMConfig.of(OmegaConf.merge(node, {"norm_target": {"window": 48}}))


class _Env:
    device, rank, world_size = torch.device("cpu"), 0, 1


def _spec(img_size=64, **task):
    from types import SimpleNamespace
    return SimpleNamespace(model=tiny_config(img_size=img_size), run=SimpleNamespace(seed=0),
                           task={"name": "simmim", "mask_patch_size": 16, **task})


def test_task_batch_loss_and_metrics():
    from swinv2_train.tasks.simmim import SimMIMTask
    spec = _spec(norm_target={"enable": True, "window": 5})
    task = SimMIMTask(spec, _Env())
    model = SimMIMTask.build_model(spec)
    assert model.norm_target_window == 5 and model.encoder.num_classes == 0
    x, m = batch()
    b = task.batch(x, m)
    loss = task.loss(model, b)
    with torch.no_grad():
        assert loss.item() == pytest.approx(model(x, m).item())
    assert task.train_metrics() == {"train/mask_ratio": pytest.approx(m.float().mean().item())}
    assert task.train_metrics() == {}
    with pytest.raises(ValueError, match="mask"):
        task.batch(x, torch.zeros(2, dtype=torch.int64))  # a classification stream's labels


def test_task_eval_masks_are_fixed():
    from swinv2_train.tasks.simmim import eval_masks
    gen = MaskGenerator(64, 16, 4, 0.6)
    a, b = eval_masks(gen, 0, 3, 4), eval_masks(gen, 0, 3, 4)
    assert torch.equal(a, b) and a.shape == (4, 16, 16)
    assert not torch.equal(a, eval_masks(gen, 0, 4, 4))
    assert (a.flatten(1).sum(1) == 10 * 16).all()  # ceil(16 * 0.6) = 10 cells of 4x4 tokens


def test_task_evaluate_with_fixed_masks(tmp_path):
    from types import SimpleNamespace

    from data_helpers import make_dataset
    from swinv2_train.data import DataConfig
    from swinv2_train.tasks.simmim import SimMIMTask
    pattern, n = make_dataset(str(tmp_path / "val"), n_shards=2, per_shard=12, prefix="val")
    spec = _spec()
    spec.data = DataConfig(val_shards=pattern, num_classes=n, num_workers=0, augment="none")
    spec.batch = SimpleNamespace(eval_batch=16)
    task = SimMIMTask(spec, _Env())
    model = tiny_simmim(norm_target_window=47)
    first, second = task.evaluate(model), task.evaluate(model)
    assert first == second and first["val/samples"] == n and first["val/loss"] > 0
    assert first["val/mask_ratio"] == pytest.approx(10 / 16)
    assert model.training


def test_public_api_and_weight_decay_groups():
    assert swinv2.SimMIM is SimMIM and swinv2.save_simmim_state_dict is save_simmim_state_dict
    model = tiny_simmim(perturb=False)
    decay, no_decay = swinv2.param_groups(model, 0.05, backbone_prefix="encoder.")[:2]
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    # official: SwinTransformerV2ForSimMIM.no_weight_decay() adds mask_token
    assert "encoder.mask_token" in skipped and "decoder.0.bias" in skipped
    assert "decoder.0.weight" in {names[id(p)] for p in decay["params"]}
    # the SimMIM model exposes its encoder's stages: iter_blocks / checkpointing / probes take it
    assert [r.name for r in swinv2.iter_blocks(model)][:2] == ["layers.0.blocks.0", "layers.0.blocks.1"]
