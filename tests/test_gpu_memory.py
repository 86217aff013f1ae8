"""GPU tier: SwinV2-G at 1536^2 (the W32 recipe, stage 4 padded) with activation checkpointing on every
block and the sequential kernel, in bf16 as DeepSpeed's bf16 mode runs it, batch 1: its CUDA peak
memory against the memory model (swinv2_train.memory, what `run.plan=true` prints). Skipped without CUDA."""
import torch

import swinv2
from gpu_helpers import GPU
from swinv2_train import memory

pytestmark = GPU
GB = 1e9


def test_giant_1536_peak_memory_against_the_memory_model(report):
    cfg = swinv2.SwinV2Config.from_variant("giant", img_size=1536, window_size=32, pad_to_window=True,
                                           attention="sequential", sequential_chunk=8, num_classes=1000)
    with torch.device("cuda"):  # built on the GPU: no host copy of 3B parameters
        model = swinv2.SwinTransformerV2(cfg).to(torch.bfloat16).train()
    swinv2.apply_activation_checkpointing(model, every=1)
    P = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 1536, 1536, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(1, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # the bf16 weights and the input
    torch.cuda.reset_peak_memory_stats()
    torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before  # gradients + activations
    co = memory.stored_coefficients("sequential", "bf16")
    act = memory.predict_activations(cfg, 1536, 32, 1, True, co, chunk=8)["peak"]
    grads = memory.state_bytes(P, "bf16", 1)["grads"]
    predicted = grads + act
    report(f"SwinV2-G 1536^2/W32 bf16 ckpt+sequential b1 on {torch.cuda.get_device_name()}: gradients + "
           f"activations {measured / GB:.2f} GB measured, {predicted / GB:.2f} GB predicted "
           f"({grads / GB:.2f} + {act / GB:.2f}); weights {before / GB:.2f} GB")
    # the model's CPU validation is within +-16% for the activations; gradients are exact
    assert 0.75 * predicted <= measured <= 1.15 * predicted, (measured / GB, predicted / GB)
