"""The ``bn="frozen"`` policy held structurally: a frozen BatchNorm stays in eval mode whichever
module's ``train()`` the user calls (the wrapper's, the wrapped timm model's, a block's)."""

from __future__ import annotations

import types
import weakref
from typing import Any

from torch import nn

_HELD_BY = "_ncfinetune_bn_held_by"


def hold_batchnorms(tuned: Any) -> None:  # tuned: a TunedModel (no import: no cycle)
    """Make ``bn="frozen"`` hold whichever module's ``train()`` is called.

    ``model.train()`` reaches each submodule through its ``train`` attribute, so the frozen
    BatchNorms of a ``bn="frozen"`` wrapper get an instance ``train`` that keeps them in eval
    mode while that wrapper lives (a weak reference: a dropped wrapper releases them, and a
    new wrapper of the same model replaces the holds first). Their running statistics then
    never move, whether ``tuned.train()``, ``tuned.model.train()`` or a block's ``train()``
    was called.
    """
    for m in tuned.model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _release(m)
    if tuned.bn != "frozen":
        return
    held = weakref.ref(tuned)
    for m in tuned.frozen_batchnorms:
        m.__dict__[_HELD_BY] = held
        m.__dict__["train"] = types.MethodType(_held_train, m)
        m.eval()


def _held_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a BatchNorm held by a ``bn="frozen"`` wrapper: eval mode while the
    wrapper lives and lists it among its frozen BatchNorms; plain ``train()`` otherwise."""
    ref = self.__dict__.get(_HELD_BY)
    owner = ref() if ref is not None else None
    held = owner is not None and any(m is self for m in owner.frozen_batchnorms)
    if not held:
        _release(self)
    return type(self).train(self, mode and not held)


def _release(bn: nn.Module) -> None:
    """Drop a hold installed by :func:`hold_batchnorms` (nothing when there is none)."""
    bn.__dict__.pop("train", None)
    bn.__dict__.pop(_HELD_BY, None)
