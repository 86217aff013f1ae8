"""Selective activation checkpointing (`granularity="selective"`): keep the matrix products' outputs,
recompute the pointwise work. Same loss and gradients as no checkpointing for every kernel, same
state-dict keys, and a live-memory peak between block checkpointing and none."""
import pytest
import torch

from swinv2 import apply_activation_checkpointing, create_model
from swinv2.checkpointing import SELECTIVE_SAVE_OPS, _save_matmuls, is_checkpointed
from swinv2.kernels import KERNELS
from swinv2_tools.live_memory import LiveMemoryTracker
from torch.utils.checkpoint import CheckpointPolicy

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(kernel, granularity):
    torch.manual_seed(0)
    m = create_model("tiny", img_size=64, window_size=4, drop_path_rate=0.2, attention=kernel, sequential_chunk=3,
                     embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)
    with torch.no_grad():  # non-identity post-norms, so the recomputed values matter
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.fill_(0.7)
    if granularity:
        assert apply_activation_checkpointing(m, granularity=granularity) == 8
    return m.train()  # drop path on: its draws must be replayed by the recompute


def _loss_and_grads(m, x, track=False):
    existing = list(m.parameters()) + list(m.buffers()) + [x]
    with LiveMemoryTracker().ignore_existing(existing) as tr:
        torch.manual_seed(7)
        loss = m(x).square().mean()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}, tr.peak


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_selective_same_loss_and_grads_as_no_checkpointing(kernel):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = _model(kernel, None)
    keys = list(plain.state_dict())
    sel = _model(kernel, "selective")
    assert list(sel.state_dict()) == keys
    assert all(is_checkpointed(b) for b in (m for m in sel.modules() if hasattr(m, "forward_mlp_half")))
    ref_loss, ref_grads, _ = _loss_and_grads(plain, x)
    loss, grads, _ = _loss_and_grads(sel, x)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert grads[n] is not None, n
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_selective_live_peak_between_block_and_none():
    # 256^2 with 16 channels: activations dominate, as at high resolution
    def model(gran):
        torch.manual_seed(0)
        m = create_model("tiny", img_size=256, window_size=8, attention="sequential", sequential_chunk=8,
                         embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
        if gran:
            apply_activation_checkpointing(m, granularity=gran)
        return m.train()

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    peaks = {g: _loss_and_grads(model(g), x)[2] for g in (None, "block", "selective")}
    assert peaks["block"] < peaks["selective"] < peaks[None], peaks


def test_policy_saves_matmuls_and_recomputes_pointwise():
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default, torch.ops.swinv2.window_attention.default):
        assert op in SELECTIVE_SAVE_OPS
        assert _save_matmuls(None, op) == CheckpointPolicy.MUST_SAVE
    for op in (aten.gelu.default, aten._softmax.default, aten.native_layer_norm.default, aten.add.Tensor):
        assert _save_matmuls(None, op) == CheckpointPolicy.PREFER_RECOMPUTE


def test_unknown_granularity_names_the_choices():
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(_model("reference", None), granularity="pointwise")


def test_remove_restores_the_in_place_relu():
    m = _model("reference", None)
    relus = [r for r in m.modules() if isinstance(r, torch.nn.ReLU)]
    assert relus and all(r.inplace for r in relus)
    apply_activation_checkpointing(m, granularity="selective")
    assert not any(r.inplace for r in relus)  # a kept Linear output must not be overwritten
    from swinv2 import remove_activation_checkpointing
    assert remove_activation_checkpointing(m) == 8
    assert all(r.inplace for r in relus)


def test_config_key_policy_checked_and_applied():
    import os
    from hydra import compose, initialize_config_dir

    import swinv2_train.config as C
    from swinv2_train.spec import resolve_spec
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

    def spec(overrides):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            return resolve_spec(compose("train", overrides=overrides), 1, resolve_data=False)

    s = spec(["train.activation_checkpointing.every=1", "train.activation_checkpointing.policy=selective"])
    assert s.train.activation_checkpointing.policy == "selective"
    assert spec([]).train.activation_checkpointing.policy == "block"
    with pytest.raises(C.ConfigError, match=r"^train\.activation_checkpointing\.policy"):
        spec(["train.activation_checkpointing.policy=layer"])


def test_bench_checkpointing_script_smoke(tmp_path):
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_checkpointing.py")
    spec = importlib.util.spec_from_file_location("bench_checkpointing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    assert bench.main(["--img", "64", "--window", "4", "--repeats", "1", "--cpu-malloc", "off",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["none", "block", "half", "selective"]
    assert rows["block"]["peak_live_gb"] < rows["selective"]["peak_live_gb"] < rows["none"]["peak_live_gb"]
