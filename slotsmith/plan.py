"""What a selection means for the user: coverage, per-block share, warnings.

Pure functions from an inventory and selections to a report (text or JSON),
so ``slotsmith plan`` stays a thin command.
"""

from __future__ import annotations

from dataclasses import dataclass

from slotsmith.errors import SlotsmithError, printable
from slotsmith.inventory import Inventory
from slotsmith.layout import config_from_shapes
from slotsmith.names import block_of
from slotsmith.select import Selection, shared_tensors

HIGH = 2.0
"""A block whose share exceeds HIGH x the slot's overall fraction is marked HIGH."""
LOW = 0.5
"""A block whose share is under LOW x the slot's overall fraction is marked LOW."""
OVERSHOOT_WARN = 1.10
"""Warn when the slot exceeds its budget by more than this factor."""


@dataclass(frozen=True)
class BlockShare:
    """One block's part of a slot.

    Attributes:
        block: Block number.
        params: Parameters in the whole block.
        selected_params: Parameters of the block in the slot.
        tensors: Local names of the block's tensors in the slot.
        mark: ``"HIGH"``, ``"LOW"`` or ``""``.
    """

    block: int
    params: int
    selected_params: int
    tensors: tuple[str, ...]
    mark: str

    @property
    def share(self) -> float:
        return self.selected_params / self.params if self.params else 0.0


def taken_params(inventory: Inventory, selection: Selection, name: str) -> int:
    """Parameters of tensor ``name`` in the slot: all of it, or its rows (v3)."""
    spec = inventory.tensors[name]
    rows = selection.rows.get(name)
    return spec.numel if rows is None else (rows[1] - rows[0]) * (spec.numel // spec.shape[0])


def _label(name: str, selection: Selection, local: bool = False) -> str:
    """A tensor's name (local to its block with ``local``), with its rows ``[a:b]`` for a v3 entry."""
    shown = name.split(".", 2)[2] if local else name
    rows = selection.rows.get(name)
    return shown if rows is None else f"{shown}[{rows[0]}:{rows[1]}]"


def _fraction(selection: Selection) -> float:
    """The slot's share of what its algorithm selects from (v3: the sliceable parameters)."""
    whole = selection.sliceable_params if selection.rows else selection.total_params
    return selection.selected_params / whole


def block_shares(inventory: Inventory, selection: Selection) -> list[BlockShare]:
    """Per-block share of a selection, for every block of the model (row ranges counted by their rows)."""
    numels = inventory.numels()
    fraction = _fraction(selection)
    params: dict[int, int] = {}
    for name, n in numels.items():
        block = block_of(name)
        if block is not None:
            params[block] = params.get(block, 0) + n
    taken: dict[int, list[str]] = {b: [] for b in params}
    for name in selection.tensors:
        block = block_of(name)
        if block is not None:
            taken[block].append(name)
    shares = []
    for block in sorted(params):
        selected = sum(taken_params(inventory, selection, n) for n in taken[block])
        share = selected / params[block]
        mark = "HIGH" if share > HIGH * fraction else "LOW" if share < LOW * fraction else ""
        local = tuple(_label(n, selection, local=True) for n in taken[block])
        shares.append(BlockShare(block, params[block], selected, local, mark))
    return shares


def warnings_for(inventory: Inventory, selection: Selection, shares: list[BlockShare]) -> list[str]:
    """The v2 weaknesses this selection shows, as sentences (spec: report, never hide)."""
    out = []
    try:
        config_from_shapes({n: t.shape for n, t in inventory.tensors.items()})
    except SlotsmithError as e:
        # v2 runs on any tensors, but a slot of something else cannot be trained or spliced into a Wan.
        out.append(f"{inventory.source} is {e}; the selection is what v2 picks, not a slot slotsmith can train")
    if selection.overshoot > OVERSHOOT_WARN:
        out.append(
            f"budget overshot: the slot holds {selection.overshoot:.2f}x the target "
            f"(v2 stops only after the tensor that reaches the budget)"
        )
    covered = sum(1 for s in shares if s.selected_params)
    if shares and covered < len(shares):
        out.append(
            f"only {covered}/{len(shares)} blocks are covered: the budget ends before the first round "
            f"of the per-block draft does; a larger ff covers more blocks"
        )
    nonzero = [s.share for s in shares if s.selected_params]
    if nonzero and (max(nonzero) > HIGH * min(nonzero) or covered < len(shares)):
        out.append(
            f"uneven per-block share: from {min(s.share for s in shares):.2%} to {max(nonzero):.2%} of a block"
        )
    if selection.rows:
        largest_row = max(inventory.tensors[n].numel // inventory.tensors[n].shape[0] for n in selection.pool)
        if selection.target_params - selection.selected_params > largest_row:
            out.append(
                f"budget short by {selection.target_params - selection.selected_params:,} params: pool "
                f"{selection.ffid}'s shares of tensors whose rows {selection.num_pools} does not divide are a row "
                "short of ff; a smaller ff or a --pools that divides the rows meets it"
            )
    elif len(selection.tensors) == len(selection.pool):
        out.append(f"the slot is the whole of pool {selection.ffid}")
    return out


def plan_json(inventory: Inventory, selection: Selection) -> dict:
    """The machine-readable plan of one selection (``plan --json``)."""
    shares = block_shares(inventory, selection)
    doc = {
        "model": inventory.source,
        "matching_layouts": inventory.matching_models(),
        "ff": selection.ff,
        "ffid": selection.ffid,
        "algorithm": selection.algorithm,
        "num_pools": selection.num_pools,
        "total_params": selection.total_params,
        "target_params": selection.target_params,
        "pool_tensors": len(selection.pool),
        "pool_params": selection.pool_params,
        "selected_params": selection.selected_params,
        "selected_fraction": selection.selected_params / selection.total_params,
        "overshoot": selection.overshoot,
        "tensors": list(selection.tensors),
        "entries": [{"name": n, "rows": list(selection.rows[n]) if n in selection.rows else None}
                    for n in selection.tensors],
        "blocks_covered": sum(1 for s in shares if s.selected_params),
        "num_blocks": len(shares),
        "per_block": [
            {"block": s.block, "share": s.share, "params": s.selected_params, "tensors": list(s.tensors),
             "mark": s.mark}
            for s in shares
        ],
        "warnings": warnings_for(inventory, selection, shares),
    }
    if selection.rows:
        doc["sliceable_params"] = selection.sliceable_params
        doc["sliceable_fraction"] = selection.sliceable_params / selection.total_params
        doc["left_out"] = list(selection.left_out)
    return doc


def _render_one(inventory: Inventory, selection: Selection) -> list[str]:
    shares = block_shares(inventory, selection)
    s = selection
    non_block = [n for n in s.tensors if block_of(n) is None]
    covered = sum(1 for b in shares if b.selected_params)
    lines = [f"slot ff={s.ff:g} ffid={s.ffid} (selection {s.algorithm}, {s.num_pools} pools)"]
    if s.rows:
        lines += [
            f"  sliceable   {s.sliceable_params:>16,} params ({s.sliceable_params / s.total_params:.4%} of the "
            f"model): every tensor with at least {s.num_pools} rows",
            f"  left out    {len(s.left_out):>16} tensors (fewer rows than pools): "
            + (", ".join(s.left_out[:4]) + (f" and {len(s.left_out) - 4} more" if len(s.left_out) > 4 else "")
               if s.left_out else "-"),
            f"  target      {s.target_params:>16,} params (ff x sliceable)",
            f"  pool {s.ffid} share {s.pool_params:>15,} params: rows [K*R/N, (K+1)*R/N) of {len(s.pool)} tensors",
        ]
    else:
        lines += [
            f"  target      {s.target_params:>16,} params ({s.target_params / s.total_params:.4%} of the model)",
            f"  pool {s.ffid}      {s.pool_params:>16,} params in {len(s.pool)} tensors",
        ]
    lines += [
        f"  selected    {s.selected_params:>16,} params in {len(s.tensors)} tensors "
        f"({s.selected_params / s.total_params:.4%} of the model, {s.overshoot:.2f}x target)",
        f"  blocks      {covered}/{len(shares)} covered",
    ]
    if shares:
        lines.append("  block    share  mark  tensors")
        for b in shares:
            lines.append(f"  {b.block:>5} {b.share:>8.3%}  {b.mark:<4}  {', '.join(b.tensors) or '-'}")
    lines.append(f"  outside blocks: {', '.join(_label(n, s) for n in non_block) or '-'}")
    for w in warnings_for(inventory, selection, shares):
        lines.append(f"  warning: {w}")
    return lines


def render_plan(inventory: Inventory, selections: list[Selection]) -> str:
    """The human report for one or more selections of one model."""
    models = inventory.matching_models()
    lines = [
        f"model {inventory.source}" + (f" (layout of {', '.join(models)})" if models else ""),
        f"  {len(inventory.tensors):,} tensors, {inventory.total_params:,} params, {inventory.num_blocks()} blocks",
        "",
    ]
    for selection in selections:
        lines += _render_one(inventory, selection) + [""]
    if len(selections) > 1:
        lines.append("overlap (shared tensors between slots)")
        lines.append("  ffid " + "".join(f"{s.ffid:>6}" for s in selections))
        for a in selections:
            row = "".join(f"{'-' if a is b else len(shared_tensors(a, b)):>6}" for b in selections)
            lines.append(f"  {a.ffid:>4} {row}")
    # Tensor names come from the checkpoint: escape what would forge lines or reach the terminal.
    return "\n".join(printable(line) for line in lines).rstrip() + "\n"
