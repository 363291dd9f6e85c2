"""Splice slots into a base, and extract a slot from a fine-tuned checkpoint.

``plan_splice`` runs every check and works out, for each output file, which
bytes come from the base and which from a slot, before a byte is written;
``execute_splice`` then streams them out (kernel-side copies, bounded memory)
through the one writer, atomically. The output keeps the base's files, key
convention, dtypes, tensor order and metadata, and adds a splice record.

A slot given at a strength other than 1 (``FILE:S``) is blended first,
tensor by tensor, into an unnamed temp file beside the output
(``blend_plan``), from which it is then copied like any slot.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import xxhash

from slotsmith.blend import BLENDABLE, blend_ranges
from slotsmith.checks import (
    fingerprint_problems,
    overlap_problems,
    raise_problems,
    record_problems,
    shape_problems,
    spliced_problems,
)
from slotsmith.digest import update_from_file
from slotsmith.errors import SlotsmithError, first_and_more
from slotsmith.inventory import Inventory, inventory_from_checkpoint
from slotsmith.io.files import InputFiles
from slotsmith.io.header import SafetensorsHeader
from slotsmith.io.writer import (
    BLOCK,
    FileRange,
    TensorOut,
    atomic_dir,
    atomic_file,
    new_file_in,
    part_nbytes,
    refuse_existing,
    refuse_input_as_output,
    write_all,
    write_error,
    write_tensors,
)
from slotsmith.manifest import Entry, Manifest
from slotsmith.progress import Progress, phase
from slotsmith.select import check_selection_args, select
from slotsmith.slot import SLOT_SUFFIX, SNAPSHOT_SUFFIX, Slot, base_region, read_slot, write_slot
from slotsmith.slotspec import SlotSpec
from slotsmith.splice_record import SPLICE_KEY, Blend, SpliceRecord, read_splice_record

COMPARE_BLOCK = 8 * 1024 * 1024
"""Read size when comparing two checkpoints' bytes."""


@dataclass(frozen=True)
class OutputFile:
    """One file of the output: its name, its tensors in data order, and metadata."""

    name: str
    tensors: tuple[TensorOut, ...]
    metadata: dict[str, str]
    data_mod: int


@dataclass(frozen=True)
class SplicePlan:
    """Everything a splice will write, decided and checked up front.

    Attributes:
        base: The base inventory.
        slots: The slots, in command-line order.
        out: The output file, or folder for a sharded base.
        files: Output files (one, or one per shard).
        index: The output index JSON object (sharded bases only).
        index_name: The index's file name (sharded bases only).
        record: The splice record written into the output.
        force: Replace an existing output.
        inputs: The open input files the output is copied from.
        stamps: ``inputs.stamps()`` taken before any check read them.
        strengths: Each slot's strength (1: its own bytes; see ``blend_plan``).
    """

    base: Inventory
    slots: tuple[Slot, ...]
    out: Path
    files: tuple[OutputFile, ...]
    index: dict | None
    index_name: str | None
    record: SpliceRecord
    force: bool
    inputs: InputFiles
    stamps: dict[Path, tuple[int, ...]]
    strengths: tuple[float, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)

    @property
    def blend_nbytes(self) -> int:
        """Bytes of the slots to blend (those at a strength other than 1)."""
        return sum(s.manifest.nbytes for s, k in zip(self.slots, self.strengths) if k != 1.0)

    def with_record(self, record: SpliceRecord) -> SplicePlan:
        """The plan with ``record`` in every output file's metadata and the index."""
        record_json = record.to_canonical_json()
        files = tuple(replace(f, metadata={**f.metadata, SPLICE_KEY: record_json}) for f in self.files)
        index = self.index
        if index is not None:
            index = {**index, "metadata": {**index["metadata"], SPLICE_KEY: record_json}}
        return replace(self, files=files, index=index, record=record)


def _label(path: Path) -> str:
    """A short name for output names: file stem, or the folder of an index."""
    if path.name.endswith(".index.json") or path.is_dir():
        return (path if path.is_dir() else path.parent).name
    return path.name.removesuffix(".safetensors").removesuffix(SLOT_SUFFIX).removesuffix(SNAPSHOT_SUFFIX)


def default_output(base_path: Path, slots: Sequence[SlotSpec], sharded: bool) -> Path:
    """``BASE+SLOT1+SLOT2@0.7[.safetensors]`` in the current folder (a folder for a sharded base)."""
    name = "+".join([_label(base_path), *(_label(s.path) + ("" if s.strength == 1.0 else f"@{s.strength:g}")
                                          for s in slots)])
    return Path.cwd() / (name if sharded else f"{name}.safetensors")


def _tensor_parts(info_start: int, nbytes: int, base_fd: int, covers: list[tuple[Entry, FileRange]]) -> tuple:
    """Parts of one output tensor: slot bytes where slots cover it, base bytes elsewhere."""
    parts: list = []
    cursor = 0
    for entry, src in sorted(covers, key=lambda c: c[0].span[0]):
        lo, hi = entry.byte_range()
        if lo > cursor:
            parts.append(FileRange(base_fd, info_start + cursor, info_start + lo))
        parts.append(src)
        cursor = hi
    if cursor < nbytes:
        parts.append(FileRange(base_fd, info_start + cursor, info_start + nbytes))
    return tuple(parts)


def check_slots(base: Inventory, slots: Sequence[Slot], files: InputFiles) -> SpliceRecord | None:
    """Every check slots must pass before they go into ``base``; ``splice`` and ``sample`` both run exactly these.

    In order (the first failure raises): an already spliced base passes
    verify's own checks of its record; each slot's tensors are in the base
    with equal shape and dtype; the slots are pairwise disjoint (slots
    already spliced into the base included); every slot tensor's hash; the
    base fingerprint. No weights are loaded: only the compared regions are read.

    Args:
        base: The base's inventory.
        slots: The slots (structure and manifest digest already checked by ``read_slot``).
        files: Where to open the base's and the slots' files.

    Returns:
        The base's own splice record, when it is a spliced checkpoint.

    Raises:
        SlotsmithError: The first failed check, naming files and tensors.
    """
    previous, differ = read_splice_record(base.checkpoint)
    if previous is not None:
        # An already spliced base must pass verify's own checks before more is spliced in.
        raise_problems(differ + record_problems(str(base.source), previous) + spliced_problems(base, previous, files))
    labelled = [(str(s.path), s.manifest) for s in slots]
    earlier = [(f"{base.source} (spliced slot {f})", m) for f, m in previous.slots] if previous else []
    for s in slots:
        raise_problems(shape_problems(s, base))
    raise_problems(overlap_problems(earlier + labelled))
    for s in slots:
        raise_problems(s.hash_problems(files))
    for s in slots:
        raise_problems(fingerprint_problems(s, base, files))
    return previous


def plan_splice(
    base_path: str | os.PathLike,
    slot_paths: Sequence[str | os.PathLike | SlotSpec],
    files: InputFiles,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> SplicePlan:
    """Check everything and plan a splice; nothing is written.

    Checks, in order (the first failure raises): output name free (or
    ``force``) and not an input; each slot's structure and manifest digest;
    slot tensors present in the base with equal shape and dtype; pairwise
    disjointness per row range (slots already spliced into the base
    included); every slot tensor's hash; the base fingerprint (layout
    digest, then the base's bytes of every replaced region); a strength
    other than 1 only on float tensors.

    Args:
        base_path: Base checkpoint (file, index JSON or folder).
        slot_paths: Slot files, at least one; a ``SlotSpec`` gives a strength
            (then ``blend_plan`` must run before ``execute_splice``).
        files: Where input files are opened (kept open for ``execute_splice``).
        out: Output file (folder for a sharded base); default from the names.
        force: Allow replacing an existing output.

    Returns:
        The plan.

    Raises:
        SlotsmithError: The first failed check, naming files and tensors.
    """
    if not slot_paths:
        raise SlotsmithError("give at least one slot")
    base = inventory_from_checkpoint(base_path)
    ckpt = base.checkpoint
    specs = [p if isinstance(p, SlotSpec) else SlotSpec(Path(p)) for p in slot_paths]
    out = Path(out) if out is not None else default_output(Path(base_path), specs, ckpt.sharded)
    refuse_existing(out, force)
    slots = tuple(read_slot(p.path) for p in specs)
    for spec, slot in zip(specs, slots):
        odd = [e for e in slot.manifest.entries if e.dtype not in BLENDABLE]
        if spec.strength != 1.0 and odd:
            raise SlotsmithError(
                f"{slot.path}: strength {spec.strength:g} needs float tensors ({', '.join(BLENDABLE)}), "
                f"but tensor {odd[0].name!r} is {odd[0].dtype}"
            )
    refuse_input_as_output(out, [*base.checkpoint.paths, *(s.path for s in slots)])
    # Every input is opened (and stamped) before its bytes are checked: execute_splice
    # compares the stamps at the end, so the bytes written are the bytes checked.
    for path in [*(h.path for h in ckpt.files), *(s.path for s in slots)]:
        files.fd(path)
    stamps = files.stamps()

    previous = check_slots(base, slots, files)

    covers: dict[str, list[tuple[Entry, FileRange]]] = {}
    for s in slots:
        fd = files.fd(s.path)
        for e in s.manifest.entries:
            info = s.info(e.name)
            covers.setdefault(e.name, []).append((e, FileRange(fd, info.start, info.end)))

    canonical = {key: name for name, key in base.keys.items()}
    tensors = {h.path: _file_tensors(h, canonical, covers, files) for h in ckpt.files}
    record = SpliceRecord(
        previous.base_layout_digest if previous else base.layout_digest(),
        previous.base_source if previous else (ckpt.index_path.parent.name if ckpt.sharded else ckpt.path.name),
        (*(previous.slots if previous else ()), *((s.path.name, s.manifest) for s in slots)),
        blends=dict(previous.blends) if previous else {},
    )
    record_json = record.to_canonical_json()
    outputs = [
        OutputFile(
            h.path.name if ckpt.sharded else out.name,
            tensors[h.path],
            {**h.metadata, SPLICE_KEY: record_json},
            h.data_start % BLOCK,
        )
        for h in ckpt.files
    ]

    index = None
    if ckpt.sharded:
        index = {
            **ckpt.index,
            "metadata": {**ckpt.index_metadata, SPLICE_KEY: record_json},
            "weight_map": {k: h.path.name for k, (h, _) in ckpt.tensors.items()},
        }
    return SplicePlan(
        base, slots, out, tuple(outputs), index, ckpt.index_path.name if ckpt.sharded else None, record, force,
        files, stamps, tuple(p.strength for p in specs),
    )


def _file_tensors(
    header: SafetensorsHeader,
    canonical: dict[str, str],
    covers: dict[str, list[tuple[Entry, FileRange]]],
    files: InputFiles,
) -> tuple[TensorOut, ...]:
    """One output file's tensors in data order: base bytes, slot bytes where slots cover them."""
    base_fd = files.fd(header.path)
    tensors = []
    for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
        mine = covers.get(canonical[key], [])
        parts = _tensor_parts(info.start, info.nbytes, base_fd, mine)
        tensors.append(TensorOut(key, info.dtype, info.shape, parts))
    return tuple(tensors)


def seal_plan(plan: SplicePlan, progress: Callable[[int], None] | None = None) -> SplicePlan:
    """Add the digest of every output tensor to a planned splice's record.

    The digests are hashed from the bytes the output will be written from
    (base and slot ranges), so this reads every byte of the base once; with
    them, ``verify`` detects a byte changed anywhere in the output without
    the base.

    Args:
        plan: From ``plan_splice`` (its input files still open).
        progress: Called with each count of bytes hashed.

    Returns:
        The plan with a sealed record (in every file's metadata and the index).

    Raises:
        OSError: An input cannot be read.
    """
    canonical = {key: name for name, key in plan.base.keys.items()}
    seal = {}
    for f in plan.files:
        for t in f.tensors:
            h = xxhash.xxh3_128()
            for part in t.parts:
                if isinstance(part, FileRange):
                    update_from_file(h, part.fd, part.start, part.end)
                else:
                    h.update(part)
                if progress is not None:
                    progress(part_nbytes(part))
            seal[canonical[t.key]] = h.hexdigest()
    return plan.with_record(replace(plan.record, seal=seal))


def blend_plan(plan: SplicePlan, spool: int, progress: Callable[[int], None] | None = None) -> SplicePlan:
    """Blend the slots given at a strength other than 1 and point the plan at the blends.

    Each of their regions becomes ``base + s * (slot - base)``, computed as
    ``sample`` computes it (``slotsmith.blend``), tensor by tensor in bounded
    memory, appended to ``spool``; the output then copies those bytes where
    it would have copied the slot's, and the record gets each slot's
    strength and the digests of its blended regions.

    Args:
        plan: From ``plan_splice`` (its input files still open).
        spool: A file open for reading and writing (an unnamed temp file),
            kept open until ``execute_splice`` is done.
        progress: Called with each count of slot bytes blended.

    Returns:
        The plan (unchanged when every strength is 1).

    Raises:
        SlotsmithError: An input got shorter while it was read.
        OSError: Reading or writing failed.
    """
    swap: dict[FileRange, FileRange] = {}
    blends = dict(plan.record.blends)
    for slot, strength in zip(plan.slots, plan.strengths):
        if strength == 1.0:
            continue
        fd, digests = plan.inputs.fd(slot.path), {}
        for e in slot.manifest.entries:
            info, base = slot.info(e.name), base_region(plan.base, plan.inputs, e)
            start = os.lseek(spool, 0, os.SEEK_END)
            digests[e.name] = blend_ranges(
                (base.fd, base.start, base.end), (fd, info.start, info.end), e.dtype, strength, spool, progress
            )
            swap[FileRange(fd, info.start, info.end)] = FileRange(spool, start, start + info.nbytes)
        blends[slot.manifest.digest] = Blend(strength, digests)
    if not swap:
        return plan
    files = tuple(
        replace(f, tensors=tuple(replace(t, parts=tuple(swap.get(p, p) for p in t.parts)) for t in f.tensors))
        for f in plan.files
    )
    return replace(plan, files=files).with_record(replace(plan.record, blends=blends))


def execute_splice(plan: SplicePlan, progress: Callable[[int], None] | None = None) -> Path:
    """Write a planned splice atomically.

    Args:
        plan: From ``plan_splice`` (its input files still open).
        progress: Called with each count of data bytes written.

    Returns:
        The output path.

    Raises:
        SlotsmithError: Reading or writing failed; nothing is left at the output.
    """
    if plan.index is None:
        (f,) = plan.files
        with atomic_file(plan.out, force=plan.force) as fd:
            write_tensors(fd, f.tensors, f.metadata, data_mod=f.data_mod, progress=progress)
            _prove_inputs(plan)
        return plan.out
    with atomic_dir(plan.out, force=plan.force) as tmp:
        for f in plan.files:
            with new_file_in(tmp, f.name) as fd:
                write_tensors(fd, f.tensors, f.metadata, data_mod=f.data_mod, progress=progress)
        with new_file_in(tmp, plan.index_name) as fd:
            write_all(fd, (json.dumps(plan.index, indent=2) + "\n").encode("utf-8"))
        _prove_inputs(plan)
    return plan.out


def _prove_inputs(plan: SplicePlan) -> None:
    """Before the output is published: the inputs are unchanged since they were checked.

    Their stamps (inode, size, mtime, ctime) must be the ones taken before
    the checks, and the regions the checks hashed (every slot tensor, the
    base's bytes of every replaced region) must hash the same again.

    Raises:
        SlotsmithError: An input changed during the splice (the output is then discarded).
    """
    problems = plan.inputs.changed_since(plan.stamps)
    for s in plan.slots:
        problems = problems or s.hash_problems(plan.inputs) or fingerprint_problems(s, plan.base, plan.inputs)
    if problems:
        raise SlotsmithError(f"{first_and_more(problems)}; nothing was written")


def splice(
    base_path: str | os.PathLike,
    slot_paths: Sequence[str | os.PathLike | SlotSpec],
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    quiet: bool = True,
    seal: bool = False,
    pins: Sequence[str] | None = None,
) -> Path:
    """Check, plan and write a splice (see ``plan_splice``).

    Args:
        base_path: Base checkpoint.
        slot_paths: Slot files; a ``SlotSpec`` applies its strength (see ``blend_plan``).
        out: Output path (default from the names).
        force: Replace an existing output.
        quiet: No progress bar.
        seal: Record every output tensor's digest (see ``plan_splice``).
        pins: The manifest digest each slot must have (one per slot), as
            a cast file pins them; checked on the slots the splice reads.

    Returns:
        The output path (a file, or a folder for a sharded base).

    Raises:
        SlotsmithError: A failed check; nothing was written.
    """
    with InputFiles() as files:
        with phase("checking the slots against the base", not quiet):
            plan = plan_splice(base_path, slot_paths, files, out, force=force)
        for s, pin in zip(plan.slots, pins or (), strict=False):
            if s.manifest.digest != pin:
                raise SlotsmithError(f"{s.path}: manifest {s.manifest.digest} is not the pinned {pin}")
        with ExitStack() as spool:
            if plan.blend_nbytes:
                # Blends wait in an unnamed file on the output's filesystem: gone on any exit, however abrupt.
                try:
                    fd = spool.enter_context(tempfile.TemporaryFile(dir=plan.out.parent)).fileno()
                    with Progress("blend", plan.blend_nbytes, unit="B", show=not quiet) as bar:
                        plan = blend_plan(plan, fd, bar.update)
                except OSError as e:
                    raise write_error(plan.out, e) from None
            if seal:
                with Progress("seal", plan.nbytes, unit="B", show=not quiet) as bar:
                    plan = seal_plan(plan, bar.update)
            with Progress("splice", plan.nbytes, unit="B", show=not quiet) as bar:
                return execute_splice(plan, bar.update)


def splice_cast(
    cast_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    quiet: bool = True,
    seal: bool = False,
) -> Path:
    """Splice a cast file's pinned slots into its base (see ``slotsmith.cast``).

    Every character's slot must be present, equal to its pin and to what the
    cast says (selection, layout, expert); the base must match the cast's
    fingerprint. Then the usual splice runs, its output the cast's
    ``output`` unless ``out`` is given.

    Raises:
        SlotsmithError: A missing, unpinned or differing slot (naming both
            digests), a wrong base, no output path; nothing is written.
    """
    from slotsmith.cast import base_problems, load_cast, open_base, pinned_slots

    cast = load_cast(cast_path)
    target = Path(out) if out is not None else cast.output
    if target is None:
        raise cast.error("output", "no output path: give one here or pass -o")
    slots = pinned_slots(cast)
    base = open_base(cast)
    with InputFiles() as files:
        raise_problems(base_problems(cast, base, files))
    return splice(
        cast.base.path, [s.path for s in slots], target, force=force, quiet=quiet, seal=seal,
        pins=[c.pin for c in cast.characters],
    )


def _mismatch(a: bytes, b: bytes, last: bool) -> int:
    """Offset of the first (or ``last``) byte where two unequal, equal-length buffers differ."""
    lo, hi = 0, len(a)
    while hi - lo > 64:  # halve with C-speed slice compares, then a short scan
        mid = (lo + hi) // 2
        if last:
            lo, hi = (mid, hi) if a[mid:hi] != b[mid:hi] else (lo, mid)
        else:
            lo, hi = (lo, mid) if a[lo:mid] != b[lo:mid] else (mid, hi)
    offsets = range(hi - 1, lo - 1, -1) if last else range(lo, hi)
    return next(i for i in offsets if a[i] != b[i])


def _changed_span(fa: int, a: tuple[int, int], fb: int, b: int, progress: Callable[[int], None]) -> tuple[int, int] | None:
    """The byte span ``[first, last + 1)`` (relative to the tensor) where two tensors differ, or None.

    Reads forward to the first difference and backward to the last, so a
    tensor is read at most about once; ``progress`` gets its whole size.
    """
    start, end = a
    size, pos, first = end - start, 0, None
    while pos < size:
        n = min(COMPARE_BLOCK, size - pos)
        x, y = os.pread(fa, n, start + pos), os.pread(fb, n, b + pos)
        if x != y:
            first = pos + _mismatch(x, y, last=False)
            break
        pos += n
    if first is None:
        progress(size)
        return None
    pos = size
    while True:  # a difference exists at or after ``first``: this ends
        n = min(COMPARE_BLOCK, pos - first)
        x, y = os.pread(fa, n, start + pos - n), os.pread(fb, n, b + pos - n)
        if x != y:
            progress(size)
            return (first, pos - n + _mismatch(x, y, last=True) + 1)
        pos -= n


def extract(
    base_path: str | os.PathLike,
    tuned_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ff: float | None = None,
    ffid: int | None = None,
    algorithm: str = "v2",
    pools: int = 8,
    expert: str | None = None,
    force: bool = False,
    quiet: bool = True,
) -> Manifest:
    """Make a slot of exactly what differs between base and tuned.

    Each changed tensor becomes an entry covering the rows from its first
    changed row to its last (the whole tensor when that is all of it); with
    a v2 selection, whole tensors, as a v2 run writes them.

    Args:
        base_path: The base checkpoint (any convention, single or sharded).
        tuned_path: The fine-tuned checkpoint (same layout, any convention).
        out: The ``.slot`` to write.
        ff: With ``ffid``, the selection the changes must lie within.
        ffid: Pool id of that selection.
        algorithm: The selection's algorithm (``"v2"`` or ``"v3"``).
        pools: The selection's pool count (v3).
        expert: Wan 2.2 expert to record (``"high"``/``"low"``).
        force: Replace an existing output.
        quiet: No progress (a bar on a terminal, lines in a log otherwise).

    Returns:
        The slot's manifest.

    Raises:
        SlotsmithError: Different layouts, no changed tensor, changes outside
            the ``--ff/--ffid`` selection (naming the strays; for v3, the
            changed rows outside the selection's), existing output.
    """
    if (ff is None) != (ffid is None):
        raise SlotsmithError("give both --ff and --ffid, or neither")
    if ff is not None:
        check_selection_args(algorithm, ff, ffid, pools)
    out = Path(out)
    refuse_existing(out, force)
    base = inventory_from_checkpoint(base_path)
    tuned = inventory_from_checkpoint(tuned_path)
    refuse_input_as_output(out, [*base.checkpoint.paths, *tuned.checkpoint.paths])
    for name, spec in base.tensors.items():
        other = tuned.tensors.get(name)
        if other is None or other.shape != spec.shape or other.dtype != spec.dtype:
            found = "lacks it" if other is None else f"has {other.dtype}{list(other.shape)}"
            raise SlotsmithError(
                f"{tuned.source}: tensor {name!r}: base has {spec.dtype}{list(spec.shape)}, tuned {found}"
            )
    extra = sorted(set(tuned.tensors) - set(base.tensors))
    if extra:
        raise SlotsmithError(f"{tuned.source}: tensor {extra[0]!r} is not in the base {base.source}")

    with InputFiles() as files:
        spans: dict[str, tuple[int, int]] = {}  # changed rows per tensor
        with Progress("compare", base.checkpoint.nbytes, unit="B", show=not quiet) as bar:
            for name, spec in base.tensors.items():
                bh, bi = base.checkpoint.tensors[base.keys[name]]
                th, ti = tuned.checkpoint.tensors[tuned.keys[name]]
                span = _changed_span(files.fd(bh.path), (bi.start, bi.end), files.fd(th.path), ti.start, bar.update)
                if span is not None:
                    row = bi.nbytes // spec.shape[0] if spec.shape else bi.nbytes
                    spans[name] = (span[0] // row, -(-span[1] // row))
        if not spans:
            raise SlotsmithError(f"{tuned.source}: no tensor differs from the base {base.source}")

        selection = None
        if ff is not None:
            sel = select({n: t.shape for n, t in base.tensors.items()}, ff, ffid, algorithm, pools)
            what = f"--ff {ff} --ffid {ffid}" + (f" (v3, --pools {pools})" if sel.rows else "")
            strays = sorted(set(spans) - set(sel.tensors))
            if strays:
                raise SlotsmithError(
                    f"{tuned.source}: {len(strays)} changed tensor(s) outside {what}: {first_and_more(strays, shown=5)}"
                )
            outside = [
                f"{n} rows [{a}, {b}) (selection: [{sel.rows[n][0]}, {sel.rows[n][1]}))"
                for n, (a, b) in sorted(spans.items())
                if n in sel.rows and not (sel.rows[n][0] <= a and b <= sel.rows[n][1])
            ]
            if outside:
                raise SlotsmithError(
                    f"{tuned.source}: {len(outside)} tensor(s) changed outside the rows of {what}: "
                    f"{first_and_more(outside, shown=3, sep='; ')}"
                )
            if not sel.rows:  # v2 slots hold whole tensors
                spans = {n: (0, base.tensors[n].shape[0] if base.tensors[n].shape else 1) for n in spans}
            selection = sel.record()

        changed: dict[str, FileRange] = {}
        rows: dict[str, tuple[int, int]] = {}
        for name, (a, b) in spans.items():
            spec = base.tensors[name]
            th, ti = tuned.checkpoint.tensors[tuned.keys[name]]
            whole = not spec.shape or (a, b) == (0, spec.shape[0])
            entry = Entry(name, spec.shape, spec.dtype, None if whole else (a, b), "")
            lo, hi = entry.byte_range()
            changed[name] = FileRange(files.fd(th.path), ti.start + lo, ti.start + hi)
            if not whole:
                rows[name] = (a, b)
        provenance = {"extracted_from": {"base": Path(base.source).name, "tuned": Path(tuned.source).name}}
        return write_slot(
            out, base, changed, selection=selection, provenance=provenance, rows=rows, expert=expert, force=force
        )
