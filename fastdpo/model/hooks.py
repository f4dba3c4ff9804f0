"""``forward_as``: run fastdpo's own function as a module's forward, so wrappers' hooks on that module still fire.

fastdpo never runs a causal LM's forward (it would compute the logits) nor its LM head's (the same logits), but the
wrappers that make training distributed act in a module's forward: DDP arms its gradient all-reduce there, FSDP2
gathers and frees parameters in hooks around it, DeepSpeed ZeRO-3 gathers a module's parameters before its
forward and again before its backward. So the trainers call the wrapped model with ``forward_as(inner, step)``,
and the head runs as the LM head module's forward (``fastdpo.model.packed.run_head``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def forward_as(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Within the block, ``module``'s forward is ``forward`` (an attribute of this instance only, restored after).

    fastdpo never calls a causal LM's own forward (it would compute the logits), yet a DDP, FSDP or DeepSpeed
    wrapper must see a forward pass through itself: DDP arms its gradient all-reduce in ``forward``, and without
    that the processes' gradients silently diverge; FSDP gathers the root's parameters (the LM head among them)
    in its pre-forward hook. So the trainers call the wrapper, and the wrapper's call of the inner model lands
    here. The class is untouched. An instance-level forward already there (accelerate's mixed-precision wrapper,
    which runs the model's forward under autocast) is set aside and put back: the caller runs the block under
    ``accelerator.autocast()`` instead.
    """
    previous = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
