"""ncfinetune: parameter-efficient fine-tuning of timm vision models guided by neural collapse.

The public API is what ``__all__`` lists (25 names at most). Everything else is importable from
the module that defines it: method configs' registry from ``ncfinetune.tuning.methods``, the training
loop from ``ncfinetune.training.loop``, per-block features from ``ncfinetune.tuning.features``, the
prefix cache from ``ncfinetune.tuning.prefix_cache``, errors from ``ncfinetune.errors``.

Example::

    import timm
    from ncfinetune import SCLConfig, get_tuned_model

    model = timm.create_model("resnet18", pretrained=True, num_classes=10)
    tuned = get_tuned_model(model, SCLConfig(block=4))
    tuned.print_trainable_parameters()
"""

from ncfinetune._version import __version__
from ncfinetune.backbones import list_blocks
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.errors import NcFinetuneError
from ncfinetune.metrics.collapse import cdnv, class_separation_r2, linear_cka, nc1, numerical_rank
from ncfinetune.selection.block import select_block
from ncfinetune.training.loop import fit_batches
from ncfinetune.tuning.features import layerwise_nc1
from ncfinetune.tuning.methods import (
    FullConfig,
    LayerConfig,
    LinearConfig,
    LoRABlockConfig,
    LoRAConfig,
    SCLConfig,
)
from ncfinetune.tuning.model import (
    TunedModel,
    full_wrap,
    get_tuned_model,
    layer_wrap,
    linear_wrap,
    load_tuned,
    scl_wrap,
)

__all__ = [
    "FullConfig",
    "LayerConfig",
    "LinearConfig",
    "LoRABlockConfig",
    "LoRAConfig",
    "NcFinetuneError",
    "SCLConfig",
    "TunedModel",
    "__version__",
    "cdnv",
    "class_separation_r2",
    "create_backbone",
    "fit_batches",
    "full_wrap",
    "get_tuned_model",
    "layer_wrap",
    "layerwise_nc1",
    "linear_cka",
    "linear_wrap",
    "list_blocks",
    "load_tuned",
    "nc1",
    "numerical_rank",
    "scl_wrap",
    "select_block",
]
