"""Streaming data pipeline (webdataset-style tar shards). Imports no model code, no torchvision."""
from .config import AUG_PRESETS, DataConfig, as_data_config
from .mixup import Mixup, build_mixup
from .pipeline import DataGeometryError, DataPipelineError, StreamingLoader, build_eval_loader
from .shards import ShardPatternError
from .sources import DataSourceError, check_sources, resolve_sources
from .stream import TrainStream, merge_positions, saved_position
from .synthetic import ensure_synthetic_shards

__all__ = [
    "AUG_PRESETS", "DataConfig", "as_data_config", "Mixup", "build_mixup", "DataPipelineError",
    "StreamingLoader", "build_eval_loader", "ensure_synthetic_shards",
    "DataSourceError", "check_sources", "resolve_sources", "DataGeometryError",
    "ShardPatternError", "TrainStream", "merge_positions", "saved_position",
]
