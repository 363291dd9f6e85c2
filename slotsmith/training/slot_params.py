"""The slot's trained tensors: fp32 masters kept outside the model's module tree.

The slot's tensors are taken *out* of the model's parameter registry and kept
as fp32 master copies (``SlotParams``) on the training device. A forward
pre-hook on each owning module hands the module its tensor cast to the
compute dtype, so gradients flow to the masters while every hook that moves
or casts *registered* parameters (diffusers group offloading, layerwise fp8
casting) leaves them alone. Hence ``--offload-blocks`` and ``--fp8-base``
never touch trained tensors, their gradients or optimizer state.

A row-range entry (selection v3) trains only its rows: its master holds just
those rows, and the whole tensor stays registered in the model, frozen,
wherever offloading and fp8 put it. The owning module's forward sees the
frozen rows outside the range and the master's inside: a ``Linear`` weight
computes the range's output features from the master and splices them into
the frozen output (no weight-sized copy, so memory stays in proportion to
the slot); any other tensor (biases, norms, the patch embedding: small) is
re-assembled for the call. The frozen tensor itself is never written, so
outside the slot's rows the model stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from slotsmith.names import native_to_diffusers


class SlotParams(nn.Module):
    """The trained tensors, detached from the model they feed.

    Attributes:
        names: Canonical native names, in selection order.
        masters: ``names[i]`` -> fp32 ``nn.Parameter`` (keys use ``/`` for ``.``);
            for a row-range entry, only its rows.
        compute_dtype: The dtype each tensor is cast to for the forward pass.
        rows: Canonical name -> ``(start, stop)`` for row-range entries.
    """

    def __init__(
        self, names: list[str], masters: dict[str, nn.Parameter], compute_dtype: torch.dtype,
        rows: Mapping[str, tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.names = list(names)
        self.masters = nn.ParameterDict({n.replace(".", "/"): p for n, p in masters.items()})
        self.compute_dtype = compute_dtype
        self.rows = dict(rows or {})

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.masters[name.replace(".", "/")]

    def parameters_in_order(self) -> list[nn.Parameter]:
        return [self[n] for n in self.names]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.masters.values())


def attach_slot(
    model: nn.Module, names: list[str], device: torch.device, compute_dtype: torch.dtype,
    rows: Mapping[str, tuple[int, int]] | None = None,
) -> SlotParams:
    """Move the named tensors (or rows of them) out of ``model`` into fp32 trainable masters.

    Call it before enabling fp8 casting or offloading: their hooks then wrap
    the row-range forwards installed here and place the frozen tensors
    before those forwards read them.

    Args:
        model: A ``WanTransformer3DModel`` (its other parameters stay frozen).
        names: Canonical native names of the slot's tensors.
        device: Where the masters, their gradients and optimizer state live.
        compute_dtype: The dtype the model computes in.
        rows: Canonical name -> ``(start, stop)``: train only those rows of
            the first dimension (the rest of the tensor stays frozen in place).

    Returns:
        The slot's parameters; ``model`` reads them through forward pre-hooks
        (whole tensors) or wrapped forwards (row ranges).
    """
    rows = dict(rows or {})
    masters: dict[str, nn.Parameter] = {}
    owners: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
    row_owners: dict[nn.Module, dict[str, tuple[tuple[int, int], nn.Parameter]]] = {}
    for name in names:
        module_path, _, attr = native_to_diffusers(name).rpartition(".")
        module = model.get_submodule(module_path)
        if name in rows:
            start, stop = rows[name]
            frozen = module._parameters[attr]
            master = nn.Parameter(frozen.detach()[start:stop].to(device=device, dtype=torch.float32).clone())
            masters[name] = master
            row_owners.setdefault(module, {})[attr] = ((start, stop), master)
            continue
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
    for module, parts in row_owners.items():
        module.forward = _row_forward(module, parts)
    return SlotParams(names, masters, compute_dtype, rows)


def _with_rows(frozen: torch.Tensor, span: tuple[int, int], master: nn.Parameter) -> torch.Tensor:
    """``frozen`` with rows ``span`` taken from ``master`` (a new tensor; ``frozen`` is not written)."""
    start, stop = span
    inside = master.to(device=frozen.device, dtype=frozen.dtype)
    return torch.cat([frozen.detach()[:start], inside, frozen.detach()[stop:]])


def _row_forward(module: nn.Module, parts: dict[str, tuple[tuple[int, int], nn.Parameter]]):
    """The forward of a module some of whose tensors are trained by row range.

    It is set as the instance's ``forward``, so the hooks that fp8 casting and
    offloading add later wrap it and have placed the frozen tensors (on the
    device, in the compute dtype) by the time it runs.
    """
    original = type(module).forward
    linear_weight = parts.get("weight") if isinstance(module, nn.Linear) else None
    assembled = {attr: part for attr, part in parts.items() if not (linear_weight and attr == "weight")}

    def forward(*args, **kwargs):
        # Plain attributes shadow the registered tensors for this call only.
        for attr, (span, master) in assembled.items():
            module.__dict__[attr] = _with_rows(module._parameters[attr], span, master)
        try:
            if linear_weight is None:
                return original(module, *args, **kwargs)
            x = args[0] if args else kwargs["input"]
            (start, stop), master = linear_weight
            weight, bias = module._parameters["weight"], module.bias
            out = F.linear(x, weight.detach(), bias)
            inside = F.linear(x, master.to(device=weight.device, dtype=weight.dtype),
                              None if bias is None else bias[start:stop])
            # Output features are the weight's rows: splice the range's outputs into the frozen ones.
            return torch.cat([out[..., :start], inside, out[..., stop:]], dim=-1)
        finally:
            for attr in assembled:
                module.__dict__.pop(attr, None)

    return forward
