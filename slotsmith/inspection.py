"""What ``slotsmith inspect`` shows: a slot's manifest, a splice record, or a summary.

Headers are read, and only slot-sized regions are hashed (a slot's tensors,
a spliced checkpoint's slot regions) to warn about what does not check out.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import yaml

from slotsmith.checks import record_problems, spliced_problems
from slotsmith.digest import canonical_json
from slotsmith.errors import printable
from slotsmith.inventory import inventory_of, load_inventory
from slotsmith.io.checkpoint import open_checkpoint
from slotsmith.layout import KNOWN_MODELS
from slotsmith.manifest import (
    METADATA_KEY,
    Manifest,
    manifest_from_json,
)
from slotsmith.slot import Slot, slot_from_header
from slotsmith.splice_record import (
    SPLICE_KEY,
    SpliceRecord,
    parse_splice_record,
    read_splice_record,
)


def _slot_warnings(slot: Slot) -> list[str]:
    """What does not check out in a slot: tensor bytes against the manifest, and
    the recorded shapes against the known model the manifest names."""
    problems = slot.hash_problems()
    m = slot.manifest
    if m.base.layout in KNOWN_MODELS:
        model = load_inventory(m.base.layout)
        for e in m.entries:
            spec = model.tensors.get(e.name)
            if spec is None or spec.shape != e.shape:
                found = "lacks it" if spec is None else f"has {list(spec.shape)}"
                problems.append(
                    f"{slot.path}: tensor {e.name!r} is recorded as {list(e.shape)} but {m.base.layout} {found}"
                )
    return problems


def _record_warnings(label: str, inv, record: SpliceRecord, differ: list[str]) -> list[str]:
    """What does not check out in a spliced checkpoint: its record's own consistency
    (duplicate or overlapping slots, slots of another layout) and every slot region's bytes."""
    return differ + record_problems(label, record) + spliced_problems(inv, record)


def describe(path: str | os.PathLike) -> dict:
    """A JSON-able description of FILE, with what does not check out in it.

    Only the slot-sized regions are hashed (a slot's tensors, a spliced
    checkpoint's slot regions); ``verify`` runs every check.

    Returns:
        ``{"kind": "slot", "file", "manifest", "warnings"}`` for a slot;
        ``{"kind": "checkpoint", "file", "summary", "splice": record|None,
        "warnings"}`` for a checkpoint (the record of a spliced one included).
        ``warnings`` lists one line per problem found.

    Raises:
        SlotsmithError: Unreadable or malformed file, or an invalid manifest
            or splice record.
    """
    ckpt = open_checkpoint(path)
    if not ckpt.sharded and METADATA_KEY in ckpt.metadata:
        slot = slot_from_header(ckpt.files[0])
        return {
            "kind": "slot",
            "file": str(path),
            "manifest": slot.manifest.to_json(),
            "warnings": _slot_warnings(slot),
        }
    inv = inventory_of(ckpt)
    found, differ = read_splice_record(ckpt)
    record = found.to_json() if found else None
    warnings = _record_warnings(str(path), inv, found, differ) if found else []
    summary = {
        "files": [h.path.name for h in ckpt.files],
        "convention": inv.convention,
        "layout": inv.matching_models(),
        "layout_digest": inv.layout_digest(),
        "tensors": len(inv.tensors),
        "params": inv.total_params,
        "bytes": ckpt.nbytes,
        "dtypes": dict(sorted(Counter(t.dtype for t in inv.tensors.values()).items())),
        "blocks": inv.num_blocks(),
        "metadata_keys": sorted(k for k in ckpt.metadata if k != SPLICE_KEY),
    }
    return {"kind": "checkpoint", "file": str(path), "summary": summary, "splice": record, "warnings": warnings}


def to_yaml(doc: dict) -> str:
    """The YAML view of ``describe``'s result."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


def _human_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _manifest_lines(m: Manifest, indent: str = "") -> list[str]:
    sel = m.selection
    sel_text = ", ".join(f"{k}={v}" for k, v in sel.items()) if sel else "none"
    lines = [
        f"{indent}digest     {m.digest}",
        f"{indent}selection  {sel_text}",
        f"{indent}base       layout {m.base.layout or 'unknown'} ({m.base.layout_digest})",
        f"{indent}expert     {m.expert or '-'}",
        f"{indent}tensors    {len(m.entries)} ({_human_params(m.params)} params, {m.nbytes:,} bytes)",
    ]
    for e in m.entries:
        lines.append(f"{indent}  {e.describe():<48} {e.dtype:<5} {list(e.stored_shape)}  {e.digest}")
    return lines


def _tree_lines(obj: dict, indent: str) -> list[str]:
    """Nested JSON facts (a manifest's provenance) as indented ``key: value`` lines."""
    lines = []
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.extend(_tree_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {json.dumps(value)}")
    return lines


def render(doc: dict) -> str:
    """The human report of ``describe``'s result."""
    if doc["kind"] == "slot":
        m = manifest_from_json(doc["manifest"], doc["file"])
        prov = _tree_lines(m.provenance, "  ") if m.provenance else ["  -"]
        return _printable_lines([f"slot {doc['file']} ({m.format})", *_manifest_lines(m), "provenance", *prov])
    s = doc["summary"]
    dtypes = ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items())
    lines = [
        f"checkpoint {doc['file']}",
        f"files      {len(s['files'])}",
        f"convention {s['convention']}",
        f"layout     {', '.join(s['layout']) or 'unknown'} ({s['layout_digest']})",
        f"tensors    {s['tensors']} ({_human_params(s['params'])} params, {s['bytes']:,} bytes)",
        f"dtypes     {dtypes}",
        f"blocks     {s['blocks']}",
    ]
    if doc["splice"]:
        rec = parse_splice_record(canonical_json(doc["splice"]), doc["file"])
        lines.append(f"spliced    from {rec.base_source} with {len(rec.slots)} slot(s):")
        for name, m in rec.slots:
            blend = f" at strength {rec.strength(m):g}" if m.digest in rec.blends else ""
            lines.append(f"  slot {name}{blend}")
            lines.extend(_manifest_lines(m, "    "))
    return _printable_lines(lines)


def _printable_lines(lines: list[str]) -> str:
    # Every string here comes from the file: a newline in one must not forge a line.
    return "\n".join(printable(line) for line in lines)


def warning_lines(doc: dict) -> list[str]:
    """``warning:`` lines for what does not check out, and where to look further (empty if nothing)."""
    if not doc["warnings"]:
        return []
    lines = [f"warning: {printable(w)}" for w in doc["warnings"]]
    return lines + [f"warning: what is shown does not check out; run `slotsmith verify {printable(doc['file'])}`"]
