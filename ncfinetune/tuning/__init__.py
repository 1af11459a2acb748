"""What is tuned and how: the method configs and their registry (``methods``), the tuned model
(``model``), its checkpoints (``checkpoint``), the frozen-prefix cache (``prefix_cache``) and
per-block features (``features``).
"""

from ncfinetune.tuning.model import (
    BN_POLICIES,
    TunedModel,
    full_wrap,
    get_tuned_model,
    layer_wrap,
    linear_wrap,
    load_tuned,
    lora_block_wrap,
    scl_wrap,
)

__all__ = [
    "BN_POLICIES",
    "TunedModel",
    "full_wrap",
    "get_tuned_model",
    "layer_wrap",
    "linear_wrap",
    "load_tuned",
    "lora_block_wrap",
    "scl_wrap",
]
