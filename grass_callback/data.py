"""Sample identity: which dataset rows a batch holds.

Attribution needs every training example's dataset index next to its gradient. Wrap a dataset
with :class:`IndexedDataset` (dict samples get an ``"index"`` key; tuple samples get the index
appended as their last element, so ``x, y, index = batch``), or name the field that already
holds it with ``index_key``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from grass_callback.errors import CaptureError

__all__ = ["IndexedDataset", "get_batch_indices", "optional_batch_indices", "batch_index_field", "check_batch_indices", "resolve_index_key",
           "move_to_device"]

_HOW_TO_FIX = (
    "wrap the training dataset with grass_callback.IndexedDataset(dataset) (dict samples get an "
    "'index' key, tuple samples get the index as their last element), or pass index_key= naming "
    "the batch field (dict key or tuple position) that holds each example's dataset index.")


class IndexedDataset(Dataset):
    """A dataset whose samples carry their own index.

    Args:
        dataset: any map-style dataset.
        key: the dict key used for mapping samples.

    Example::

        train = IndexedDataset(TensorDataset(x, y))   # samples (x_i, y_i, i)
        x, y, index = next(iter(DataLoader(train, batch_size=4)))
    """

    def __init__(self, dataset: Dataset, key: str = "index") -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        sample = self.dataset[i]
        if isinstance(sample, Mapping):
            return {**sample, self.key: i}
        if isinstance(sample, tuple):
            return (*sample, i)
        return (sample, i)


def resolve_index_key(loader: Any, index_key: str | int | None) -> str | int | None:
    """The index field of a loader's batches: given, or known from an :class:`IndexedDataset`."""
    if index_key is not None:
        return index_key
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IndexedDataset):
        return _IndexedKey(_tuple_length(dataset))
    return None


class _IndexedKey(str):
    """Marker for batches from an :class:`IndexedDataset` (dict key or last element).

    ``length`` is the length of its tuple samples (index included) when known: a tuple batch of
    another length went through a ``collate_fn`` that may have dropped the index, so its last
    element might be the labels.
    """

    def __new__(cls, length: int | None = None) -> "_IndexedKey":
        obj = super().__new__(cls, "__grass_indexed__")
        obj.length = length
        obj.warned = False
        return obj

    def __getnewargs__(self) -> tuple:  # type: ignore[override]
        return (self.length,)


_INDEXED = _IndexedKey()  # compares equal to every _IndexedKey


def _tuple_length(dataset: IndexedDataset) -> int | None:
    """The length of the dataset's tuple samples (one sample is read), else ``None``."""
    try:
        sample = dataset[0] if len(dataset) > 0 else None
    except Exception:  # a dataset that cannot be read here: no check
        return None
    return len(sample) if isinstance(sample, tuple) else None


def get_batch_indices(batch: Any, index_key: str | int | None = None, batch_size: int | None = None,
                      num_examples: int | None = None) -> Tensor:
    """The int64 ``[B]`` dataset indices a batch carries, on the host and checked.

    ``index_key=None`` looks for an ``"index"`` key in dict batches; tuple batches need an explicit
    position (or batches from an :class:`IndexedDataset`, see :func:`resolve_index_key`), since a
    trailing label vector would look the same. For indices on a GPU this reads them back (a host
    sync); the callback uses :func:`batch_index_field` and :class:`~grass_callback._batch_ids.BatchIds`
    instead, which bring them over without one, and checks them with :func:`check_batch_indices`.

    Raises:
        CaptureError: no indices, indices of the wrong kind or length, half a batch or more of
            repeated indices (a repeat or two is a sampler with replacement), or an index outside
            ``[0, num_examples)``.
    """
    value, hint = batch_index_field(batch, index_key)
    ids = value.detach().to("cpu", torch.int64)
    check_batch_indices(ids, index_key, batch_size=batch_size, num_examples=num_examples, hint=hint)
    return ids


def optional_batch_indices(batch: Any, index_key: str | int | None = None) -> Tensor | None:
    """The batch's host dataset indices (:func:`get_batch_indices`), or ``None`` when it carries
    none: query and evaluation batches may not, and are then numbered by their position."""
    try:
        return get_batch_indices(batch, index_key)
    except CaptureError:
        return None


def batch_index_field(batch: Any, index_key: str | int | None = None) -> tuple[Tensor, str]:
    """The batch's index tensor where it lives (no value is read: no host sync) and a hint for
    error messages (non-empty when a ``collate_fn`` may have dropped an :class:`IndexedDataset`'s
    index). Checks only what the tensor's metadata tells: present, one-dimensional, integer.

    Raises:
        CaptureError: no index field, or one that is not an integer vector.
    """
    hint = ""
    if isinstance(batch, Mapping):
        key = "index" if index_key in (None, _INDEXED) else index_key
        value = batch.get(key)
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) > 0:
        position = -1 if index_key == _INDEXED else index_key
        expected = getattr(index_key, "length", None)
        if expected is not None and len(batch) != expected:
            hint = (f" Note: the IndexedDataset's samples have {expected} elements (the index last) but "
                    f"this batch has {len(batch)}: a collate_fn probably dropped the index, so its last "
                    f"element (e.g. the labels) was read as the index. Keep the index last in the batch, "
                    f"or pass index_key=<its position>.")
        if position is None:
            value = None
        elif not isinstance(position, int):
            raise CaptureError(f"index_key={index_key!r} names a dict key but the batch is a "
                               f"{type(batch).__name__}; use an integer position.")
        else:
            value = batch[position]
    else:
        value = None
    ok = isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point() \
        and not value.is_complex() and value.dtype != torch.bool
    if not ok:
        if value is None and index_key is None:
            where = "no index field was named"
        elif isinstance(index_key, _IndexedKey):
            where = ("the batch of an IndexedDataset has no 'index' key" if isinstance(batch, Mapping)
                     else "the last element of the batch is not an integer vector")
        else:
            where = f"index_key={index_key!r}"
        raise CaptureError(f"this training batch carries no dataset indices ({where}); " + _HOW_TO_FIX + hint)
    return value, hint


def check_batch_indices(ids: Tensor, index_key: str | int | None = None, *, batch_size: int | None = None,
                        num_examples: int | None = None, hint: str = "") -> None:
    """Check a batch's host indices (int64 ``[B]``): the count, repeats, the range; warn once
    about a ``hint`` from :func:`batch_index_field`.

    Raises:
        CaptureError: see :func:`get_batch_indices`.
    """
    if batch_size is not None and ids.numel() != batch_size:
        raise CaptureError(f"the batch holds {batch_size} examples but {ids.numel()} indices; " + _HOW_TO_FIX + hint)
    distinct = ids.unique().numel()
    if distinct != ids.numel() and 2 * distinct <= ids.numel():
        # a sampler with replacement may draw an example twice in a batch (each draw is its own row);
        # half the batch or more repeated is a field that is not an index (labels?)
        raise CaptureError(f"duplicate dataset indices in one batch ({ids.tolist()[:16]}): only {distinct} distinct "
                           f"of {ids.numel()}, so the index field does not look like a dataset index; check the "
                           "sampler and the index field." + hint)
    if ids.numel() and (int(ids.min()) < 0 or (num_examples is not None and int(ids.max()) >= num_examples)):
        raise CaptureError(f"dataset indices must lie in [0, {num_examples}), got "
                           f"min {int(ids.min())}, max {int(ids.max())}; the index field is not the dataset "
                           "index (or the loader is not over the training dataset)." + hint)
    if hint and not index_key.warned:  # type: ignore[union-attr]
        index_key.warned = True  # type: ignore[union-attr]
        warnings.warn("grass_callback:" + hint, stacklevel=3)


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors of a nested batch moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
