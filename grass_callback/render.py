"""How a training or query example appears in a W&B table cell, and the label it carries.

* :func:`render_example`: an image-like sample becomes a ``wandb.Image`` (channel-first or
  channel-last tensors, ``[H, W]``, flat vectors of a square length such as digits' 64 = 8 x 8,
  PIL images, numpy arrays), token ids become decoded text when a tokenizer is known (padding and
  masked positions stripped), anything else a short ``repr``.
* :func:`example_label`: the ``label`` / ``target`` a sample carries (``(x, y, index)`` -> ``y``;
  a dict's ``label`` / ``labels`` / ``target`` / ``targets``), for the tables' label columns.
* :func:`make_renderer` / :func:`resolve_renderers`: a one-argument renderer, or one per dataset
  (``{"train": fn, "query": fn}``).

``wandb`` and PIL are imported only when an image is made.

Example::

    render = make_renderer(tokenizer, image_shape=(8, 8), image_scale=12)
    cell = render(train_set[3])        # wandb.Image of the 8x8 digit, 96x96 pixels
    example_label(train_set[3])        # 7
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from grass_callback.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["PREFERRED_KEYS", "LABEL_KEYS", "render_example", "make_renderer", "resolve_renderers",
           "example_label", "image_array"]

#: Fields tried, in this order, when a dict sample is rendered.
PREFERRED_KEYS = ("input_ids", "pixel_values", "image", "img", "x", "input", "inputs", "text")
#: Fields holding a sample's label, in this order.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
#: Flat vectors of at least this many elements and a square length are shown as images.
MIN_FLAT_IMAGE = 16

Renderer = Callable[[Any], Any]


def _truncate(text: str, max_chars: int) -> str:
    if max_chars > 0 and len(text) > max_chars:
        return text[: max(0, max_chars - 1)] + "\u2026"
    return text


def _as_numpy(x: Any) -> np.ndarray | None:
    """A CPU numpy view of a tensor / array, or None for anything else."""
    import numpy as np

    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, np.ndarray):
        return x
    return None


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and n >= MIN_FLAT_IMAGE else None


def image_array(arr: np.ndarray, shape: tuple[int, ...] | None = None, scale: int = 1) -> np.ndarray | None:
    """``arr`` as an ``[H, W]`` or ``[H, W, 3]`` uint8 array if it looks like an image, else None.

    Image-like: float or uint8 data shaped ``[H, W]``, ``[1|3, H, W]``, ``[H, W, 1|3]`` (channels
    first wins when ambiguous) with ``H, W >= 2``, or a flat vector whose length is a square
    ``>= 16`` (``[64]`` -> ``[8, 8]``). ``shape`` reshapes first (e.g. ``(8, 8)`` or ``(3, 32,
    32)``). Floats in ``[0, 1]`` are kept, other floats min-max scaled; NaN/Inf show as 0. Each
    pixel becomes a ``scale x scale`` block (nearest neighbour), so small images stay sharp.
    """
    import numpy as np

    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.uint8):
        return None
    if shape is not None:
        if int(np.prod(shape)) != arr.size:
            return None
        arr = arr.reshape(shape)
    elif arr.ndim == 1:
        side = _square_side(arr.shape[0])
        if side is None:
            return None
        arr = arr.reshape(side, side)
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3):
            arr = np.moveaxis(arr, 0, -1)
        elif arr.shape[-1] not in (1, 3):
            return None
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.shape[0] < 2 or arr.shape[1] < 2:
        return None
    if arr.dtype != np.uint8:
        x = np.where(np.isfinite(arr), arr.astype(np.float64), 0.0)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        arr = np.round(x * 255.0).astype(np.uint8)
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.ascontiguousarray(arr)


def _is_int_sequence(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.ndim == 1 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
    arr = _as_numpy(x)
    if arr is not None:
        import numpy as np

        return arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer)
    return False


def _ids(x: Any) -> list[int]:
    arr = _as_numpy(x)
    return [int(v) for v in (arr.reshape(-1).tolist() if arr is not None else x)]


def _strip_padding(ids: list[int], tokenizer: Any, mask: Any = None) -> list[int]:
    """``ids`` without the positions ``mask`` zeroes, and without trailing/leading pad tokens."""
    if mask is not None:
        keep = _ids(mask)
        if len(keep) == len(ids):
            ids = [i for i, m in zip(ids, keep) if m]
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        while ids and ids[-1] == pad:
            ids = ids[:-1]
        while ids and ids[0] == pad:
            ids = ids[1:]
    return ids


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return str(tokenizer.decode(ids, skip_special_tokens=True))
    except TypeError:  # a tokenizer whose decode takes no keyword arguments
        return str(tokenizer.decode(ids))


def _wandb_image(arr: np.ndarray) -> Any:
    import wandb

    return wandb.Image(arr)


def render_example(example: Any, tokenizer: Any = None, max_chars: int = 200, *,
                   image_shape: tuple[int, ...] | None = None, image_scale: int = 1) -> Any:
    """How ``example`` appears in a W&B table cell.

    Rules, first match wins:

    1. ``None`` stays ``None``; a ``wandb`` media object stays; a PIL image becomes a
       ``wandb.Image`` (enlarged ``image_scale`` times).
    2. An image-like float / uint8 tensor or numpy array (see :func:`image_array`; ``image_shape``
       reshapes first) becomes a ``wandb.Image``.
    3. A 1-D integer tensor / array or a list of ints, with a ``tokenizer`` (anything with
       ``.decode``), becomes the decoded text without padding, truncated to ``max_chars``.
    4. A ``str`` is returned truncated to ``max_chars``.
    5. A dict sample renders one field: ``input_ids`` (positions its ``attention_mask`` zeroes
       dropped), else the first of :data:`PREFERRED_KEYS` present, else its first tensor / array.
       A tuple / list sample (e.g. ``(x, y, index)``) renders its first element.
    6. Anything else: ``repr(example)`` truncated to ``max_chars``.
    """
    opts = {"image_shape": image_shape, "image_scale": image_scale}
    if example is None:
        return None
    module = type(example).__module__ or ""
    if module.startswith("wandb"):
        return example
    if module.startswith("PIL."):
        import numpy as np

        return _wandb_image(image_array(np.asarray(example.convert("RGB")), scale=image_scale))
    arr = _as_numpy(example)
    if arr is not None:
        img = image_array(arr, image_shape, image_scale)
        if img is not None:
            return _wandb_image(img)
    if tokenizer is not None and hasattr(tokenizer, "decode") and _is_int_sequence(example):
        return _truncate(_decode(tokenizer, _strip_padding(_ids(example), tokenizer)), max_chars)
    if isinstance(example, str):
        return _truncate(example, max_chars)
    if isinstance(example, Mapping) and example:
        if "input_ids" in example and tokenizer is not None and hasattr(tokenizer, "decode"):
            ids = _strip_padding(_ids(example["input_ids"]), tokenizer, example.get("attention_mask"))
            return _truncate(_decode(tokenizer, ids), max_chars)
        for key in PREFERRED_KEYS:
            if key in example:
                return render_example(example[key], tokenizer, max_chars, **opts)
        for value in example.values():
            if _as_numpy(value) is not None:
                return render_example(value, tokenizer, max_chars, **opts)
    if isinstance(example, (tuple, list)) and example and not _is_int_sequence(example):
        return render_example(example[0], tokenizer, max_chars, **opts)
    return _truncate(repr(example), max_chars)


def _scalar(value: Any) -> Any:
    """``value`` as a plain int / float / str if it is one value, else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    arr = _as_numpy(value)
    if arr is not None and arr.size == 1:
        v = arr.reshape(-1)[0].item()
        return int(v) if isinstance(v, bool) else v
    return None


def example_label(example: Any) -> Any:
    """The label a sample carries, as a plain value, or None.

    ``(x, y, ...)`` tuples / lists give ``y`` (a one-element tensor, an int, a float or a str); a
    dict gives the first of :data:`LABEL_KEYS` holding one value. Per-token labels (a sequence,
    as language models carry) are not one value and give None.
    """
    if isinstance(example, Mapping):
        for key in LABEL_KEYS:
            if key in example:
                return _scalar(example[key])
        return None
    if isinstance(example, (tuple, list)) and len(example) >= 2 and not _is_int_sequence(example):
        return _scalar(example[1])
    return None


def make_renderer(tokenizer: Any = None, custom: Renderer | None = None, *, max_chars: int = 200,
                  image_shape: tuple[int, ...] | None = None, image_scale: int = 1) -> Renderer:
    """A one-argument renderer: ``custom`` if given (it wins), else :func:`render_example` with
    ``tokenizer``, ``image_shape`` and ``image_scale``."""
    if custom is not None:
        return custom

    def render(example: Any) -> Any:
        return render_example(example, tokenizer=tokenizer, max_chars=max_chars, image_shape=image_shape,
                              image_scale=image_scale)

    return render


def resolve_renderers(renderer: Renderer | Mapping[str, Renderer] | None, tokenizer: Any = None
                      ) -> tuple[Renderer, Renderer]:
    """``(train_renderer, query_renderer)`` from one renderer, a ``{"train": fn, "query": fn}``
    mapping (a missing key falls back to the default renderer), or None (the default for both).

    Raises:
        ConfigError: a mapping with keys other than ``train`` and ``query``, or a value that is
            not callable.
    """
    default = make_renderer(tokenizer)
    if renderer is None:
        return default, default
    if isinstance(renderer, Mapping):
        unknown = sorted(set(renderer) - {"train", "query"})
        if unknown:
            raise ConfigError(f"renderer mapping keys must be 'train' and/or 'query', got {unknown}.")
        pair = (renderer.get("train") or default, renderer.get("query") or default)
    else:
        pair = (renderer, renderer)
    for fn in pair:
        if not callable(fn):
            raise ConfigError(f"a renderer must be callable (example -> table cell), got {type(fn).__name__}.")
    return pair
