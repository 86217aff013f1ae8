"""Image classification: (soft) cross entropy with on-device mixup/cutmix/label smoothing;
evaluated as loss / top-1 / top-5 on the validation shards (optionally through a class map)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

import swinv2
from swinv2.class_map import load_class_map
from ..data import build_mixup
from ..data.feed import build_feed, to_device
from ..evaluation import DTYPES, evaluate  # the one evaluation path (also swinv2-eval)
from ..rundir import EXPORT_FILE, VAL_LOSS, VAL_TOP1, VAL_TOP5

MIXUP_STATE = "mixup"  # key of the mixup generator in rng_rank{r}.pt

log = logging.getLogger("train")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


@dataclass
class ClassificationConfig:
    """`task=classification` (the default): images -> class logits, (soft) cross entropy with the
    data group's mixup / cutmix / label smoothing; eval = top-1 / top-5 / loss. Its settings live
    in the data group (augmentation) and the model (the head's classes: data.num_classes)."""

    name: str = "classification"


class ClassificationTask:
    name = "classification"
    Config = ClassificationConfig         # its `task` node
    backbone_prefix = ""                  # parameter names are the backbone's (swinv2.param_groups)
    export_file = EXPORT_FILE             # the run's export (official classification format)

    @staticmethod
    def build_model(spec, from_checkpoint: bool = False) -> torch.nn.Module:
        """The classifier of a run; `model.pretrained` loaded unless resuming (the checkpoint wins).
        A SimMIM file loads too (its encoder.* keys; mask_token and decoder dropped, logged)."""
        torch.manual_seed(spec.run.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's weights)
        model = swinv2.SwinTransformerV2(spec.model)
        if spec.pretrained and not from_checkpoint:
            report = swinv2.load_official_state_dict(model, spec.pretrained, class_map=spec.pretrained_class_map)
            log.info("loaded %s (head: %s)", spec.pretrained, report.head_action)
            for message in report.messages:
                log.info("pretrained weights: %s", message)
        return model

    def __init__(self, spec, env):
        self.spec, self.env = spec, env
        self.device, self.dtype = env.device, DTYPES[spec.train.precision]
        self.mixup = build_mixup(spec.data, spec.num_classes)
        self.feed = build_feed(spec.data)  # uint8 -> normalised + random erasing, on the device
        self.generator = torch.Generator().manual_seed(spec.run.seed * 7919 + env.rank)
        self.class_map = None
        if spec.train.eval_class_map:  # a 22K head scored on 1K labels: logits[:, map]
            self.class_map = torch.tensor(load_class_map(spec.train.eval_class_map).source_indices(spec.num_classes),
                                          dtype=torch.int64, device=self.device)

    def batch(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (their erase boxes attached by the stream) -> the normalised, erased,
        mixed batch on the device; the copies are non_blocking (pinned when data.pin_memory)."""
        x, y = self.feed(images, self.device), to_device(targets, self.device)
        if self.mixup is not None:
            x, y = self.mixup(x, y, self.generator)
        return x, y

    def loss(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return soft_cross_entropy(model(x.to(self.dtype)).float(), y)

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        return evaluate(model, self.spec.data, img_size=self.spec.model.img_size, batch_size=self.spec.batch.eval_batch,
                        device=self.device, rank=self.env.rank, world_size=self.env.world_size, dtype=self.dtype,
                        class_map=self.class_map)

    def describe(self, m: Dict[str, float]) -> str:
        return f"val top-1 {m[VAL_TOP1]:.2f} top-5 {m[VAL_TOP5]:.2f} loss {m[VAL_LOSS]:.4f}"

    def rng_state(self) -> Dict[str, Any]:
        return {MIXUP_STATE: self.generator.get_state()}

    def set_rng_state(self, state: Dict[str, Any]) -> None:
        if MIXUP_STATE in state:
            self.generator.set_state(state[MIXUP_STATE])
