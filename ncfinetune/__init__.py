"""ncfinetune: parameter-efficient fine-tuning of timm vision models guided by neural collapse.

The public API is what ``__all__`` lists; everything else is private.
"""

from ncfinetune._version import __version__
from ncfinetune.backbones import BlockInfo, get_adapter, list_blocks
from ncfinetune.checkpoint import load_tuned, read_tuned_config
from ncfinetune.errors import (
    BlockError,
    CheckpointError,
    ConfigError,
    DataError,
    MetricInputError,
    NcFinetuneError,
    UnsupportedModelError,
)
from ncfinetune.features import collect_block_features, layerwise_nc1, plot_layerwise_nc1
from ncfinetune.hub import bundled_backbones, create_backbone
from ncfinetune.metrics import (
    NC1Accumulator,
    cdnv,
    class_separation_r2,
    linear_cka,
    nc1,
    nc1_or_none,
    numerical_rank,
)
from ncfinetune.prefix_cache import PrefixCache, prefix_blocker
from ncfinetune.selection import (
    BlockSelection,
    LRSelection,
    select_block,
    select_block_on_split,
    select_lr,
    select_lr_on_split,
)
from ncfinetune.training import build_cosine_schedule, build_optimizer, evaluate_rows, train_steps
from ncfinetune.tuning import (
    BN_POLICIES,
    METHODS,
    TunedModel,
    TuningConfig,
    full_wrap,
    layer_wrap,
    linear_wrap,
    lora_block_wrap,
    scl_wrap,
    wrap,
)

__all__ = [
    "BN_POLICIES",
    "METHODS",
    "BlockError",
    "BlockInfo",
    "BlockSelection",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MetricInputError",
    "NC1Accumulator",
    "NcFinetuneError",
    "PrefixCache",
    "TunedModel",
    "TuningConfig",
    "UnsupportedModelError",
    "__version__",
    "build_cosine_schedule",
    "build_optimizer",
    "bundled_backbones",
    "cdnv",
    "class_separation_r2",
    "collect_block_features",
    "create_backbone",
    "layerwise_nc1",
    "linear_cka",
    "nc1",
    "nc1_or_none",
    "prefix_blocker",
    "numerical_rank",
    "plot_layerwise_nc1",
    "full_wrap",
    "get_adapter",
    "layer_wrap",
    "linear_wrap",
    "lora_block_wrap",
    "list_blocks",
    "load_tuned",
    "read_tuned_config",
    "scl_wrap",
    "select_block",
    "select_block_on_split",
    "select_lr",
    "select_lr_on_split",
    "LRSelection",
    "train_steps",
    "evaluate_rows",
    "wrap",
]
