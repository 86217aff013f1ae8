"""SwinV2 model library (imports torch only). Public API per docs/DESIGN.md."""
from . import probes
from .attention import WindowAttention
from .kernels import KERNELS
from .checkpointing import apply_activation_checkpointing, remove_activation_checkpointing
from .config import ATTENTION_KERNELS, PAPER_VARIANTS, VARIANTS, SwinV2Config, WindowGeometry, window_geometry
from .flops import flops
from .model import (BasicLayer, BlockRef, PatchEmbed, PatchMerging, SwinTransformerV2, SwinTransformerV2Block, create_model,
                    iter_blocks, param_groups)
from .optim_groups import layer_id, no_weight_decay
from .probes import AmplitudeProbe, logit_scales
from .simmim import (SimMIM, SwinTransformerV2ForSimMIM, create_simmim, load_simmim_state_dict, save_simmim_state_dict,
                     simmim_state_dict)
from .weights import (CheckpointMismatchError, LoadReport, load_official_state_dict, official_state_dict,
                      save_official_state_dict)

__all__ = [
    "VARIANTS", "PAPER_VARIANTS", "ATTENTION_KERNELS", "KERNELS", "SwinV2Config", "WindowGeometry", "window_geometry", "BlockRef", "SwinTransformerV2", "SwinTransformerV2Block",
    "BasicLayer", "PatchMerging", "PatchEmbed", "WindowAttention", "create_model", "iter_blocks", "param_groups",
    "layer_id", "no_weight_decay",
    "apply_activation_checkpointing", "remove_activation_checkpointing", "flops", "probes", "AmplitudeProbe",
    "logit_scales", "load_official_state_dict", "LoadReport", "CheckpointMismatchError", "official_state_dict",
    "save_official_state_dict",
    "SimMIM", "SwinTransformerV2ForSimMIM", "create_simmim", "simmim_state_dict", "save_simmim_state_dict",
    "load_simmim_state_dict",
]
