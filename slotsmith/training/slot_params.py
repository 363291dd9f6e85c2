"""The slot's trained tensors: fp32 masters kept outside the model's module tree.

The slot's tensors are taken *out* of the model's parameter registry and kept
as fp32 master copies (``SlotParams``) on the training device. A forward
pre-hook on each owning module hands the module its tensor cast to the
compute dtype, so gradients flow to the masters while every hook that moves
or casts *registered* parameters (diffusers group offloading, layerwise fp8
casting) leaves them alone. Hence ``--offload-blocks`` and ``--fp8-base``
never touch trained tensors, their gradients or optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn

from slotsmith.names import native_to_diffusers


class SlotParams(nn.Module):
    """The trained tensors, detached from the model they feed.

    Attributes:
        names: Canonical native names, in selection order.
        masters: ``names[i]`` -> fp32 ``nn.Parameter`` (keys use ``/`` for ``.``).
        compute_dtype: The dtype each tensor is cast to for the forward pass.
    """

    def __init__(self, names: list[str], masters: dict[str, nn.Parameter], compute_dtype: torch.dtype):
        super().__init__()
        self.names = list(names)
        self.masters = nn.ParameterDict({n.replace(".", "/"): p for n, p in masters.items()})
        self.compute_dtype = compute_dtype

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.masters[name.replace(".", "/")]

    def parameters_in_order(self) -> list[nn.Parameter]:
        return [self[n] for n in self.names]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.masters.values())


def attach_slot(model: nn.Module, names: list[str], device: torch.device, compute_dtype: torch.dtype) -> SlotParams:
    """Move the named tensors out of ``model`` into fp32 trainable masters.

    Args:
        model: A ``WanTransformer3DModel`` (its other parameters stay frozen).
        names: Canonical native names of the slot's tensors.
        device: Where the masters, their gradients and optimizer state live.
        compute_dtype: The dtype the model computes in.

    Returns:
        The slot's parameters; ``model`` reads them through forward pre-hooks.
    """
    masters: dict[str, nn.Parameter] = {}
    owners: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
    for name in names:
        module_path, _, attr = native_to_diffusers(name).rpartition(".")
        module = model.get_submodule(module_path)
        frozen = module._parameters.pop(attr)
        master = nn.Parameter(frozen.detach().to(device=device, dtype=torch.float32).clone())
        masters[name] = master
        owners.setdefault(module, []).append((attr, master))
        # Plain attribute, not a registered parameter: module.to() and the
        # diffusers hooks never see it.
        module.__dict__[attr] = master.detach().to(compute_dtype)
        del frozen

    def feed(module: nn.Module, _args) -> None:
        for attr, master in owners[module]:
            module.__dict__[attr] = master.to(compute_dtype)

    for module in owners:
        module.register_forward_pre_hook(feed)
        if next(module.parameters(), None) is None:
            # diffusers reads a module's dtype off its first parameter (e.g. the
            # time embedder's); keep one, empty and frozen, when the slot took all.
            module.register_parameter("slot_dtype", nn.Parameter(torch.empty(0, dtype=compute_dtype), False))
    return SlotParams(names, masters, compute_dtype)
