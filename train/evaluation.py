"""Evaluation: the one code path behind the trainer's validation and `swinv2-eval`
(swinv2_train.eval_command). `evaluate(model, data_cfg, ...)` takes a plain nn.Module (the
trainer passes `engine.module`)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import build_eval_loader
from .distributed import all_reduce_sum
from .rng import isolated_rng
from .rundir import VAL_LOSS, VAL_SAMPLES, VAL_TOP1, VAL_TOP5

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(model: nn.Module, data_cfg, *, img_size: int, batch_size: int, device,
             dtype: torch.dtype = torch.float32, class_map: Optional[torch.Tensor] = None,
             rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """Loss, top-1, top-5 (percent) and sample count of `model` on the validation shards.

    Every sample is seen once across ranks; with a process group the sums are all-reduced, so
    every rank returns the totals. `class_map` selects logit columns (22K head on 1K labels).
    The model's train/eval mode and the global RNG streams are left as they were."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss*n, top1, top5, n
    with isolated_rng():
        loader = build_eval_loader(data_cfg, img_size=img_size, batch_size=batch_size,
                                   rank=rank, world_size=world_size)
        for x, y in loader:
            x, y = x.to(device, dtype), y.to(device)
            logits = model(x).float()
            if class_map is not None:
                logits = logits[:, class_map]
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
            sums[1] += hit[:, 0].sum().item()
            sums[2] += hit.any(dim=1).sum().item()
            sums[3] += y.numel()
    model.train(was_training)
    s = all_reduce_sum(sums)  # ranks may see different batch counts
    n = max(1.0, s[3])
    return {VAL_LOSS: s[0] / n, VAL_TOP1: 100.0 * s[1] / n, VAL_TOP5: 100.0 * s[2] / n, VAL_SAMPLES: s[3]}
