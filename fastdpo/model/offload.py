"""Memory that waits in host RAM: a training step's saved activations, and a reference model between its passes.

    with offload_activations(model):          # the body's forward: what autograd saves goes to host memory
        hidden = packed_body(model, batch).hidden
    loss.backward()                           # each saved tensor comes back to the GPU when its backward needs it

    resident = HostResident(ref_model)        # the reference's weights live in (pinned) host memory ...
    with resident.on(device):                 # ... and on the device only for its forward pass
        ref_logps = reference_logps(ref_model, batch)

``offload_activations`` is ``DPOConfig``/``SFTConfig``'s ``activation_offloading`` (TRL's name): saved-tensor hooks
copy every tensor autograd saves in the block to pinned host memory (the device copy is freed once the forward
drops it) and copy it back in the backward. Parameters (and views of them) stay: they are on the device anyway.
Tensors under ``min_bytes`` stay too: their copies cost more in latency than they free. The copies run on the
compute stream: simple and safe, but they do not overlap with compute (TRL overlaps them on side streams). Only the
model body is offloaded: the head's saved tensors are the first the backward needs, so moving them would only add
two copies. On a CPU there is nowhere to offload to and nothing is moved.

``HostResident`` is ``DPOConfig``'s ``ref_offload``: the reference's parameters and buffers are replaced by host
copies (pinned when CUDA is there, so the copies to the device are fast and asynchronous), and ``on(device)`` puts
device copies in their place for the duration of a block. The device then holds the reference only during its
pass, when the policy's activations, gradients of the step and the reference's own pass are not yet alive.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

DEVICE_TYPES = ("cuda", "xpu", "npu")  # devices whose saved tensors are worth moving to host memory
MIN_OFFLOAD_BYTES = 1 << 20


class _Offloaded:
    """A saved tensor's host copy and the device it returns to."""

    __slots__ = ("device", "host")

    def __init__(self, device: torch.device, host: Tensor) -> None:
        self.device, self.host = device, host


class ActivationOffload:
    """The pack/unpack hooks of ``offload_activations``, with counts of what they moved."""

    def __init__(self, model: nn.Module, *, min_bytes: int = MIN_OFFLOAD_BYTES, device_types=DEVICE_TYPES) -> None:
        self.min_bytes, self.device_types = min_bytes, tuple(device_types)
        self.pin = torch.cuda.is_available()
        self.kept_storages = {_storage(p) for p in (*model.parameters(), *model.buffers())}
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0

    def pack(self, tensor: Tensor):
        size = tensor.numel() * tensor.element_size()
        if (
            type(tensor) is not torch.Tensor  # nn.Parameter, DTensor and other subclasses stay as they are
            or tensor.device.type not in self.device_types
            or size < self.min_bytes
            or _storage(tensor) in self.kept_storages  # a view of a parameter
            or not _dense(tensor)  # a view with gaps (e.g. sdpa's padded mask): its strides must survive
        ):
            return tensor
        # the same strides on the host and back: kernels may require the layout they saved (alignment, order)
        host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu",
                                   pin_memory=self.pin)  # fmt: skip
        host.copy_(tensor, non_blocking=self.pin)  # ordered before any reuse of the tensor's memory (same stream)
        self.offloaded_tensors += 1
        self.offloaded_bytes += size
        return _Offloaded(tensor.device, host)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, _Offloaded):
            host = packed.host
            device = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=packed.device)
            return device.copy_(host, non_blocking=host.is_pinned())
        return packed


@contextmanager
def offload_activations(
    model: nn.Module, *, min_bytes: int = MIN_OFFLOAD_BYTES, device_types=DEVICE_TYPES
) -> Iterator[ActivationOffload]:
    """Within the block, tensors autograd saves (on a GPU, ``min_bytes`` or larger, not ``model``'s parameters) are
    kept in host memory until the backward needs them. ``device_types``: whose tensors move (tests add ``cpu``)."""
    hooks = ActivationOffload(model, min_bytes=min_bytes, device_types=device_types)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield hooks


def _dense(tensor: Tensor) -> bool:
    """Whether the tensor covers its memory exactly once, in some order of its dimensions (no gaps, no overlap)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.size(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _storage(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return None


class HostResident:
    """``module``'s parameters and buffers kept in host memory, on a device only inside ``on(device)``."""

    def __init__(self, module: nn.Module) -> None:
        pin = torch.cuda.is_available()
        # parameters() and buffers() give a tied weight once
        self.tensors = [*module.parameters(), *module.buffers()]
        for tensor in self.tensors:
            host = tensor.data.to("cpu")
            tensor.data = host.pin_memory() if pin else host

    @contextmanager
    def on(self, device: torch.device | str) -> Iterator[None]:
        """Within the block the module is on ``device``; afterwards its device copies are dropped (not copied back:
        nothing in a reference pass changes them)."""
        homes = [tensor.data for tensor in self.tensors]
        try:
            for tensor, home in zip(self.tensors, homes, strict=True):
                # a copy even where home already is (a CPU run): the block never works on the host copy itself
                tensor.data = home.to(device, non_blocking=home.is_pinned(), copy=True)
            yield
        finally:
            for tensor, home in zip(self.tensors, homes, strict=True):
                tensor.data = home
