"""swinv2.weights: loading / saving the official checkpoint format."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import swinv2
from swinv2.weights import (CheckpointMismatchError, LoadReport, load_official_state_dict,
                            official_state_dict, read_class_map, save_official_state_dict)

# A small SwinV2 (tiny's structure, narrower) so every test runs in well under a second.
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
BUFFER_WORDS = ("relative_position_index", "relative_coords_table", "attn_mask")


pytestmark = pytest.mark.usefixtures("single_thread")


def make(img_size=64, window_size=4, num_classes=10, seed=0, **kw):
    factory = getattr(swinv2, "create_model", None)
    if factory is None:  # package __init__ not wired yet
        from swinv2.model import create_model as factory
    torch.manual_seed(seed)
    return factory("tiny", img_size=img_size, window_size=window_size, num_classes=num_classes,
                   drop_path_rate=0.0, **{**SMALL, **kw}).eval()


@torch.no_grad()
def perturb_(model, seed=0):
    """Noise on every parameter (the res-post norms start at 0, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def run(model, img_size=64, seed=1):
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def param_keys(model):
    return {k for k, _ in model.named_parameters()}


@pytest.fixture()
def source():
    """(model, its state dict) with every parameter perturbed."""
    m = perturb_(make(seed=0), seed=1)
    return m, {k: v.clone() for k, v in m.state_dict().items()}


def test_round_trip_same_outputs(source):
    src, sd = source
    dst = make(seed=123)
    assert not torch.allclose(run(src), run(dst))
    report = load_official_state_dict(dst, sd)
    assert isinstance(report, LoadReport)
    torch.testing.assert_close(run(dst), run(src), atol=0, rtol=0)
    assert report.head_action == "loaded"
    assert sorted(report.loaded) == sorted(param_keys(dst))
    assert sorted(report.dropped_buffers) == sorted(k for k in sd if any(w in k for w in BUFFER_WORDS))
    assert any("attn_mask" in k for k in report.dropped_buffers)


def test_model_wrapper_key_and_path(source, tmp_path):
    src, sd = source
    dst = make(seed=5)
    load_official_state_dict(dst, {"model": sd, "optimizer": {}, "epoch": 3, "max_accuracy": 0.0})
    torch.testing.assert_close(run(dst), run(src), atol=0, rtol=0)

    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    dst2 = make(seed=6)
    load_official_state_dict(dst2, str(path))
    torch.testing.assert_close(run(dst2), run(src), atol=0, rtol=0)


def test_checkpoint_buffers_are_ignored_and_model_buffers_kept(source):
    src, sd = source
    dst = make(seed=7)
    own = {k: v.clone() for k, v in dst.state_dict().items() if any(w in k for w in BUFFER_WORDS)}
    corrupt = {k: (torch.zeros_like(v) if any(w in k for w in BUFFER_WORDS) else v) for k, v in sd.items()}
    load_official_state_dict(dst, corrupt)
    after = dst.state_dict()
    for k, v in own.items():
        assert torch.equal(after[k], v), k
    torch.testing.assert_close(run(dst), run(src), atol=0, rtol=0)


def test_window_transfer_w8_checkpoint_into_w16_model():
    # 128 px: stage grids 32/16/8/4.  W8 -> windows (8,8,8,4); W16 -> (16,16,8,4).
    src = perturb_(make(img_size=128, window_size=8, seed=0), seed=2)
    ckpt = official_state_dict(src)
    assert ckpt["model"]["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 15, 15, 2)

    pws = (8, 8, 8, 4)
    dst = make(img_size=128, window_size=16, pretrained_window_sizes=pws, seed=3)
    fresh = make(img_size=128, window_size=16, pretrained_window_sizes=pws, seed=4)
    report = load_official_state_dict(dst, ckpt)
    assert report.head_action == "loaded"
    assert any("window transfer" in m and "W8->W16" in m for m in report.messages), report.messages

    d, s, f = dst.state_dict(), src.state_dict(), fresh.state_dict()
    # window-independent parameters transfer as they are
    for k in s:
        if any(w in k for w in ("cpb_mlp", "logit_scale", "q_bias", "v_bias")):
            assert torch.equal(d[k], s[k]), k
    # buffers are the W16 model's own (rebuilt), not the checkpoint's W8 ones
    assert d["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 31, 31, 2)
    assert d["layers.0.blocks.1.attn_mask"].shape == (4, 256, 256)
    for k in f:
        if any(w in k for w in BUFFER_WORDS):
            assert torch.equal(d[k], f[k]), k
    out = run(dst, img_size=128)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_missing_key_raises_naming_it(source):
    _, sd = source
    del sd["layers.1.blocks.0.attn.q_bias"]
    with pytest.raises(CheckpointMismatchError, match=re.escape("layers.1.blocks.0.attn.q_bias")) as exc:
        load_official_state_dict(make(seed=9), sd)
    assert isinstance(exc.value, ValueError)
    assert "missing" in str(exc.value)


def test_missing_keys_list_is_truncated(source):
    _, sd = source
    sd = {k: v for k, v in sd.items() if ".blocks." not in k}  # drop ~136 keys
    with pytest.raises(CheckpointMismatchError) as exc:
        load_official_state_dict(make(seed=9), sd)
    msg = str(exc.value)
    assert "more" in msg and len(msg) < 3000


def test_unexpected_key_raises_naming_it(source):
    _, sd = source
    sd["layers.0.blocks.0.attn.k_bias"] = torch.zeros(32)
    with pytest.raises(CheckpointMismatchError, match=re.escape("layers.0.blocks.0.attn.k_bias")) as exc:
        load_official_state_dict(make(seed=9), sd)
    assert "unexpected" in str(exc.value)


def test_shape_mismatch_raises_naming_key_and_shapes(source):
    _, sd = source
    sd["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(100, 32)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_official_state_dict(make(seed=9), sd)
    msg = str(exc.value)
    assert "layers.0.blocks.0.mlp.fc1.weight" in msg
    assert "(100, 32)" in msg and "(128, 32)" in msg


def test_strict_false_reports_instead_of_raising(source):
    _, sd = source
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(3)
    dst = make(seed=9)
    before = dst.norm.bias.clone()
    report = load_official_state_dict(dst, sd, strict=False)
    assert report.missing == ["norm.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(dst.norm.bias, before)
    assert torch.equal(dst.norm.weight, sd["norm.weight"])


def _with_22k_head(sd):
    sd = dict(sd)
    rows = torch.arange(21841, dtype=torch.float32)
    sd["head.weight"] = rows[:, None].repeat(1, 256) + torch.linspace(0, 0.5, 256)
    sd["head.bias"] = -rows
    return sd


def test_22k_to_1k_head_with_class_map(source, tmp_path):
    _, sd = source
    sd = _with_22k_head(sd)
    class_map = torch.randperm(21841, generator=torch.Generator().manual_seed(0))[:1000]

    dst = make(num_classes=1000, seed=9)
    report = load_official_state_dict(dst, sd, class_map=class_map.tolist())
    assert report.head_action == "mapped_22k_to_1k"
    torch.testing.assert_close(dst.head.weight, sd["head.weight"][class_map], atol=0, rtol=0)
    torch.testing.assert_close(dst.head.bias, -class_map.float(), atol=0, rtol=0)

    # the official map22kto1k.txt format: one integer per line
    path = tmp_path / "map22kto1k.txt"
    path.write_text("\n".join(str(int(i)) for i in class_map) + "\n")
    dst2 = make(num_classes=1000, seed=10)
    load_official_state_dict(dst2, sd, class_map=path)
    assert torch.equal(dst2.head.bias, -class_map.float())
    assert torch.equal(read_class_map(str(path)), class_map)


def test_bad_class_map_is_rejected(source):
    _, sd = source
    sd = _with_22k_head(sd)
    with pytest.raises(ValueError, match="1000"):
        load_official_state_dict(make(num_classes=1000, seed=9), sd, class_map=list(range(999)))
    with pytest.raises(ValueError, match="21841"):
        load_official_state_dict(make(num_classes=1000, seed=9), sd, class_map=[21841] * 1000)


def test_other_head_mismatch_reinitialises_with_warning(source):
    src, sd = source  # 10-class head
    dst = perturb_(make(num_classes=5, seed=9), seed=3)  # head bias non-zero before the load
    with pytest.warns(UserWarning, match=re.escape("(10, 256)")) as rec:
        report = load_official_state_dict(dst, sd)
    assert "(5, 256)" in str(rec[0].message)
    assert report.head_action == "reinitialised"
    assert torch.equal(dst.head.bias, torch.zeros(5))
    w = dst.head.weight.detach()
    assert 0.01 < w.std() < 0.03 and w.abs().max() < 0.2  # trunc_normal(std=0.02), the model's own init
    assert not torch.equal(w[:5], sd["head.weight"][:5])
    assert any("trunc_normal" in m for m in report.messages)
    # the backbone was loaded
    assert torch.equal(dst.norm.weight, sd["norm.weight"])
    torch.testing.assert_close(dst.forward_features(torch.ones(1, 3, 64, 64)),
                               src.forward_features(torch.ones(1, 3, 64, 64)), atol=0, rtol=0)

    dst0 = perturb_(make(num_classes=5, seed=9), seed=3)
    with pytest.warns(UserWarning):
        report = load_official_state_dict(dst0, sd, head_init="zeros")
    assert torch.equal(dst0.head.weight, torch.zeros(5, 256))
    assert any("weight 0" in m for m in report.messages)


def test_22k_head_without_class_map_reinitialises_with_hint(source):
    _, sd = source
    dst = make(num_classes=1000, seed=9)
    with pytest.warns(UserWarning, match="class_map"):
        report = load_official_state_dict(dst, _with_22k_head(sd))
    assert report.head_action == "reinitialised"


def test_simmim_encoder_prefix_and_rpe_mlp_rename(source):
    src, sd = source
    simmim = {}
    for k, v in sd.items():
        simmim["encoder." + k.replace("cpb_mlp", "rpe_mlp")] = v
    simmim["encoder.mask_token"] = torch.zeros(1, 1, 32)
    simmim["decoder.0.weight"] = torch.zeros(3072, 256, 1, 1)
    assert any("rpe_mlp" in k for k in simmim)
    dst = make(seed=9)
    report = load_official_state_dict(dst, {"model": simmim})
    torch.testing.assert_close(run(dst), run(src), atol=0, rtol=0)
    assert any("rpe_mlp" in m for m in report.messages)
    assert any("SimMIM" in m and "decoder.0.weight" in m for m in report.messages)


def test_simmim_checkpoint_without_head(source):
    _, sd = source
    no_head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    dst = make(seed=9)
    with pytest.warns(UserWarning, match="head"):
        report = load_official_state_dict(dst, no_head)
    assert report.head_action == "reinitialised"


def test_module_and_compile_prefixes(source):
    src, sd = source
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        dst = make(seed=9)
        load_official_state_dict(dst, {prefix + k: v for k, v in sd.items()})
        torch.testing.assert_close(run(dst), run(src), atol=0, rtol=0)


class _Wrapper(nn.Module):  # stands in for DDP / a DeepSpeed engine: parameters under "module."
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_wrapped_model_load_and_save(source):
    src, sd = source
    wrapped = _Wrapper(make(seed=9))
    assert next(iter(wrapped.state_dict())).startswith("module.")
    load_official_state_dict(wrapped, sd)
    torch.testing.assert_close(run(wrapped), run(src), atol=0, rtol=0)
    saved = official_state_dict(wrapped)["model"]
    assert set(saved) == set(sd)
    # activation-checkpoint wrappers that insert a path component are unwrapped too
    ac = {k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v for k, v in sd.items()}
    assert set(official_state_dict(ac)["model"]) == set(sd)


def test_saved_official_dict_is_fp32_cpu_and_loads(source, tmp_path):
    src, sd = source
    half = make(seed=11)
    half.load_state_dict(sd)
    half = half.to(torch.bfloat16)
    path = tmp_path / "sub" / "official.pth"
    saved = save_official_state_dict(half, path)
    assert set(saved) == {"model"}

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert set(loaded) == {"model"} and set(loaded["model"]) == set(sd)
    for k, v in loaded["model"].items():
        assert v.device.type == "cpu"
        if sd[k].is_floating_point():
            assert v.dtype == torch.float32, k
            assert torch.equal(v, sd[k].to(torch.bfloat16).float()), k
        else:
            assert v.dtype == sd[k].dtype, k  # relative_position_index stays int64

    dst = make(seed=12)
    report = load_official_state_dict(dst, loaded)
    assert report.head_action == "loaded"
    # expected: the parameters rounded through bf16; buffers are the model's own exact ones
    params = param_keys(dst)
    expected = make(seed=13)
    expected.load_state_dict({k: (v.to(torch.bfloat16).float() if k in params else v) for k, v in sd.items()})
    torch.testing.assert_close(run(dst), run(expected), atol=0, rtol=0)


def test_activation_checkpointing_does_not_change_keys(source):
    apply = getattr(swinv2, "apply_activation_checkpointing", None)
    if apply is None:
        from swinv2.checkpointing import apply_activation_checkpointing as apply
    src, sd = source
    model = make(seed=9)
    assert apply(model) > 0
    load_official_state_dict(model, sd)
    assert set(official_state_dict(model)["model"]) == set(sd)
    torch.testing.assert_close(run(model), run(src), atol=0, rtol=0)


def test_no_warning_on_clean_load(source):
    _, sd = source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_official_state_dict(make(seed=9), sd)


# --------------------------------------------------------------------------------------------- loader steps
from swinv2.weights import (canonicalize_checkpoint, match_parameters, model_key_index, plan_head,  # noqa: E402
                            unwrap_checkpoint, window_transfer_message)


def test_step_unwrap_checkpoint(tmp_path):
    sd = {"a.weight": torch.ones(2)}
    assert unwrap_checkpoint({"model": {"state_dict": sd}, "epoch": 3}) is sd
    assert unwrap_checkpoint({"module": sd}) is sd and unwrap_checkpoint(sd) is sd
    torch.save({"model": sd}, tmp_path / "c.pth")
    assert torch.equal(unwrap_checkpoint(tmp_path / "c.pth")["a.weight"], sd["a.weight"])
    with pytest.raises(TypeError, match="list"):
        unwrap_checkpoint([1, 2])


def test_step_canonicalize_checkpoint():
    t = torch.zeros(3)
    raw = {"encoder.layers.0.blocks.0.attn.rpe_mlp.0.weight": t, "module.encoder.norm.weight": t,
           "encoder.layers.0.blocks.1.attn_mask": torch.zeros(4, 16, 16),
           "encoder.layers.0.blocks.0.attn.relative_coords_table": torch.zeros(1, 7, 7, 2),
           "encoder.mask_token": t, "decoder.0.weight": t}
    c = canonicalize_checkpoint(raw)
    assert sorted(c.tensors) == ["layers.0.blocks.0.attn.cpb_mlp.0.weight", "norm.weight"]
    assert c.dropped_buffers == ["encoder.layers.0.blocks.1.attn_mask",
                                 "encoder.layers.0.blocks.0.attn.relative_coords_table"]
    assert c.buffer_shapes["layers.0.blocks.0.attn.relative_coords_table"] == (1, 7, 7, 2)
    assert c.messages == ["renamed 1 SimMIM 'rpe_mlp' keys to 'cpb_mlp'",
                          "dropped 2 SimMIM-only keys [decoder.0.weight, encoder.mask_token]",
                          "dropped 2 window-dependent buffers from the checkpoint; the model keeps its own "
                          "(rebuilt for its window)"]
    assert raw["encoder.mask_token"] is t  # pure: the input is not modified
    with pytest.raises(CheckpointMismatchError, match="two entries for 'norm.weight'"):
        canonicalize_checkpoint({"norm.weight": t, "module.norm.weight": t})
    with pytest.raises(CheckpointMismatchError, match="'norm.weight' is not a tensor"):
        canonicalize_checkpoint({"norm.weight": 1.0})


def test_step_model_key_index():
    m = make()
    wrapped = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    targets, buffers = model_key_index(wrapped)
    assert targets["head.weight"] == "_orig_mod.head.weight"
    assert not any(w in n for n in targets for w in BUFFER_WORDS)
    assert "layers.0.blocks.1.attn_mask" in buffers and "layers.0.blocks.0.attn.relative_position_index" in buffers
    with pytest.raises(RuntimeError, match="same official name"):
        model_key_index({"norm.weight": 1, "module.norm.weight": 2})


def test_step_window_transfer_message():
    key = "layers.0.blocks.0.attn.relative_coords_table"
    model_buffers = {key: torch.zeros(1, 15, 15, 2)}  # W8
    msg = window_transfer_message({key: torch.Size((1, 7, 7, 2))}, model_buffers)  # W4 checkpoint
    assert msg.startswith("window transfer: checkpoint windows -> model windows W4->W8 in 1 blocks")
    assert window_transfer_message({key: torch.Size((1, 15, 15, 2))}, model_buffers) is None
    assert window_transfer_message({}, model_buffers) is None


def _head(rows, cols=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(rows, cols, generator=g), "head.bias": torch.randn(rows, generator=g)}


def test_step_plan_head_every_branch():
    model10, ckpt10 = _head(10, seed=1), _head(10, seed=2)
    plan = plan_head(ckpt10, model10)
    assert plan.action == "loaded" and plan.values["head.weight"] is ckpt10["head.weight"] and not plan.messages
    plan = plan_head(ckpt10, None)
    assert plan.action == "absent" and not plan.values
    assert plan.messages == ["model has no classification head; dropped checkpoint ['head.bias', 'head.weight']"]
    assert plan_head({}, None).messages == []
    plan = plan_head({"head.weight": ckpt10["head.weight"]}, model10)
    assert plan.reinit and plan.warnings == plan.messages and "no complete head (['head.weight'])" in plan.messages[0]
    plan = plan_head(_head(5), model10)
    assert plan.reinit and "head.weight (5, 8)" in plan.warnings[0] and "class_map" not in plan.warnings[0]
    c22, m1k = _head(21841, seed=3), _head(1000, seed=4)
    plan = plan_head(c22, m1k)
    assert plan.reinit and "pass class_map=map22kto1k.txt" in plan.warnings[0]
    index = list(range(21840, 21840 - 2000, -2))
    plan = plan_head(c22, m1k, class_map=index)
    assert plan.action == "mapped_22k_to_1k" and not plan.warnings
    assert torch.equal(plan.values["head.bias"], c22["head.bias"][index])
    assert torch.equal(plan.values["head.weight"], c22["head.weight"][index])
    with pytest.raises(ValueError, match="999 entries; expected 1000"):
        plan_head(c22, m1k, class_map=index[:999])


def test_step_match_parameters():
    model_sd = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1), "head.weight": torch.zeros(1)}
    targets = {k: "module." + k for k in model_sd}
    model_sd = {"module." + k: v for k, v in model_sd.items()}
    ckpt = {"a": torch.ones(2), "b": torch.ones(4), "d": torch.ones(1)}
    match = match_parameters(ckpt, targets, model_sd)
    assert list(match.values) == ["a"] and match.values["a"] is ckpt["a"]
    assert (match.missing, match.unexpected) == (["c"], ["d"])  # the head is not this step's business
    assert match.mismatched == ["b: checkpoint (4,) vs model (3,)"]
    assert match.problems() == ["missing keys (in the model, not in the checkpoint): [c]",
                                "unexpected keys (in the checkpoint, not in the model): [d]",
                                "shape mismatch: b: checkpoint (4,) vs model (3,)"]
    assert match_parameters({"a": torch.ones(2)}, {"a": "a"}, {"a": torch.zeros(2)}).problems() == []


# --------------------------------------------------------------------------------------------- class maps
from swinv2.class_map import ClassMapError, load_class_map  # noqa: E402

_SOURCES = [7, 3, 21840, 0]  # target class i <- source class _SOURCES[i]


@pytest.mark.parametrize("form, text", [
    ("text, one per line", "7\n3\n21840\n0\n"),
    ("text, comments, blank lines, no final newline", "# map\n7  # cat\n\n3\n 21840 \n0"),
    ("text, several per line", "7 3\n21840\t0\n"),
    ("JSON list", "[7, 3, 21840, 0]"),
    ("JSON list of strings, leading whitespace", '\n  ["7", "3", "21840", "0"]'),
    ("JSON object {source: target}", '{"21840": 2, "7": 0, "0": 3, "3": 1}'),
])
def test_class_map_reader_accepts_every_file_form(tmp_path, form, text):
    path = tmp_path / "map.txt"
    path.write_text(text)
    cm = load_class_map(path)
    assert cm.source_indices(21841) == _SOURCES, form
    assert cm.label_map() == {7: 0, 3: 1, 21840: 2, 0: 3}, form
    assert torch.equal(read_class_map(str(path)), torch.tensor(_SOURCES)), form


@pytest.mark.parametrize("value", [_SOURCES, tuple(_SOURCES), torch.tensor(_SOURCES), torch.tensor([_SOURCES]),
                                   {7: 0, 3: 1, 21840: 2, 0: 3}])
def test_class_map_reader_accepts_in_code_forms(value):
    assert read_class_map(value).tolist() == _SOURCES


def test_class_map_label_map_keeps_many_to_one():
    # relabelling data may send several source classes to one target; a head cannot
    cm = load_class_map({5: 0, 6: 0, 9: 1})
    assert cm.label_map() == {5: 0, 6: 0, 9: 1}
    with pytest.raises(ClassMapError, match="target class 0 has two sources"):
        cm.source_indices()
    assert load_class_map([4, 4]).source_indices() == [4, 4]  # a list: one source per target, repeats fine


@pytest.mark.parametrize("text, where, what", [
    ("7\n3\nseven\n", ":3:", "not an integer: 'seven'"),
    ("7\n3.5\n", ":2:", "not an integer: '3.5'"),
    ("1\n-4\n", ":2:", "negative class index -4"),
    ("[1, 2,\n 3,,]", ":2:", "invalid JSON"),
    ("[1, 2.0, 3]", ": entry 1", "not an integer: 2.0"),
    ("[1, true]", ": entry 1", "not a class index: True"),
    ('{"1": 0, "x": 1}', ": key 'x'", "not an integer: 'x'"),
    ('{"1": null}', ": value of key '1'", "not an integer: None"),
    ("[[1]]", ": entry 0", "not an integer: [1]"),
])
def test_class_map_reader_names_file_and_line_on_bad_input(tmp_path, text, where, what):
    path = tmp_path / "bad_map.txt"
    path.write_text(text)
    with pytest.raises(ClassMapError) as e:
        load_class_map(path)
    assert str(e.value).startswith(f"{path}{where}") and what in str(e.value), str(e.value)


def test_class_map_reader_rejects_bad_maps_for_a_head(tmp_path):
    path = tmp_path / "gap.json"
    path.write_text('{"4": 0, "5": 2}')
    with pytest.raises(ClassMapError, match=f"{re.escape(str(path))}: .*no source for target 1"):
        read_class_map(path)
    with pytest.raises(ValueError, match=r"\[0, 21841\)"):
        read_class_map([21841])
    with pytest.raises(TypeError, match="integers"):
        read_class_map(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="path, a sequence of ints or a mapping"):
        load_class_map(3)
    with pytest.raises(FileNotFoundError):
        load_class_map(tmp_path / "missing.txt")
