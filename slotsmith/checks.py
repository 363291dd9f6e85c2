"""Checks shared by ``splice`` and ``verify``, each written once.

Every check returns a list of problems, one line each, naming the file and
the tensor (an empty list means it passed), so ``verify`` can report them all
while ``splice`` stops at the first with ``raise_problems``. (A slot's
tensor hashes are checked by its own ``Slot.hash_problems``.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from slotsmith.blend import blend_ranges
from slotsmith.digest import digest_file_range
from slotsmith.errors import SlotsmithError, first_and_more
from slotsmith.inventory import Inventory
from slotsmith.io.files import InputFiles
from slotsmith.io.header import is_int
from slotsmith.layout import KNOWN_MODELS, wan_tensor_shapes
from slotsmith.manifest import Manifest
from slotsmith.select import ALGORITHMS, MAX_POOLS_V3, NUM_POOLS, select
from slotsmith.slot import Slot, base_region
from slotsmith.splice_record import SpliceRecord


def raise_problems(problems: Sequence[str]) -> None:
    """Raise the first problem as a one-line error, counting the others.

    Raises:
        SlotsmithError: ``problems`` is not empty.
    """
    if problems:
        raise SlotsmithError(first_and_more(problems))


def shape_problems(slot: Slot, base: Inventory) -> list[str]:
    """Slot entries the base lacks, or whose shape or dtype differ from the base's."""
    problems = []
    for e in slot.manifest.entries:
        spec = base.tensors.get(e.name)
        if spec is None:
            problems.append(f"{slot.path}: tensor {e.name!r} is not in the base {base.source}")
        elif spec.shape != e.shape or spec.dtype != e.dtype:
            problems.append(
                f"{slot.path}: tensor {e.name!r} is {e.dtype}{list(e.shape)} but the base "
                f"{base.source} has {spec.dtype}{list(spec.shape)}"
            )
    return problems


def fingerprint_problems(slot: Slot, base: Inventory, files: InputFiles) -> list[str]:
    """Whether ``base`` is the base the slot was made on.

    Compares the layout digest, then hashes the base's own bytes of every
    region the slot replaces (so two bases of one layout, like the Wan 2.2
    high- and low-noise experts, are told apart). Run ``shape_problems``
    first: entries that do not fit the base are skipped here.

    Args:
        slot: The slot.
        base: Inventory of a real base checkpoint.
        files: Where to open the base's files.

    Returns:
        Problem lines.
    """
    m = slot.manifest
    digest = base.layout_digest()
    if digest != m.base.layout_digest:
        return [
            f"{slot.path}: made on a base of layout {m.base.layout_digest} "
            f"({m.base.layout or 'unknown model'}), but {base.source} has layout {digest}"
            f"{_first_layout_difference(m, base)}"
        ]
    problems = []
    expert = f" (the slot is for the {m.expert!r} expert)" if m.expert else ""
    for e in m.entries:
        spec = base.tensors.get(e.name)
        if spec is None or spec.shape != e.shape or spec.dtype != e.dtype:
            continue
        r = base_region(base, files, e)
        actual = digest_file_range(r.fd, r.start, r.end)
        if actual != m.base.tensors[e.name]:
            problems.append(
                f"{base.source}: tensor {e.describe()!r}: base bytes differ from those {slot.path} "
                f"was made on: wrong base{expert}"
            )
    return problems


def _first_layout_difference(m: Manifest, base: Inventory) -> str:
    """The first tensor (by name) where ``base`` differs from the base the slot was made on.

    A manifest records only the layout digest, so that base is rebuilt from
    the known model the manifest names and the dtype of the slot's entries
    (the base's own dtype).

    Returns:
        ``": first difference: tensor ..."``, or ``""`` when the manifest
        names no known model or its entries have several dtypes.
    """
    model = KNOWN_MODELS.get(m.base.layout or "")
    dtypes = {e.dtype for e in m.entries}
    if model is None or len(dtypes) != 1:
        return ""
    (dtype,) = dtypes
    made_on = {n: f"{dtype}{list(shape)}" for n, shape in wan_tensor_shapes(model.config).items()}
    found = {n: f"{t.dtype}{list(t.shape)}" for n, t in base.tensors.items()}
    for name in sorted(made_on.keys() | found.keys()):
        theirs, ours = made_on.get(name, "absent"), found.get(name, "absent")
        if theirs != ours:
            return f": first difference: tensor {name!r} is {ours} in the base, {theirs} in {model.name}"
    return ""


def overlap_problems(slots: Sequence[tuple[str, Manifest]]) -> list[str]:
    """Pairs of slots whose entries share rows of a tensor (or one slot given twice).

    Args:
        slots: ``(label, manifest)`` per slot; the label (usually the file)
            names the slot in messages.

    Returns:
        One line per overlapping tensor, naming both slots and the shared rows.
    """
    problems = []
    for i, (a, ma) in enumerate(slots):
        for b, mb in slots[i + 1 :]:
            if ma.digest == mb.digest:
                problems.append(f"{a} and {b}: the same slot given twice")
                continue
            theirs = mb.entry_map
            for ea in ma.entries:
                eb = theirs.get(ea.name)
                if eb is None:
                    continue
                lo, hi = max(ea.span[0], eb.span[0]), min(ea.span[1], eb.span[1])
                if lo < hi:
                    whole = ea.rows is None and eb.rows is None
                    what = f"tensor {ea.name!r}" if whole else f"rows [{lo}, {hi}) of tensor {ea.name!r}"
                    problems.append(f"{a} and {b} overlap: both hold {what}{_pools_differ(ma, mb)}")
    return problems


def _pools_differ(ma: Manifest, mb: Manifest) -> str:
    """Why two overlapping slots collide when their selections have different pool counts ("" otherwise)."""
    pa, pb = ((m.selection or {}).get("num_pools") for m in (ma, mb))
    if pa is None or pb is None or pa == pb:
        return ""
    return f" (their pool counts differ, {pa} and {pb}: only slots of one --pools are disjoint)"


def seal_problems(spliced: Inventory, record: SpliceRecord, files: InputFiles) -> list[str]:
    """Every tensor of a sealed spliced checkpoint must still hash to its recorded digest.

    Args:
        spliced: Inventory of the spliced checkpoint.
        record: Its parsed splice record (with a ``seal``).
        files: Where to open its files.

    Returns:
        Problem lines: tensors added, missing, or whose bytes changed.
    """
    seal = record.seal or {}
    problems = [
        f"{spliced.source}: tensor {n!r} is not in the sealed record" for n in sorted(set(spliced.tensors) - set(seal))
    ]
    problems += [f"{spliced.source}: sealed tensor {n!r} is missing" for n in sorted(set(seal) - set(spliced.tensors))]
    for name in sorted(set(seal) & set(spliced.tensors)):
        header, info = spliced.checkpoint.tensors[spliced.keys[name]]
        actual = digest_file_range(files.fd(header.path), info.start, info.end)
        if actual != seal[name]:
            problems.append(
                f"{spliced.source}: tensor {name!r}: bytes changed since the splice "
                f"(sealed {seal[name]}, now {actual})"
            )
    return problems


def out_of_date_problems(
    label: str, record: SpliceRecord, slots: Sequence[tuple[Path, Manifest]]
) -> tuple[list[str], int]:
    """Slots a spliced checkpoint holds in an older (or other) version than the checked ones.

    A record names each slot by its file name; a checked slot file of that
    name whose manifest digest differs means the splice is out of date.

    Args:
        label: Names the spliced checkpoint.
        record: Its splice record.
        slots: ``(path, manifest)`` of the slots being checked alongside.

    Returns:
        ``(problem lines, how many recorded slots were found among slots)``.
    """
    by_name: dict[str, list[tuple[Path, Manifest]]] = {}
    for path, m in slots:
        by_name.setdefault(Path(path).name, []).append((path, m))
    problems, found = [], 0
    for file, m in record.slots:
        for path, current in by_name.get(file, []):
            found += 1
            if current.digest != m.digest:
                problems.append(
                    f"{label}: out of date: it holds slot {file!r} with manifest {m.digest}, "
                    f"but {path} has manifest {current.digest}"
                )
    return problems, found


def spliced_problems(spliced: Inventory, record: SpliceRecord, files: InputFiles | None = None) -> list[str]:
    """Check a spliced checkpoint against its own splice record.

    The layout must still be the base's, and the bytes of every region each
    slot replaced must still hash to that slot's recorded digest (for a slot
    spliced at a strength, the recorded digest of the blend).

    Args:
        spliced: Inventory of the spliced checkpoint.
        record: Its parsed splice record.
        files: Where to open its files; None: opened and closed here.

    Returns:
        Problem lines.
    """
    if spliced.layout_digest() != record.base_layout_digest:
        return [f"{spliced.source}: layout differs from the base {record.base_source!r} it was spliced from"]
    problems = []
    with InputFiles() as own:
        files = files or own
        for slot_file, m in record.slots:
            for e in m.entries:
                spec = spliced.tensors.get(e.name)
                if spec is None or spec.shape != e.shape or spec.dtype != e.dtype:
                    problems.append(f"{spliced.source}: tensor {e.name!r} of slot {slot_file!r} is missing or reshaped")
                    continue
                r = base_region(spliced, files, e)
                if digest_file_range(r.fd, r.start, r.end) != record.expected_digest(m, e.name):
                    what = "bytes" if m.digest not in record.blends else f"blend at strength {record.strength(m):g}"
                    problems.append(
                        f"{spliced.source}: tensor {e.describe()!r} no longer holds the {what} of slot {slot_file!r}"
                    )
    return problems


def blend_problems(
    spliced: Inventory, record: SpliceRecord, base: Inventory, slots: Mapping[str, Slot], files: InputFiles
) -> list[str]:
    """Every region of a slot spliced at a strength must be the blend recomputed from base and slot.

    Args:
        spliced: Inventory of the spliced checkpoint.
        record: Its parsed splice record.
        base: Inventory of the real base checkpoint.
        slots: Manifest digest -> slot file, for each blended slot to check
            (blended slots not in it are skipped).
        files: Where to open the checkpoints' and slots' files.

    Returns:
        One line per region that differs from ``base + s * (slot - base)``.
    """
    if base.layout_digest() != spliced.layout_digest():
        return [f"{spliced.source}: layout differs from the base {base.source}"]
    problems = []
    for file, m in record.slots:
        blend, slot = record.blends.get(m.digest), slots.get(m.digest)
        if blend is None or slot is None:
            continue
        fd = files.fd(slot.path)
        for e in m.entries:
            info, b, mine = slot.info(e.name), base_region(base, files, e), base_region(spliced, files, e)
            want = blend_ranges((b.fd, b.start, b.end), (fd, info.start, info.end), e.dtype, blend.strength, None)
            if digest_file_range(mine.fd, mine.start, mine.end) != want:
                problems.append(
                    f"{spliced.source}: tensor {e.describe()!r} is not {base.source} + {blend.strength:g} x "
                    f"(slot - base) for slot {file!r}"
                )
    return problems


MAX_POOLS = MAX_POOLS_V3
"""Most pools a recorded selection may name: bounds the work a hostile manifest can ask for."""


def is_extracted(m: Manifest) -> bool:
    """Whether the slot was made by ``extract`` (it records ``extracted_from``)."""
    return "extracted_from" in m.provenance or "extracted_from" in (m.selection or {})


def selection_problems(label: str, m: Manifest, layout: Inventory) -> list[str]:
    """Whether the manifest's selection, recomputed on ``layout``, yields the slot's tensors.

    A trained slot must hold exactly the selected tensors (and, for a v3
    selection, exactly their rows); an extracted one (see ``is_extracted``)
    only tensors (rows) within the selection. Call it only for a manifest
    whose selection names an ``algorithm``.

    Args:
        label: Names the slot in messages.
        m: The slot's manifest.
        layout: The model the selection ran on (a layout or a checkpoint);
            only names and shapes are used.

    Returns:
        Problem lines.
    """
    sel = m.selection or {}
    alg = sel.get("algorithm")
    if not (isinstance(alg, str) and alg in ALGORITHMS):
        return [f"{label}: unknown selection algorithm {alg!r} (known: {', '.join(ALGORITHMS)})"]
    ff, ffid, pools = sel.get("ff"), sel.get("ffid"), sel.get("num_pools", NUM_POOLS)
    if not (isinstance(ff, int | float) and not isinstance(ff, bool) and is_int(ffid) and is_int(pools)):
        return [f"{label}: selection needs a number ff and integers ffid and num_pools"]
    if not 1 <= pools <= MAX_POOLS:
        return [f"{label}: selection num_pools {pools} is outside 1..{MAX_POOLS}"]
    for e in m.entries:
        spec = layout.tensors.get(e.name)
        if spec is None or spec.shape != e.shape:
            found = "lacks it" if spec is None else f"has {list(spec.shape)}"
            return [f"{label}: tensor {e.name!r} {list(e.shape)} does not fit the layout {layout.source} ({found})"]
    try:
        s = select({n: t.shape for n, t in layout.tensors.items()}, ff, ffid, alg, pools)
    except SlotsmithError as e:
        return [f"{label}: selection {alg} ff={ff} ffid={ffid} cannot be recomputed: {e}"]
    have, want = {e.name for e in m.entries}, set(s.tensors)
    extra, missing = sorted(have - want), sorted(want - have)
    pools_note = f" --pools {pools}" if s.rows else ""
    what = f"{alg}{pools_note} --ff {ff} --ffid {ffid} on {layout.source}"
    problems = [f"{label}: tensor {n!r} is not in the selection {what}" for n in extra]
    if not is_extracted(m):
        problems += [f"{label}: tensor {n!r} of the selection {what} is missing from the slot" for n in missing]
    for e in m.entries:
        rows = s.rows.get(e.name)  # None for v2, which checks tensor names only, as it always has
        if rows is None:
            continue
        inside = e.rows is not None and rows[0] <= e.rows[0] and e.rows[1] <= rows[1]
        if not inside or not (e.rows == rows or is_extracted(m)):
            problems.append(
                f"{label}: tensor {e.describe()!r} is not rows [{rows[0]}, {rows[1]}) of the selection {what}"
            )
    return problems


def base_agreement_problems(slots: Sequence[tuple[str, Manifest]]) -> list[str]:
    """Slots that claim one base must agree on its bytes where their regions coincide.

    Each slot records the xxh3-128 of the base's bytes of every region it
    replaces; two slots covering the same region with different digests were
    made on different bases, whatever they claim.

    Args:
        slots: ``(label, manifest)`` per slot, all claiming the same base.

    Returns:
        One line per region the slots disagree on.
    """
    problems = []
    seen: dict[tuple[str, tuple[int, int]], tuple[str, str]] = {}
    for label, m in slots:
        for e in m.entries:
            key, digest = (e.name, e.span), m.base.tensors[e.name]
            first = seen.setdefault(key, (label, digest))
            if first[1] != digest:
                problems.append(
                    f"{first[0]} and {label} disagree on the base: its bytes of tensor {e.describe()!r} differ"
                )
    return problems


def record_problems(label: str, record: SpliceRecord) -> list[str]:
    """A splice record's own consistency: its slots fit its base layout and are disjoint."""
    problems = [
        f"{label}: spliced slot {f!r} was made on layout {m.base.layout_digest}, "
        f"not the record's base layout {record.base_layout_digest}"
        for f, m in record.slots
        if m.base.layout_digest != record.base_layout_digest
    ]
    return problems + overlap_problems([(f"{label} (spliced slot {f!r})", m) for f, m in record.slots])


def _uncovered(nbytes: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges of ``[0, nbytes)`` outside every ``covered`` range."""
    gaps, cursor = [], 0
    for lo, hi in sorted(covered):
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
    if cursor < nbytes:
        gaps.append((cursor, nbytes))
    return gaps


def spliced_base_problems(spliced: Inventory, record: SpliceRecord, base: Inventory, files: InputFiles) -> list[str]:
    """Every byte of a spliced checkpoint outside its recorded slots must be the base's.

    With ``spliced_problems`` (each recorded region holds its slot's bytes)
    this shows every tensor equals the base's bytes or exactly one recorded
    slot's (recorded slots are disjoint, see ``record_problems``).

    Args:
        spliced: Inventory of the spliced checkpoint.
        record: Its parsed splice record.
        base: Inventory of the real base checkpoint.
        files: Where to open both checkpoints' files.

    Returns:
        One line per tensor whose uncovered bytes differ from the base's.
    """
    if base.layout_digest() != spliced.layout_digest():
        return [f"{spliced.source}: layout differs from the base {base.source}"]
    covered: dict[str, list[tuple[int, int]]] = {}
    for _, m in record.slots:
        for e in m.entries:
            covered.setdefault(e.name, []).append(e.byte_range())
    problems = []
    for name in sorted(spliced.tensors):
        sh, si = spliced.checkpoint.tensors[spliced.keys[name]]
        bh, bi = base.checkpoint.tensors[base.keys[name]]
        for lo, hi in _uncovered(si.nbytes, covered.get(name, [])):
            mine = digest_file_range(files.fd(sh.path), si.start + lo, si.start + hi)
            theirs = digest_file_range(files.fd(bh.path), bi.start + lo, bi.start + hi)
            if mine != theirs:
                where = "" if (lo, hi) == (0, si.nbytes) else f" bytes [{lo}, {hi})"
                problems.append(
                    f"{spliced.source}: tensor {name!r}{where} differs from the base {base.source} "
                    "and no recorded slot covers it"
                )
                break
    return problems
