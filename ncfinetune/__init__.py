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
from ncfinetune.training import build_cosine_schedule, build_optimizer
from ncfinetune.tuning import (
    BN_POLICIES,
    METHODS,
    TunedModel,
    TuningConfig,
    full_wrap,
    layer_wrap,
    linear_wrap,
    scl_wrap,
    wrap,
)

__all__ = [
    "BN_POLICIES",
    "METHODS",
    "BlockError",
    "BlockInfo",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MetricInputError",
    "NcFinetuneError",
    "TunedModel",
    "TuningConfig",
    "UnsupportedModelError",
    "__version__",
    "build_cosine_schedule",
    "build_optimizer",
    "full_wrap",
    "get_adapter",
    "layer_wrap",
    "linear_wrap",
    "list_blocks",
    "load_tuned",
    "read_tuned_config",
    "scl_wrap",
    "wrap",
]
