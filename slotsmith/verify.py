"""``slotsmith verify``: check slots and spliced checkpoints, for CI.

Every check here is one of ``slotsmith.checks`` (shared with ``splice``) or
the slot/manifest validation of ``slotsmith.slot``; this module finds the
files, runs the checks on each file and on the set, and reports every
outcome as a row (file, check, result, detail) instead of stopping at the
first failure.

Slots are grouped by the base they claim (layout digest and expert): slots of
one group must be disjoint and agree on the base's bytes; groups themselves
are only reported, since slots for, say, the two Wan 2.2 experts are never
spliced together. With ``--base`` every slot must fit that one base, so all
slots form one group.

A slot spliced at a strength (``splice FILE:S``) is checked against the
digests of its blend in the record; with ``--base`` and that slot among the
files, the blend is recomputed from them (the ``strength`` check).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slotsmith.checks import (
    base_agreement_problems,
    blend_problems,
    fingerprint_problems,
    is_extracted,
    out_of_date_problems,
    overlap_problems,
    record_problems,
    seal_problems,
    selection_problems,
    shape_problems,
    spliced_base_problems,
    spliced_problems,
)
from slotsmith.errors import SlotsmithError, first_and_more, printable
from slotsmith.inventory import (
    Inventory,
    inventory_from_checkpoint,
    inventory_of,
    load_inventory,
)
from slotsmith.io.checkpoint import INDEX_SUFFIX, Checkpoint, open_checkpoint
from slotsmith.io.files import InputFiles
from slotsmith.layout import KNOWN_MODELS
from slotsmith.manifest import METADATA_KEY, Manifest
from slotsmith.progress import Progress
from slotsmith.select import shared_tensors
from slotsmith.slot import SLOT_SUFFIX, Slot, read_slot, slot_from_header
from slotsmith.splice_record import SpliceRecord, has_splice_record, read_splice_record

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        file: The file (or ``group N`` for a check on a set of slots).
        check: Which check.
        result: ``pass``, ``fail`` or ``skip`` (could not be run; not a failure).
        detail: One line: what passed, the first problem, or why it was skipped.
        problems: Every problem line of a failed check.
    """

    file: str
    check: str
    result: str
    detail: str
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "check": self.check,
            "result": self.result,
            "detail": self.detail,
            "problems": list(self.problems),
        }


@dataclass
class Report:
    """Every check of one ``verify`` run, and the slots grouped by claimed base."""

    checks: list[Check] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.result != FAIL for c in self.checks)

    def counts(self) -> dict[str, int]:
        return {r: sum(c.result == r for c in self.checks) for r in (PASS, FAIL, SKIP)}

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "checks": [c.to_json() for c in self.checks],
            "groups": self.groups,
        }

    def add(self, file: str, check: str, problems: Sequence[str], passed: str) -> None:
        """Record a check from its problem lines (``passed``: the detail when there are none)."""
        if problems:
            self.checks.append(Check(file, check, FAIL, first_and_more(problems), tuple(problems)))
        else:
            self.checks.append(Check(file, check, PASS, passed))

    def skip(self, file: str, check: str, why: str) -> None:
        """Record a check that could not run (not a failure), and why."""
        self.checks.append(Check(file, check, SKIP, why))


@dataclass(frozen=True)
class Target:
    """A file to verify: ``kind`` is ``slot``, ``spliced`` or ``bad`` (with ``error``).

    ``checkpoint`` holds the headers read to classify it (not ``bad`` ones),
    so the checks do not read them again.
    """

    kind: str
    path: Path
    error: str = ""
    checkpoint: Checkpoint | None = None


def _classify(path: Path, explicit: bool, shards: set[Path] | None = None) -> Target | None:
    """What a ``.slot``/``.safetensors``/index file is, from its header or index alone.

    The shards of an index are added to ``shards``, so they are not looked at twice.
    """
    if not path.is_file():  # a FIFO or a device would block or never end
        return Target("bad", path, f"{path}: not a regular file")
    try:
        ckpt = open_checkpoint(path)  # an index JSON, or one file's header
    except SlotsmithError as e:
        return Target("bad", path, str(e))
    if ckpt.sharded and shards is not None:
        shards |= {_real(h.path) for h in ckpt.files}
    first = ckpt.index_metadata if ckpt.sharded else ckpt.metadata
    if path.suffix == SLOT_SUFFIX or METADATA_KEY in first:
        return Target("slot", path, checkpoint=ckpt)
    if has_splice_record(ckpt):
        return Target("spliced", path, checkpoint=ckpt)
    if explicit:
        return Target("bad", path, f"{path}: neither a slot nor a spliced checkpoint (no manifest, no splice record)")
    return None


def find_targets(paths: Sequence[str | os.PathLike]) -> list[Target]:
    """The slots and spliced checkpoints to verify.

    A file is taken as given; a folder is searched recursively (hidden folders
    skipped) for ``.slot`` files, ``.safetensors`` files holding a manifest or
    a splice record, and sharded spliced sets (by their index JSON, whose
    shards are then not looked at on their own). A file that cannot be read
    becomes a ``bad`` target, so a damaged checkpoint is never skipped.

    Args:
        paths: Files and folders; none means the current folder.

    Returns:
        Targets in a stable order, each file once.
    """
    targets: list[Target] = []
    seen: set[Path] = set()

    def add(t: Target | None) -> None:
        # realpath, not Path.resolve: it never raises, not even on a link loop.
        if t is not None and _real(t.path) not in seen:
            seen.add(_real(t.path))
            targets.append(t)

    for p in [Path(p) for p in paths] or [Path(".")]:
        if not p.is_dir():
            add(_classify(p, explicit=True))
            continue
        root = _real(p)
        indexes, files = [], []
        for folder, dirs, names in os.walk(p):  # links to folders are not followed
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                f = Path(folder) / name
                if not name.endswith((INDEX_SUFFIX, SLOT_SUFFIX, ".safetensors")):
                    continue
                if f.is_symlink() and not _real(f).is_relative_to(root):
                    # Never read: a committed link could point anywhere (leak.slot -> /etc/passwd).
                    add(Target("bad", f, f"{f}: a link out of {p}; not read"))
                elif not f.is_file():
                    if f.is_symlink():
                        add(Target("bad", f, f"{f}: a broken or looping link"))
                elif name.endswith(INDEX_SUFFIX):
                    indexes.append(f)
                else:
                    files.append(f)
        shards: set[Path] = set()
        for index in indexes:
            add(_classify(index, explicit=False, shards=shards))
        for f in files:
            if _real(f) not in shards:
                add(_classify(f, explicit=False))
    return targets


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


class _Layouts:
    """Where a manifest's selection can be recomputed: the real base, a known
    model's layout, or a spliced checkpoint of the same layout in this run."""

    def __init__(self, base: Inventory | None) -> None:
        self.base = base
        self.by_digest: dict[str, Inventory] = {}
        self._known: dict[str, Inventory] = {}

    def add(self, inv: Inventory) -> None:
        self.by_digest.setdefault(inv.layout_digest(), inv)

    def find(self, m: Manifest) -> Inventory | None:
        if self.base is not None and self.base.layout_digest() == m.base.layout_digest:
            return self.base
        name = m.base.layout
        # Only shipped names: a manifest's text must never name a file to open.
        if name in KNOWN_MODELS:
            if name not in self._known:
                self._known[name] = load_inventory(name)
            return self._known[name]
        return self.by_digest.get(m.base.layout_digest)


def _selection_check(report: Report, file: str, m: Manifest, layouts: _Layouts, spliced: str | None = None) -> None:
    """Recompute a slot's selection; ``spliced`` names a slot inside a spliced checkpoint's record."""
    label = file if spliced is None else f"{file} (spliced slot {spliced!r})"
    who = "" if spliced is None else f"spliced slot {spliced!r}: "
    if not (m.selection and "algorithm" in m.selection):
        why = "extracted without --ff/--ffid" if is_extracted(m) else "the manifest records none"
        report.skip(file, "selection", f"{who}no selection to recompute ({why})")
        return
    layout = layouts.find(m)
    if layout is None:
        if layouts.base is None:
            why = "give --base"
        else:
            why = f"the --base {layouts.base.source} has another layout ({layouts.base.layout_digest()})"
        report.skip(file, "selection", f"{who}layout {m.base.layout_digest} is not a known model; {why}")
        return
    sel = m.selection
    kind = "within" if is_extracted(m) else "exactly"
    report.add(
        file,
        "selection",
        selection_problems(label, m, layout),
        f"{who}{len(m.entries)} tensor(s), {kind} {sel['algorithm']}"
        f"{' --pools ' + str(sel.get('num_pools')) if sel['algorithm'] == 'v3' else ''} --ff {sel.get('ff')} "
        f"--ffid {sel.get('ffid')} on {layout.source}",
    )


def _verify_slot(
    report: Report, target: Target, base: Inventory | None, files: InputFiles, layouts: _Layouts
) -> Slot | None:
    file, ckpt = str(target.path), target.checkpoint
    try:
        # An index JSON is no slot file: read_slot says why.
        slot = read_slot(target.path) if ckpt.sharded else slot_from_header(ckpt.files[0])
    except SlotsmithError as e:
        report.add(file, "structure", [str(e)], "")
        return None
    m = slot.manifest
    report.add(file, "structure", [], f"{len(m.entries)} tensor(s), {m.nbytes:,} bytes, manifest {m.digest}")
    try:
        problems = slot.hash_problems()
    except (OSError, SlotsmithError) as e:  # the file changed under us
        problems = [f"{file}: cannot read ({e})"]
    report.add(file, "hashes", problems, f"{len(m.entries)} tensor hash(es) match the manifest")
    _selection_check(report, file, m, layouts)
    if base is not None:
        problems = shape_problems(slot, base) or fingerprint_problems(slot, base, files)
        report.add(file, "base", problems, f"made on {base.source} (layout and base bytes of every replaced region)")
    return slot


def _read_record(ckpt: Checkpoint) -> tuple[Inventory, SpliceRecord, list[str]]:
    """The spliced checkpoint's inventory and record, and where its copies of the record differ."""
    inv = inventory_of(ckpt)
    record, differ = read_splice_record(ckpt)
    if record is None:
        raise SlotsmithError(f"{ckpt.path}: no splice record")
    return inv, record, differ


def _verify_spliced(
    report: Report, target: Target, base: Inventory | None, files: InputFiles, layouts: _Layouts
) -> tuple[Inventory, SpliceRecord] | None:
    file = str(target.path)
    try:
        inv, record, differ = _read_record(target.checkpoint)
    except SlotsmithError as e:
        report.add(file, "structure", [str(e)], "")
        return None
    layouts.add(inv)
    report.add(file, "structure", [], f"{len(inv.tensors)} tensor(s), {len(record.slots)} spliced slot(s)")
    report.add(
        file,
        "record",
        differ + record_problems(file, record),
        f"slots {', '.join(f for f, _ in record.slots) or '-'} fit the base layout and are disjoint",
    )
    try:
        problems = spliced_problems(inv, record)
    except OSError as e:
        problems = [f"{file}: cannot read ({e})"]
    blended = " (or, at a strength, its recorded blend)" if record.blends else ""
    report.add(file, "slot bytes", problems, f"every spliced region holds its slot's bytes{blended}")
    if record.seal is not None:
        try:
            problems = seal_problems(inv, record, files)
        except OSError as e:
            problems = [f"{file}: cannot read ({e})"]
        report.add(file, "seal", problems, f"all {len(record.seal)} tensors hold the bytes sealed at the splice")
    elif base is None:
        report.skip(file, "seal", "not sealed (splice --seal): bytes outside the slots are checked only with --base")
    for slot_file, m in record.slots:
        _selection_check(report, file, m, layouts, spliced=slot_file)
    if base is not None:
        try:
            problems = spliced_base_problems(inv, record, base, files)
        except OSError as e:
            problems = [f"{file}: cannot read ({e})"]
        report.add(file, "base", problems, f"every byte outside the spliced slots equals {base.source}")
    return inv, record


def _strength_check(
    report: Report, file: str, spliced: Inventory, record: SpliceRecord, base: Inventory | None,
    slots: Sequence[Slot], files: InputFiles,
) -> None:
    """Recompute each slot spliced at a strength from the base and the slot (they must both be at hand)."""
    blended = [(f, m) for f, m in record.slots if m.digest in record.blends]
    if not blended:
        return
    which = ", ".join(f"{f} at {record.strength(m):g}" for f, m in blended)
    if base is None:
        report.skip(file, "strength", f"{which}: give --base and the slot files to recompute the blends "
                    "('slot bytes' checked them against their recorded digests)")
        return
    found = {s.manifest.digest: s for s in slots}
    missing = [f for f, m in blended if m.digest not in found]
    if missing:
        report.skip(file, "strength", f"{which}: slot {missing[0]!r} (that version) is not among the files "
                    "verified; give it to recompute its blend")
        return
    try:
        problems = blend_problems(spliced, record, base, found, files)
    except (OSError, SlotsmithError) as e:
        problems = [f"{file}: cannot read ({e})"]
    report.add(file, "strength", problems, f"{which}: every blended region is base + s x (slot - base) "
               f"recomputed from {base.source}")


def _group_key(m: Manifest) -> tuple[str, str | None]:
    return (m.base.layout_digest, m.expert)


def _verify_set(report: Report, slots: list[Slot], base: Inventory | None) -> None:
    groups: dict[tuple[str, str | None], list[Slot]] = {}
    for s in slots:
        groups.setdefault(("base", None) if base is not None else _group_key(s.manifest), []).append(s)
    for i, members in enumerate(groups.values(), 1):
        m = members[0].manifest
        report.groups.append(
            {
                "group": i,
                "base": base.source if base is not None else None,
                "layout": m.base.layout,
                "layout_digest": m.base.layout_digest,
                "expert": m.expert,
                "slots": [str(s.path) for s in members],
            }
        )
        if len(members) < 2:
            continue
        labelled = [(str(s.path), s.manifest) for s in members]
        name = f"group {i}"
        report.add(name, "disjoint", overlap_problems(labelled), f"{len(members)} slots share no rows of any tensor")
        if base is None:  # with --base each slot's own base check is stronger
            agreed = "slots agree on the base's bytes wherever they replace the same region"
            report.add(name, "same base", base_agreement_problems(labelled), agreed)


def _target_bytes(target) -> int:
    """The bytes of a target's files (a sharded checkpoint: its index and shards), 0 when unreadable."""
    path = Path(target.path)
    try:
        if path.name.endswith(INDEX_SUFFIX):  # the shards lie beside their index
            files = [path, *path.parent.glob("*.safetensors")]
        else:
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files)
    except OSError:
        return 0


def verify(
    paths: Sequence[str | os.PathLike] = (),
    base: str | os.PathLike | None = None,
    *,
    quiet: bool = True,
) -> Report:
    """Verify slots and spliced checkpoints (see the module docstring).

    Args:
        paths: Files and folders (see ``find_targets``); none: the current folder.
        base: The real base checkpoint, if given: every slot's fingerprint and
            every spliced checkpoint's unslotted bytes are checked against it.
        quiet: No progress on stderr (a bar on a terminal, lines in a log otherwise).

    Returns:
        The report; ``report.ok`` is False when any check failed.

    Raises:
        SlotsmithError: ``base`` cannot be read, or there is nothing to verify.
    """
    if base is not None and not (Path(base).is_file() or Path(base).is_dir()):
        raise SlotsmithError(f"{base}: not a regular file or folder")
    base_inv = inventory_from_checkpoint(base) if base is not None else None
    targets = find_targets(paths)
    if not targets:
        where = ", ".join(str(p) for p in paths) or "the current folder"
        raise SlotsmithError(f"nothing to verify in {where}: no .slot files or spliced checkpoints")
    report = Report()
    layouts = _Layouts(base_inv)
    slots: list[Slot] = []
    records: list[tuple[str, Inventory, SpliceRecord]] = []
    # Counted in bytes: a spliced checkpoint of many GB takes as long as thousands of slots.
    bar = Progress("verify", sum(_target_bytes(t) for t in targets), unit="B", show=not quiet)
    with bar, InputFiles() as files:
        # Spliced checkpoints first: their layouts let slots' selections be recomputed.
        for t in sorted(targets, key=lambda t: t.kind != "spliced"):
            if t.kind == "bad":
                report.add(str(t.path), "structure", [t.error], "")
            elif t.kind == "spliced":
                found = _verify_spliced(report, t, base_inv, files, layouts)
                if found is not None:
                    records.append((str(t.path), *found))
            else:
                slot = _verify_slot(report, t, base_inv, files, layouts)
                if slot is not None:
                    slots.append(slot)
            bar.update(_target_bytes(t))
        for file, inv, record in records:  # blends are recomputed from the slots, read after the checkpoints
            _strength_check(report, file, inv, record, base_inv, slots, files)
    # Report files in the order found (they ran spliced-first), then the set checks.
    order = {str(t.path): i for i, t in enumerate(targets)}
    report.checks.sort(key=lambda c: order[c.file])
    _verify_set(report, slots, base_inv)
    checked = [(s.path, s.manifest) for s in slots]
    for file, _, record in records:
        problems, found = out_of_date_problems(file, record, checked)
        if found:
            report.add(file, "up to date", problems, f"its {found} slot(s) found here are the versions it holds")
    return report


def render(report: Report, failures_only: bool = False) -> str:
    """The report as a table (file, check, result, detail), groups, and a summary line."""
    rows = [c for c in report.checks if not failures_only or c.result == FAIL]
    table = [("FILE", "CHECK", "RESULT", "DETAIL")] + [
        (printable(c.file), c.check, c.result.upper() if c.result == FAIL else c.result, printable(c.detail))
        for c in rows
    ]
    w_file = max(len(r[0]) for r in table)
    w_check = max(len(r[1]) for r in table)
    lines = [f"{f:<{w_file}}  {c:<{w_check}}  {r:<6}  {d}".rstrip() for f, c, r, d in table] if rows else []
    if len(report.groups) > 1 and not failures_only:
        lines.append("")
        lines.append("slots by the base they claim (slots of different groups are never checked against each other):")
        for g in report.groups:
            layout = g["layout"] or "unknown layout"
            expert = f", expert {g['expert']}" if g["expert"] else ""
            lines.append(
                printable(f"  group {g['group']}: {layout} ({g['layout_digest']}){expert}: {', '.join(g['slots'])}")
            )
    n = report.counts()
    if lines:
        lines.append("")
    lines.append(
        f"{'ok' if report.ok else 'FAILED'}: {len(report.checks)} check(s), "
        f"{n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped"
    )
    return "\n".join(lines)


def verify_cast(cast_path: str | os.PathLike, base: str | os.PathLike | None = None, *, quiet: bool = True) -> Report:
    """Verify everything a cast file names: what CI runs.

    The usual checks run on every character's slot and on the output when it
    exists (see ``verify``); then, per character: its slot is present and
    equal to its pin, and records the cast's selection, layout and expert;
    for the cast: the characters' selections are disjoint, the output holds
    exactly the pinned slots, and (with ``base``) the base matches the cast's
    fingerprint.

    Args:
        cast_path: The cast file.
        base: The real base checkpoint, if given (usually the cast's ``base.path``).
        quiet: No progress bar.

    Returns:
        The report.

    Raises:
        SlotsmithError: The cast file is invalid, or ``base`` cannot be read.
    """
    from slotsmith.cast import base_problems, cast_layout, cast_selections, load_cast, pin_problems, slot_problems

    cast = load_cast(cast_path)
    label = str(cast.path)
    present = [c for c in cast.characters if c.slot.is_file()]
    output = cast.output if cast.output is not None and cast.output.exists() else None
    paths = [c.slot for c in present] + ([output] if output is not None else [])
    report = verify(paths, base, quiet=quiet) if paths else Report()

    for c in cast.characters:
        if c not in present:
            missing = f"{label}: {c.where}.slot: character {c.name!r}: {c.slot} is missing"
            report.add(str(c.slot), "present", [missing], "")
            continue
        try:
            m = read_slot(c.slot).manifest
        except SlotsmithError:
            continue  # verify reported its structure already
        pinned = f"character {c.name!r}: manifest {m.digest} is the pinned one"
        report.add(str(c.slot), "pin", pin_problems(cast, c, m), pinned)
        report.add(
            str(c.slot),
            "cast",
            slot_problems(cast, c, m),
            f"character {c.name!r}: {cast.algorithm} --ff {c.ff:g} --ffid {c.ffid} on the cast's base",
        )

    try:
        layout = cast_layout(cast)
    except SlotsmithError as e:
        report.skip(label, "allocations", f"no layout to recompute the selections on ({e})")
    else:
        try:
            sels = cast_selections(cast, layout)
        except SlotsmithError as e:
            report.add(label, "allocations", [str(e)], "")
        else:
            problems = [
                f"{label}: characters {a.name!r} and {b.name!r} share tensor {shared[0]!r}"
                for i, a in enumerate(cast.characters)
                for b in cast.characters[i + 1 :]
                if (shared := shared_tensors(sels[a.name], sels[b.name]))
            ]
            disjoint = f"{len(cast.characters)} character(s) on disjoint tensors of {layout.source}"
            report.add(label, "allocations", problems, disjoint)

    if base is not None:
        inv = inventory_from_checkpoint(base)
        with InputFiles() as files:
            report.add(label, "fingerprint", base_problems(cast, inv, files), f"{base} is the cast's base")
    elif cast.base.layout_digest is None:
        report.skip(label, "fingerprint", "the cast records no fingerprint yet (run `slotsmith cast pin`)")
    else:
        report.skip(label, "fingerprint", "give --base to check the base itself (each slot's claimed base is in its "
                    "'cast' check)")

    if cast.output is None:
        report.skip(label, "output", "the cast names no output")
    elif output is None:
        report.skip(label, "output", f"{cast.output} is not built yet")
    else:
        report.add(label, "output", _output_problems(cast, output), f"{output} holds exactly the pinned slots")
    return report


def _output_problems(cast, output: Path) -> list[str]:
    """Whether a cast's spliced output holds exactly the characters' pinned slots."""
    try:
        _, record, _ = _read_record(open_checkpoint(output))
    except SlotsmithError as e:
        return [str(e)]
    held = {m.digest: f for f, m in record.slots}
    pins = {c.pin: c for c in cast.characters}
    problems = [
        f"{output}: lacks character {c.name!r}'s pinned slot {c.pin}"
        + (f" (holds {held_name!r} in another version)" if (held_name := c.slot.name) in held.values() else "")
        for c in cast.characters
        if c.pin not in held
    ]
    problems += [
        f"{output}: holds slot {f!r} ({d}), which the cast does not pin" for d, f in held.items() if d not in pins
    ]
    problems += [
        f"{output}: holds slot {f!r} at strength {record.strength(m):g}, but a cast pins exact slots (strength 1)"
        for f, m in record.slots
        if m.digest in record.blends
    ]
    return problems
