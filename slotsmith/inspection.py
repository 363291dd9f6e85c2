"""What ``slotsmith inspect`` shows: a slot's manifest, a splice record, or a summary.

Only headers are read, so inspecting any file takes milliseconds.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import yaml

from slotsmith.digest import canonical_json
from slotsmith.inventory import inventory_of
from slotsmith.io.checkpoint import open_checkpoint
from slotsmith.manifest import (
    METADATA_KEY,
    Manifest,
    manifest_from_header,
    manifest_from_json,
)
from slotsmith.splice_record import SPLICE_KEY, parse_splice_record, read_splice_record


def describe(path: str | os.PathLike) -> dict:
    """A JSON-able description of FILE.

    Returns:
        ``{"kind": "slot", "file", "manifest"}`` for a slot;
        ``{"kind": "checkpoint", "file", "summary", "splice": record|None}``
        for a checkpoint (the record of a spliced one included).

    Raises:
        SlotsmithError: Unreadable or malformed file, or an invalid manifest
            or splice record.
    """
    ckpt = open_checkpoint(path)
    if not ckpt.sharded and METADATA_KEY in ckpt.metadata:
        return {"kind": "slot", "file": str(path), "manifest": manifest_from_header(ckpt.files[0]).to_json()}
    inv = inventory_of(ckpt)
    found, _ = read_splice_record(ckpt)
    record = found.to_json() if found else None
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
    return {"kind": "checkpoint", "file": str(path), "summary": summary, "splice": record}


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
        return "\n".join([f"slot {doc['file']} ({m.format})", *_manifest_lines(m), "provenance", *prov])
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
            lines.append(f"  slot {name}")
            lines.extend(_manifest_lines(m, "    "))
    return "\n".join(lines)
