"""Sharded parameters (FSDP): what the taps and the callback need to know about them.

Under ``torch.distributed.fsdp.fully_shard`` (FSDP2, what Lightning's ``ModelParallelStrategy``
applies in ``configure_model``) each layer's weight is a ``DTensor`` sharded across ranks; it is
gathered for the layer's forward and backward only. The taps never read weights: they see the
layer's input activations and output gradients, which are whole per rank (data parallelism), so
rows, Fisher sums (sum-reduced across ranks as under DDP) and scores are those of the unsharded
model (``tests/test_sharded.py``). Layer shapes come from the module's own sizes
(``in_features``/``out_features``, ``Conv1D``'s ``nx``/``nf``), never from a possibly flattened
weight (FSDP1 with ``use_orig_params=True`` holds 1-D shards outside forward).

What differs: a forward needs every rank, since each gathers the sharded weights with collectives.
Query gradients are therefore computed on every rank (the same queries everywhere) instead of
on rank 0 and broadcast.
"""

from __future__ import annotations

from torch import nn

__all__ = ["has_sharded_parameters"]


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP-sharded parameters (FSDP2 ``DTensor``s or an FSDP1 wrapper)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed tensors
        DTensor = ()  # type: ignore[assignment]
    if any(isinstance(p, DTensor) for p in module.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())
