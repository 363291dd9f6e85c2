"""The cast file: who holds which slot of which base, pinned.

A cast file (YAML, committed by a team, usually ``manifests/cast.yaml``)
fully determines a spliced checkpoint, as a mergekit recipe does::

    format: slotsmith-cast/1
    base:
      path: ../models/wan2.2_t2v_low_noise_14B_bf16.safetensors
      layout: wan2.2-t2v-a14b      # a shipped layout name, or null
      expert: low                  # high, low or null
      fingerprint:
        layout_digest: "..."       # Inventory.layout_digest() of the base
        sample_digest: "..."       # see base_sample_digest
    selection:
      algorithm: v2
      ff: 0.01
      num_pools: 8
    characters:
      alice: {ffid: 1, slot: slots/alice.slot, pin: "..."}
      bob:   {ffid: 2, ff: 0.02, slot: slots/bob.slot, pin: null}
    output: out/spliced.safetensors

Paths are relative to the cast file's folder. ``pin`` is the manifest digest
of the character's current slot (``slotsmith cast pin`` writes it). The
loader is strict: an unknown key, two characters on one ffid, an ffid outside
the pools are refused with the file, the key path and the character named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from slotsmith.checks import fingerprint_problems, raise_problems, shape_problems
from slotsmith.digest import digest_bytes, digest_file_range
from slotsmith.errors import SlotsmithError
from slotsmith.inventory import Inventory, inventory_from_checkpoint, load_inventory
from slotsmith.io.files import InputFiles, check_yaml, read_input
from slotsmith.io.writer import atomic_file, write_all
from slotsmith.layout import KNOWN_MODELS
from slotsmith.manifest import Manifest
from slotsmith.select import ALGORITHM, ALGORITHMS, NUM_POOLS, Selection, select, shared_tensors
from slotsmith.slot import Slot, read_slot
from slotsmith.slotspec import parse_slot_spec
from slotsmith.train import EXPERTS

CAST_FORMAT = "slotsmith-cast/1"
CAST_CAP = 1_000_000
"""Largest cast file read, in bytes (a cast of a hundred characters is ~10 KB)."""

SAMPLE_BYTES = 64 * 1024
"""Bytes of each base tensor (its first ones) that the sample digest covers."""

STRENGTH_IN_CAST = (
    "a cast pins exact slots, so it takes no strength (FILE:S); splice one by hand: slotsmith splice BASE FILE:S"
)

_HEX128 = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP = {"format": True, "base": True, "selection": True, "characters": True, "output": False}
_BASE = {"path": True, "layout": False, "expert": False, "fingerprint": False}
_FINGERPRINT = {"layout_digest": False, "sample_digest": False}
_SELECTION = {"algorithm": True, "ff": False, "num_pools": False}
_CHARACTER = {"ffid": True, "slot": True, "ff": False, "pin": False}


@dataclass(frozen=True)
class CastBase:
    """The base every slot of the cast is made on.

    Attributes:
        path: The base checkpoint (resolved against the cast's folder).
        layout: Shipped layout name, or None.
        expert: Wan 2.2 expert (``"high"``/``"low"``), or None.
        layout_digest: ``Inventory.layout_digest()`` of the base, or None (not pinned yet).
        sample_digest: ``base_sample_digest`` of the base, or None.
    """

    path: Path
    layout: str | None
    expert: str | None
    layout_digest: str | None
    sample_digest: str | None


@dataclass(frozen=True)
class Character:
    """One character: its pool, its slot file and the slot it is pinned to.

    Attributes:
        name: The character's name (a key of ``characters``).
        ffid: Pool id.
        ff: Fraction of the model (its own, or the selection's).
        slot: The slot file (resolved against the cast's folder).
        pin: Manifest digest of the current slot, or None (not pinned yet).
    """

    name: str
    ffid: int
    ff: float
    slot: Path
    pin: str | None

    @property
    def where(self) -> str:
        """The key path of this character, for messages."""
        return f"characters.{self.name}"


@dataclass(frozen=True)
class Cast:
    """A validated cast file.

    Attributes:
        path: The cast file.
        base: The base.
        algorithm: Selection algorithm name.
        num_pools: Number of disjoint pools.
        characters: In file order.
        output: The spliced checkpoint (resolved), or None.
    """

    path: Path
    base: CastBase
    algorithm: str
    num_pools: int
    characters: tuple[Character, ...]
    output: Path | None

    def character(self, name: str) -> Character:
        """The character called ``name``.

        Raises:
            SlotsmithError: No such character (the known ones are listed).
        """
        for c in self.characters:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.characters)
        raise SlotsmithError(f"{self.path}: no character {name!r} (the cast has {known})")

    def selection_record(self, c: Character) -> dict:
        """The ``selection`` a slot of ``c`` must record in its manifest."""
        return {"algorithm": self.algorithm, "ff": c.ff, "ffid": c.ffid, "num_pools": self.num_pools}

    def error(self, key: str, problem: str) -> SlotsmithError:
        """A one-line error naming this file and the key path."""
        return SlotsmithError(f"{self.path}: {key}: {problem}")


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses aliases (a cast needs none: no alias bombs) and duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    if not os.path.lexists(path):
        raise SlotsmithError(f"{path}: no such cast file")
    raw = read_input(path, CAST_CAP, "cast file")  # the reader rule: regular files only, capped
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SlotsmithError(f"{path}: not valid UTF-8") from None
    check_yaml(text, str(path), bound_ints=False)  # nesting and size bounded before the strict loader builds anything
    return text


def _parse_yaml(text: str, path: Path) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SlotsmithError(f"{path}: not a valid cast file ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise SlotsmithError(f"{path}: not a valid cast file (nested too deeply)") from None


def _fields(path: Path, key: str, obj: object, spec: dict[str, bool]) -> dict:
    """``obj`` must be a mapping with the required keys of ``spec`` and no others."""
    if not isinstance(obj, dict):
        raise SlotsmithError(f"{path}: {key or 'the file'}: must be a mapping")
    for k in obj:
        if k not in spec:
            where = f"{key}.{k}" if key else str(k)
            raise SlotsmithError(f"{path}: {where}: unknown key (known: {', '.join(spec)})")
    for k, required in spec.items():
        if required and k not in obj:
            raise SlotsmithError(f"{path}: {f'{key}.{k}' if key else k}: missing")
    return obj


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _hex_or_none(path: Path, key: str, value: object, who: str = "") -> str | None:
    if value is None or (isinstance(value, str) and _HEX128.match(value)):
        return value
    raise SlotsmithError(f"{path}: {key}: {who}must be 32 lowercase hex digits or null, got {value!r}")


def _path(path: Path, key: str, value: object, who: str = "") -> Path:
    if not isinstance(value, str) or not value.strip():
        raise SlotsmithError(f"{path}: {key}: {who}must be a file path")
    return path.parent / value


def _slot_path(path: Path, key: str, value: object, who: str) -> Path:
    """A character's slot file, refusing a ``FILE:S`` strength."""
    slot = _path(path, key, value, who)
    try:
        has_strength = parse_slot_spec(value).path != Path(value)
    except SlotsmithError:  # not a number after the colon: a file name, which will be found missing
        has_strength = False
    if has_strength:
        raise SlotsmithError(f"{path}: {key}: {who}{STRENGTH_IN_CAST}")
    return slot


def _ff(path: Path, key: str, value: object, who: str) -> float:
    if not _number(value) or not 0 < value <= 1:
        raise SlotsmithError(f"{path}: {key}: {who}ff {value!r} must be a number in (0, 1]")
    return float(value)


def cast_from_text(text: str, path: Path) -> Cast:
    """Validate a cast file's text strictly (no other file is read).

    Args:
        text: The YAML.
        path: The file it came from: names it in errors, and relative paths
            are resolved against its folder.

    Returns:
        The cast.

    Raises:
        SlotsmithError: ``FILE: KEY.PATH: problem`` for the first problem:
            invalid YAML, an unknown or missing key, a wrong type, an unknown
            layout, algorithm or expert, an ffid outside the pools, two
            characters on one ffid, a malformed digest.
    """
    doc = _fields(path, "", _parse_yaml(text, path), _TOP)
    if doc["format"] != CAST_FORMAT:
        raise SlotsmithError(f"{path}: format: {doc['format']!r} is not {CAST_FORMAT!r}")

    base = _fields(path, "base", doc["base"], _BASE)
    layout, expert = base.get("layout"), base.get("expert")
    if layout is not None and layout not in KNOWN_MODELS:
        raise SlotsmithError(f"{path}: base.layout: {layout!r} is not a shipped layout ({', '.join(KNOWN_MODELS)})")
    if expert is not None and expert not in EXPERTS:
        raise SlotsmithError(f"{path}: base.expert: {expert!r} is not one of {', '.join(EXPERTS)} (or null)")
    fp = _fields(path, "base.fingerprint", base.get("fingerprint") or {}, _FINGERPRINT)
    cast_base = CastBase(
        _path(path, "base.path", base["path"]),
        layout,
        expert,
        _hex_or_none(path, "base.fingerprint.layout_digest", fp.get("layout_digest")),
        _hex_or_none(path, "base.fingerprint.sample_digest", fp.get("sample_digest")),
    )

    sel = _fields(path, "selection", doc["selection"], _SELECTION)
    algorithm = sel["algorithm"]
    if algorithm not in ALGORITHMS:
        raise SlotsmithError(f"{path}: selection.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    pools = sel.get("num_pools", NUM_POOLS)
    if not isinstance(pools, int) or isinstance(pools, bool) or not 1 <= pools <= 64:
        raise SlotsmithError(f"{path}: selection.num_pools: {pools!r} must be an integer in 1..64")
    default_ff = None if sel.get("ff") is None else _ff(path, "selection.ff", sel["ff"], "")

    chars = doc["characters"]
    if not isinstance(chars, dict) or not chars:
        raise SlotsmithError(f"{path}: characters: must be a mapping of at least one character")
    characters: list[Character] = []
    by_ffid: dict[int, str] = {}
    for name, body in chars.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise SlotsmithError(
                f"{path}: characters.{name}: a character's name must be letters, digits, '_', '.' or '-'"
            )
        key, who = f"characters.{name}", f"character {name!r}: "
        body = _fields(path, key, body, _CHARACTER)
        ffid = body["ffid"]
        if not isinstance(ffid, int) or isinstance(ffid, bool) or not 0 <= ffid < pools:
            raise SlotsmithError(f"{path}: {key}.ffid: {who}ffid {ffid!r} is outside the pools 0..{pools - 1}")
        if ffid in by_ffid:
            raise SlotsmithError(
                f"{path}: {key}.ffid: {who}ffid {ffid} is already held by character {by_ffid[ffid]!r}"
            )
        by_ffid[ffid] = name
        if body.get("ff") is not None:
            ff = _ff(path, f"{key}.ff", body["ff"], who)
        elif default_ff is not None:
            ff = default_ff
        else:
            raise SlotsmithError(f"{path}: {key}.ff: {who}no ff here and no selection.ff to fall back on")
        characters.append(
            Character(
                name,
                ffid,
                ff,
                _slot_path(path, f"{key}.slot", body["slot"], who),
                _hex_or_none(path, f"{key}.pin", body.get("pin"), who),
            )
        )
    output = doc.get("output")
    return Cast(
        path,
        cast_base,
        algorithm,
        pools,
        tuple(characters),
        None if output is None else _path(path, "output", output),
    )


def load_cast(path: str | os.PathLike) -> Cast:
    """Read and validate a cast file (see ``cast_from_text``).

    Raises:
        SlotsmithError: The file cannot be read, or is not a valid cast.
    """
    path = Path(path)
    return cast_from_text(_read_text(path), path)


def base_sample_digest(base: Inventory, files: InputFiles) -> str:
    """A digest that tells one base from another of the same layout, cheaply.

    The xxh3-128 of the first ``SAMPLE_BYTES`` of every tensor, in canonical
    name order (so any key convention or sharding gives one digest): about
    70 MB of a 28 GB Wan 14B, enough to tell apart its two experts or a
    fine-tuned copy.

    Raises:
        SlotsmithError: The inventory has no checkpoint behind it.
    """
    if base.checkpoint is None:
        raise SlotsmithError(f"{base.source}: a base checkpoint is needed, not a layout")
    parts = []
    for name in sorted(base.tensors):
        header, info = base.checkpoint.tensors[base.keys[name]]
        end = min(info.end, info.start + SAMPLE_BYTES)
        parts.append(digest_file_range(files.fd(header.path), info.start, end))
    return digest_bytes("".join(parts).encode("ascii"))


def base_problems(cast: Cast, base: Inventory, files: InputFiles) -> list[str]:
    """Whether ``base`` is the cast's base: layout (and expert layout), then the sample digest.

    Returns:
        Problem lines (a fingerprint not recorded yet is not checked).
    """
    problems = []
    fp = cast.base
    if fp.layout is not None and fp.layout not in base.matching_models():
        problems.append(f"{cast.path}: base.layout: {base.source} does not have the layout of {fp.layout}")
    digest = base.layout_digest()
    if fp.layout_digest is not None and digest != fp.layout_digest:
        problems.append(
            f"{cast.path}: base.fingerprint.layout_digest: the cast records {fp.layout_digest}, "
            f"but {base.source} has {digest}"
        )
    elif fp.sample_digest is not None:
        sample = base_sample_digest(base, files)
        if sample != fp.sample_digest:
            problems.append(
                f"{cast.path}: base.fingerprint.sample_digest: the cast records {fp.sample_digest}, "
                f"but {base.source} has {sample}: another base of the same layout"
            )
    return problems


def open_base(cast: Cast, base: str | os.PathLike | None = None) -> Inventory:
    """The cast's base checkpoint (or ``base`` instead of its path).

    Raises:
        SlotsmithError: The file is missing or not a checkpoint.
    """
    path = Path(base) if base is not None else cast.base.path
    if not path.exists():
        raise cast.error("base.path", f"{path}: no such base checkpoint")
    return inventory_from_checkpoint(path)


def read_character_slot(cast: Cast, c: Character) -> Slot:
    """Read a character's slot file (structure and manifest digest).

    Raises:
        SlotsmithError: Missing or invalid, naming the cast, the key path and the character.
    """
    if not c.slot.exists():
        raise cast.error(f"{c.where}.slot", f"character {c.name!r}: slot file {c.slot} is missing")
    try:
        return read_slot(c.slot)
    except SlotsmithError as e:
        raise cast.error(f"{c.where}.slot", f"character {c.name!r}: {e}") from None


def pin_problems(cast: Cast, c: Character, m: Manifest) -> list[str]:
    """Whether a character's slot is the one its pin names."""
    if c.pin is None:
        return [f"{cast.path}: {c.where}.pin: character {c.name!r} is not pinned (run `slotsmith cast pin`)"]
    if m.digest != c.pin:
        return [
            f"{cast.path}: {c.where}.pin: character {c.name!r}: {c.slot} has manifest {m.digest}, "
            f"the cast pins {c.pin}"
        ]
    return []


def slot_problems(cast: Cast, c: Character, m: Manifest) -> list[str]:
    """Whether a character's slot is what the cast says: its selection, layout and expert.

    Compares the manifest's records only (no file is read): the selection
    must be the character's ``ffid``/``ff`` under the cast's algorithm and
    pools, and the base the slot claims must be the cast's.
    """
    who = f"{cast.path}: {c.where}: character {c.name!r}: {c.slot}"
    problems = []
    want, have = cast.selection_record(c), m.selection or {}
    if {k: have.get(k) for k in want} != want:
        got = ", ".join(f"{k} {have.get(k)!r}" for k in want)
        wanted = ", ".join(f"{k} {v!r}" for k, v in want.items())
        problems.append(f"{who} records selection {got}, the cast wants {wanted}")
    fp = cast.base
    if fp.layout_digest is not None and m.base.layout_digest != fp.layout_digest:
        problems.append(f"{who} was made on layout {m.base.layout_digest}, the cast's base has {fp.layout_digest}")
    if m.expert != fp.expert:
        problems.append(f"{who} is for expert {m.expert!r}, the cast's base is expert {fp.expert!r}")
    if fp.layout is not None and m.base.layout is not None and m.base.layout != fp.layout:
        problems.append(f"{who} names layout {m.base.layout!r}, the cast's base is {fp.layout!r}")
    return problems


def pinned_slots(cast: Cast) -> list[Slot]:
    """Every character's slot, each equal to its pin and to what the cast says.

    Raises:
        SlotsmithError: The first missing, unpinned or differing slot.
    """
    slots = []
    for c in cast.characters:
        slot = read_character_slot(cast, c)
        raise_problems(pin_problems(cast, c, slot.manifest) + slot_problems(cast, c, slot.manifest))
        slots.append(slot)
    return slots


# --- cast pin: a line-level edit, so comments and order survive ---------------------------------


def _node_at(root: yaml.Node, keys: tuple[str, ...]) -> tuple[yaml.MappingNode, yaml.Node | None]:
    """The mapping that holds ``keys[-1]`` and the value node there (None if the key is absent)."""
    node = root
    for i, key in enumerate(keys):
        assert isinstance(node, yaml.MappingNode)
        found = next((v for k, v in node.value if k.value == key), None)
        if i == len(keys) - 1:
            return node, found
        node = found
    raise AssertionError("empty key path")


def _insertion(text: str, mapping: yaml.MappingNode, items: list[str]) -> tuple[int, int, str]:
    """The edit that adds ``items`` (``key: value`` each) as the last entries of ``mapping``."""
    if mapping.flow_style:
        end = mapping.end_mark.index - 1  # the closing brace
        return (end, end, (", " if mapping.value else "") + ", ".join(items))
    indent = " " * mapping.value[0][0].start_mark.column
    lines = "".join(f"{indent}{item}\n" for item in items)
    last = mapping.value[-1][1]
    if isinstance(last, yaml.ScalarNode) or last.flow_style:
        # On new lines after the line the last value ends on (its comment included).
        line_end = text.find("\n", last.end_mark.index)
        if line_end < 0:
            return (len(text), len(text), "\n" + lines.rstrip("\n"))
        return (line_end + 1, line_end + 1, lines)
    # A nested block ends where the next token starts: insert at the start of that line.
    if last.end_mark.index >= len(text.rstrip()):
        return (len(text), len(text), ("" if text.endswith("\n") else "\n") + lines)
    at = text.rfind("\n", 0, last.end_mark.index) + 1
    return (at, at, lines)


def _quoted(value: str) -> str:
    # Quoted, so a digest of digits only is never read back as a number.
    return f'"{value}"'


def set_values(text: str, values: dict[tuple[str, ...], str]) -> str:
    """Set scalar values in a YAML text by editing only their characters.

    A key that is present has its value replaced in place; an absent key is
    added to its mapping (as a line in block style, before the closing brace
    in flow style). Everything else (comments, order, quoting, blank lines)
    is kept byte for byte.

    Args:
        text: The YAML (already validated as a cast, so every parent mapping exists).
        values: Key path -> new string value (written double-quoted).

    Returns:
        The edited text.
    """
    root = yaml.compose(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    edits: list[tuple[int, int, str]] = []
    added: dict[int, list[str]] = {}  # mapping node -> items to add, in order
    mappings = {}
    for keys, value in values.items():
        mapping, node = _node_at(root, keys)
        if node is not None:
            edits.append((node.start_mark.index, node.end_mark.index, _quoted(value)))
        else:
            mappings[id(mapping)] = mapping
            added.setdefault(id(mapping), []).append(f"{keys[-1]}: {_quoted(value)}")
    for key, items in added.items():
        edits.append(_insertion(text, mappings[key], items))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


@dataclass(frozen=True)
class PinChange:
    """One value ``cast pin`` wrote: the key path, the old and the new value."""

    key: str
    old: str | None
    new: str


def pin_cast(
    path: str | os.PathLike, *, base: str | os.PathLike | None = None, dry_run: bool = False
) -> list[PinChange]:
    """Pin every character to its current slot; fill in the base fingerprint.

    Each slot must be present and be what the cast says (its selection, base
    layout and expert); its manifest digest becomes the character's ``pin``.
    An empty ``layout_digest`` is taken from the base when it is present,
    else from the slots (which must agree); an empty ``sample_digest`` is
    computed when the base is present. A recorded fingerprint the base
    contradicts is refused. The file is replaced atomically, changed only
    where the values are.

    Args:
        path: The cast file.
        base: The base checkpoint, instead of the cast's ``base.path``.
        dry_run: Work out the changes but write nothing.

    Returns:
        The changed values (empty when everything was pinned already).

    Raises:
        SlotsmithError: A missing or mismatching slot, a base that is not the
            cast's; nothing is written.
    """
    path = Path(path)
    text = _read_text(path)
    cast = cast_from_text(text, path)
    slots = {c.name: read_character_slot(cast, c) for c in cast.characters}
    manifests = {name: s.manifest for name, s in slots.items()}
    for c in cast.characters:
        raise_problems(slot_problems(cast, c, manifests[c.name]))
    values: dict[tuple[str, ...], tuple[str | None, str]] = {}
    base_path = Path(base) if base is not None else cast.base.path
    fp = cast.base
    if base_path.exists():
        inv = inventory_from_checkpoint(base_path)
        if fp.layout_digest is None:
            values[("base", "fingerprint", "layout_digest")] = (None, inv.layout_digest())
        with InputFiles() as files:
            raise_problems(base_problems(cast, inv, files))
            for slot in slots.values():
                # Reads only the base's bytes of each slot's regions: a pin certifies the slot fits this base.
                raise_problems(shape_problems(slot, inv) or fingerprint_problems(slot, inv, files))
            if fp.sample_digest is None:
                values[("base", "fingerprint", "sample_digest")] = (None, base_sample_digest(inv, files))
    elif fp.layout_digest is None:
        digests = {m.base.layout_digest for m in manifests.values()}
        if len(digests) > 1:
            raise cast.error("base.fingerprint.layout_digest", "the slots were made on bases of different layouts")
        values[("base", "fingerprint", "layout_digest")] = (None, digests.pop())
    for c in cast.characters:
        if c.pin != manifests[c.name].digest:
            values[("characters", c.name, "pin")] = (c.pin, manifests[c.name].digest)
    changes = [PinChange(".".join(k), old, new) for k, (old, new) in values.items()]
    if not changes or dry_run:
        return changes
    if ("base", "fingerprint", "layout_digest") in values or ("base", "fingerprint", "sample_digest") in values:
        text = _ensure_fingerprint(text)
    new_text = set_values(text, {k: new for k, (_, new) in values.items()})
    # Read the edit back: what is written must be the same cast with exactly the new values.
    new_fp = {k[-1]: new for k, (_, new) in values.items() if k[0] == "base"}
    expected = replace(
        cast,
        base=replace(cast.base, **new_fp),
        characters=tuple(replace(c, pin=manifests[c.name].digest) for c in cast.characters),
    )
    if cast_from_text(new_text, path) != expected:
        raise SlotsmithError(f"{path}: cannot pin this file by a line edit; nothing was written")
    with atomic_file(path, force=True) as fd:
        write_all(fd, new_text.encode("utf-8"))
    return changes


def _ensure_fingerprint(text: str) -> str:
    """Add an empty ``fingerprint: {}`` under ``base`` when the cast has none, so values can go in."""
    root = yaml.compose(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    mapping, node = _node_at(root, ("base", "fingerprint"))
    if node is not None and isinstance(node, yaml.MappingNode):
        return text
    if node is not None:  # fingerprint: null
        return text[: node.start_mark.index] + "{}" + text[node.end_mark.index :]
    start, end, new = _insertion(text, mapping, ["fingerprint: {}"])
    return text[:start] + new + text[end:]


# --- plan --cast ---------------------------------------------------------------------------------


def cast_layout(cast: Cast) -> Inventory:
    """What the cast's selections run on: its shipped layout, else the base file's header.

    Raises:
        SlotsmithError: No layout named and the base file is missing.
    """
    if cast.base.layout is not None:
        return load_inventory(cast.base.layout)
    if not cast.base.path.exists():
        raise cast.error("base.layout", f"give a shipped layout name here, or make {cast.base.path} present")
    return inventory_from_checkpoint(cast.base.path)


def cast_selections(cast: Cast, layout: Inventory) -> dict[str, Selection]:
    """Each character's selection on ``layout``.

    Raises:
        SlotsmithError: A character's ff cannot be served, naming it.
    """
    out = {}
    shapes = {n: t.shape for n, t in layout.tensors.items()}
    for c in cast.characters:
        try:
            out[c.name] = select(shapes, c.ff, c.ffid, cast.algorithm, cast.num_pools)
        except SlotsmithError as e:
            raise cast.error(c.where, f"character {c.name!r}: {e}") from None
    return out


def cast_plan_json(cast: Cast) -> dict:
    """The allocation of a cast: per character its pool, share, blocks; free pools, overlaps, warnings.

    Raises:
        SlotsmithError: No layout to plan on, or a selection that cannot be served.
    """
    from slotsmith.plan import block_shares, warnings_for

    layout = cast_layout(cast)
    selections = cast_selections(cast, layout)
    rows = []
    for c in cast.characters:
        s = selections[c.name]
        shares = block_shares(layout, s)
        rows.append(
            {
                "character": c.name,
                "ffid": c.ffid,
                "ff": c.ff,
                "params": s.selected_params,
                "fraction": s.selected_params / s.total_params,
                "tensors": len(s.tensors),
                "blocks_covered": sum(1 for b in shares if b.selected_params),
                "num_blocks": len(shares),
                "slot": str(c.slot),
                "pin": c.pin,
                "warnings": warnings_for(layout, s, shares),
            }
        )
    overlaps = []
    for i, a in enumerate(cast.characters):
        for b in cast.characters[i + 1 :]:
            shared = shared_tensors(selections[a.name], selections[b.name])
            if shared:
                overlaps.append({"characters": [a.name, b.name], "tensors": shared})
    taken = {c.ffid for c in cast.characters}
    return {
        "cast": str(cast.path),
        "model": layout.source,
        "expert": cast.base.expert,
        "algorithm": cast.algorithm,
        "num_pools": cast.num_pools,
        "characters": rows,
        "free_ffids": [k for k in range(cast.num_pools) if k not in taken],
        "overlaps": overlaps,
    }


def render_cast_plan(doc: dict) -> str:
    """``cast_plan_json``'s document as a table for humans."""
    expert = f", expert {doc['expert']}" if doc["expert"] else ""
    lines = [f"cast {doc['cast']}: {doc['model']}{expert}, selection {doc['algorithm']}, {doc['num_pools']} pools", ""]
    table = [("CHARACTER", "FFID", "FF", "PARAMS", "SHARE", "BLOCKS", "PIN")] + [
        (
            r["character"],
            str(r["ffid"]),
            f"{r['ff']:g}",
            f"{r['params']:,}",
            f"{r['fraction']:.3%}",
            f"{r['blocks_covered']}/{r['num_blocks']}",
            r["pin"][:12] if r["pin"] else "unpinned",
        )
        for r in doc["characters"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = (v.rjust(w) if i in (1, 3, 4) else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(f"free ffids: {', '.join(map(str, doc['free_ffids'])) or 'none'}")
    if doc["overlaps"]:
        for o in doc["overlaps"]:
            a, b = o["characters"]
            lines.append(f"OVERLAP: {a} and {b} share {len(o['tensors'])} tensor(s), first {o['tensors'][0]}")
    else:
        lines.append("overlaps: none (every character's tensors are its own)")
    for r in doc["characters"]:
        for w in r["warnings"]:
            lines.append(f"warning: {r['character']}: {w}")
    return "\n".join(lines) + "\n"


# --- train --cast --------------------------------------------------------------------------------


def train_values(cast_path: str | os.PathLike, character: str) -> dict:
    """The training options a cast fixes for one character: base, out, ff, ffid, expert.

    The base is checked against the cast's fingerprint first (header and a
    ~64 KB sample per tensor), so a wrong base is refused before training.

    Raises:
        SlotsmithError: No such character, a missing base, or a base that is not the cast's.
    """
    cast = load_cast(cast_path)
    c = cast.character(character)
    inv = open_base(cast)
    with InputFiles() as files:
        raise_problems(base_problems(cast, inv, files))
    return {
        "base": str(cast.base.path),
        "out": str(c.slot),
        "ff": c.ff,
        "ffid": c.ffid,
        "expert": cast.base.expert,
    }


def new_cast_text(
    *,
    base: str,
    layout: str | None,
    expert: str | None,
    ff: float,
    characters: dict[str, tuple[int, str]],
    output: str | None,
    comment: str = "",
    algorithm: str = ALGORITHM,
    num_pools: int = NUM_POOLS,
) -> str:
    """A new cast file's text (unpinned; ``pin_cast`` fills in the digests).

    Args:
        base: Base path, relative to the cast's folder.
        layout: Shipped layout name, or None.
        expert: Wan 2.2 expert, or None.
        ff: The selection's ff.
        characters: Name -> (ffid, slot path relative to the cast's folder).
        output: The spliced checkpoint's path, or None.
        comment: A first comment line.
        algorithm: The selection's algorithm (``"v2"`` or ``"v3"``).
        num_pools: The selection's pool count.

    Returns:
        The YAML text.
    """
    doc = {
        "format": CAST_FORMAT,
        "base": {"path": base, "layout": layout, "expert": expert,
                 "fingerprint": {"layout_digest": None, "sample_digest": None}},
        "selection": {"algorithm": algorithm, "ff": ff, "num_pools": num_pools},
        "characters": {n: {"ffid": k, "slot": s, "pin": None} for n, (k, s) in characters.items()},
        "output": output,
    }
    head = f"# {comment}\n" if comment else ""
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_new_cast(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    """Write a new cast file atomically (validated first).

    Raises:
        SlotsmithError: Invalid text, or the file exists without ``force``.
    """
    path = Path(path)
    cast_from_text(text, path)
    with atomic_file(path, force=force) as fd:
        write_all(fd, text.encode("utf-8"))
    return path
