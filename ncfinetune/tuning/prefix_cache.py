"""The frozen-prefix cache: compute the frozen part of a tuned model once per image, not per step.

With Layer FT, SCL FT or a linear probe, everything before the tuned block is frozen. When that
prefix is also a *pure function of the input* - no BatchNorm adapting its statistics
(``bn="frozen"``, or no BatchNorm at all as in a ViT), no dropout or drop-path in train mode -
and the images are not randomly augmented, its output for an image never changes. Training can
then run from the stored prefix outputs: every later step costs only the suffix (the tuned block
onwards), and the results equal the uncached path up to float rounding.

:func:`prefix_blocker` says why a model's prefix is *not* cacheable (or ``None``);
:class:`PrefixCache` stores prefix outputs lazily, row by row, under a memory bound. The caller
must know that its data is deterministic: the cache cannot see an augmenting ``fetch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ncfinetune.errors import ConfigError, DataError, NcFinetuneError

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Default bound on a cache's stored prefix outputs (2 GiB)."""

Fetch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


class CacheTooLarge(NcFinetuneError):
    """A prefix cache would exceed its memory bound; callers fall back to the uncached path."""


def _stochastic(module: nn.Module) -> bool:
    """True for layers that are random in train mode: dropout, drop-path, patch dropout."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    for attr in ("drop_prob", "prob"):  # timm DropPath, PatchDropout
        p = getattr(module, attr, None)
        if isinstance(p, (int, float)) and "drop" in type(module).__name__.lower():
            return p > 0
    return False


def prefix_blocker(tuned) -> str | None:
    """Why the frozen prefix of ``tuned`` is not a pure function of its input, or ``None``.

    Args:
        tuned: a :class:`ncfinetune.TunedModel`.

    Returns:
        ``None`` when the prefix output can be cached; otherwise one sentence saying why not
        and what would make it cacheable.
    """
    if tuned.prefix_stop is None:
        return f"{tuned.method} trains (or adapts) every block: there is no frozen prefix to cache."
    adapter = tuned.adapter
    if not tuned.splits_prefix:
        return (
            f"the {adapter.family} adapter runs {tuned.arch} whole (no stem/blocks split), so its "
            "prefix cannot run apart; the prefix cache is for the ResNet and ViT families."
        )
    tuned_blocks = adapter.blocks[prefix_stop(tuned) :]
    suffix = {id(m) for b in tuned_blocks for m in b.modules()}
    suffix |= {id(m) for c in adapter.classifier_modules() for m in c.modules()}
    prefix = [(n, m) for n, m in tuned.model.named_modules() if id(m) not in suffix]
    frozen_bn = {id(m) for m in tuned.frozen_batchnorms} if tuned.bn == "frozen" else set()
    for name, m in prefix:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen_bn:
            return (
                f"BatchNorm {name!r} in the frozen prefix adapts its statistics in train mode "
                "(bn='update'); wrap with bn='frozen' to make the prefix cacheable."
            )
        if _stochastic(m):
            return (
                f"{type(m).__name__} {name!r} in the frozen prefix is random in train mode; "
                "create the model with its drop rates at 0 to make the prefix cacheable."
            )
    return None


def prefix_stop(tuned) -> int:
    """Index of the first block after the frozen prefix (the block count for a linear probe)."""
    return tuned.prefix_stop


def check_prefix(tuned, cache: PrefixCache) -> None:
    """Raise unless ``cache`` holds the prefix ``tuned`` runs (same method kind and block)."""
    blocker = prefix_blocker(tuned)
    if blocker is not None:
        raise ConfigError(f"a prefix cache cannot serve this {tuned.method} model: {blocker}")
    if prefix_stop(tuned) != cache.stop:
        raise ConfigError(
            f"the prefix cache holds the input of block {cache.stop} but the model's frozen "
            f"prefix ends at block {prefix_stop(tuned)}; build a PrefixCache for this model."
        )


class PrefixCache:
    """Prefix outputs of a frozen, pure prefix for rows of an in-memory dataset, filled lazily.

    Rows are computed the first time they are asked for (in batches, without autograd) and kept;
    :meth:`fetch` then returns ``(prefix outputs, labels)`` for any rows, like the dataset's own
    fetch returns ``(images, labels)``. The stored outputs are bounded by ``max_bytes``: a fill
    that would pass it raises :class:`CacheTooLarge` (callers fall back to the uncached path).

    The prefix is that of ``tuned`` at construction: the cache is valid for every model with the
    same frozen weights and the same tuned block (for example, each run of a benchmark).
    """

    def __init__(
        self,
        tuned,
        fetch: Fetch,
        *,
        batch_size: int = 256,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        blocker = prefix_blocker(tuned)
        if blocker is not None:
            raise ConfigError(f"cannot cache the prefix of {tuned.arch}: {blocker}")
        if batch_size < 1 or max_bytes < 1:
            raise ConfigError(
                f"batch_size and max_bytes must be >= 1, got {batch_size} and {max_bytes}."
            )
        self.tuned = tuned
        self.source = fetch
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.stop = prefix_stop(tuned)
        self._slot: dict[int, int] = {}
        self._store: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self.computed = 0  # images run through the prefix so far

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored prefix outputs (allocated capacity)."""
        s = self._store
        return 0 if s is None else s.numel() * s.element_size()

    def _grow(self, need: int, like: torch.Tensor) -> None:
        per_row = like[0].numel() * like.element_size()
        if need * per_row > self.max_bytes:
            raise CacheTooLarge(
                f"caching {need:,} prefix outputs of {tuple(like.shape[1:])} "
                f"({need * per_row / 2**20:,.0f} MiB) would pass max_bytes "
                f"({self.max_bytes / 2**20:,.0f} MiB); raise max_bytes or cache fewer rows."
            )
        have = 0 if self._store is None else self._store.shape[0]
        if need <= have:
            return
        cap = min(max(need, 2 * have), self.max_bytes // per_row)
        store = like.new_empty((cap, *like.shape[1:]))
        labels = torch.empty(cap, dtype=torch.long)
        if self._store is not None:
            store[: len(self)] = self._store[: len(self)]
            labels[: len(self)] = self._labels[: len(self)]
        self._store, self._labels = store, labels

    def missing(self, rows: Sequence[int] | np.ndarray) -> list[int]:
        """The distinct ``rows`` not cached yet, in first-seen order."""
        return [int(r) for r in dict.fromkeys(np.asarray(rows).tolist()) if r not in self._slot]

    def _insert(self, rows: list[int], h: torch.Tensor, y: torch.Tensor) -> None:
        start = len(self)
        self._grow(start + len(rows), h)
        self._store[start : start + len(rows)] = h
        self._labels[start : start + len(rows)] = y
        self._slot.update((r, start + i) for i, r in enumerate(rows))
        self.computed += len(rows)

    def fill(self, rows: Sequence[int] | np.ndarray) -> None:
        """Compute and store the prefix outputs of the ``rows`` not yet cached."""
        missing = self.missing(rows)
        for s in range(0, len(missing), self.batch_size):
            chunk = missing[s : s + self.batch_size]
            x, y = self.source(chunk)
            device = next(self.tuned.parameters()).device  # run where the model is, keep on CPU
            self._insert(chunk, self.tuned.forward_prefix(x.to(device)).cpu(), y.cpu())

    def fetch(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix outputs, labels)`` of ``rows``, computing any not cached yet."""
        rows = np.asarray(rows).tolist()
        if any(r not in self._slot for r in rows):
            self.fill(rows)
        index = torch.as_tensor([self._slot[r] for r in rows], dtype=torch.long)
        return self._store.index_select(0, index), self._labels.index_select(0, index)


@torch.no_grad()
def fill_shared(caches: Sequence[PrefixCache], rows: Sequence[int] | np.ndarray) -> int:
    """Fill several caches of the same frozen model (different blocks) in one forward pass.

    The input of block k is computed on the way to block k' > k, so each image runs through
    the stem and the blocks once, up to the deepest cache's block. The caches must come from
    copies of one pretrained model (the caller's promise: their frozen weights are equal) and
    share one data source.

    Returns:
        The number of images run through the prefix.
    """
    caches = sorted(caches, key=lambda c: c.stop)
    if not caches:
        return 0
    first = caches[0]
    missing = sorted(set().union(*(c.missing(rows) for c in caches)))
    adapter = caches[-1].tuned.adapter
    for s in range(0, len(missing), first.batch_size):
        chunk = missing[s : s + first.batch_size]
        x, y = first.source(chunk)
        h, at = adapter.stem(x), 0
        for c in caches:
            h, at = adapter.forward_blocks(h, at, c.stop), c.stop
            need = [i for i, r in enumerate(chunk) if r not in c._slot]
            if need:
                index = torch.as_tensor(need, dtype=torch.long)
                c._insert([chunk[i] for i in need], h.index_select(0, index), y[index])
    return len(missing)


class _PrefixDataset(torch.utils.data.Dataset):
    """Positions of a loader's dataset -> (prefix outputs, labels), through a PrefixCache."""

    def __init__(self, cache: PrefixCache, size: int) -> None:
        self.cache, self.size = cache, size

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.fetch(positions)


def prefix_loader(loader, tuned, *, max_bytes: int = DEFAULT_MAX_BYTES, share_with=None):
    """The same batches as ``loader``, as prefix outputs of ``tuned`` computed once per sample.

    ``loader`` must come from :func:`ncfinetune.data.loaders.build_loader` with a pre-decoded,
    non-augmenting transform (its dataset is a ``TensorCache``). The new loader shares the
    batch sampler and the collate function, so it draws the same positions in the same order
    (accelerate's seedable sampler: prepared, it is sharded per process and ``set_epoch``
    reaches it); each sample's prefix is computed the first time it is drawn and kept (in the
    main process: ``num_workers`` is 0). Set
    ``tuned.prefix_inputs = True`` while feeding the model from it. ``share_with``: another
    prefix loader over the same rows in the same positions (e.g. the training subset without
    shuffling) whose cache this one reuses.

    Raises:
        ConfigError: the prefix of ``tuned`` is not a pure function of the input (the reason
            from :func:`prefix_blocker`).
        DataError: the loader's data is not pre-decoded and deterministic.
        CacheTooLarge: caching every sample would pass ``max_bytes``.
    """
    from torch.utils.data import DataLoader

    from ncfinetune.data.loaders import TensorCache

    dataset = loader.dataset
    if not isinstance(dataset, TensorCache):
        raise DataError(
            "the prefix cache needs pre-decoded, non-augmenting data (a TensorCache from "
            f"build_loader with build_transforms(augment=False)); got {type(dataset).__name__}."
        )
    if share_with is not None:
        cache = share_with.dataset.cache
    else:
        cache = PrefixCache(tuned, dataset.__getitems__, max_bytes=max_bytes)
        cache.fill([0])  # one sample gives the per-sample size (and stays cached)
        h = cache._store[0]
        need = len(dataset) * h.numel() * h.element_size()
        if need > max_bytes:
            raise CacheTooLarge(
                f"caching the prefix outputs of {len(dataset):,} samples ({tuple(h.shape)} "
                f"each, {need / 2**20:,.0f} MiB) would pass max_bytes "
                f"({max_bytes / 2**20:,.0f} MiB)."
            )
    return DataLoader(
        _PrefixDataset(cache, len(dataset)),
        batch_sampler=loader.batch_sampler,
        collate_fn=loader.collate_fn,  # batches pass through as the loader's own do
        num_workers=0,
    )
