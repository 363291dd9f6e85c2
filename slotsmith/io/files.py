"""Opening and parsing input files: the one rule every reader follows.

Every file slotsmith reads (safetensors headers, index JSON, layout, dataset
and training YAML, a base's config, cache index, resume state) is opened with
``open_input``: regular files only after following links (a FIFO or
``/dev/zero`` would hang or never end), and every ``OSError`` (a link loop,
a name over the system's limit, no permission...) becomes one line naming the
file. JSON and YAML are read whole with ``read_input`` under a size cap taken
before parsing, then parsed with ``parse_json`` / ``parse_yaml``: nesting
depth is bounded (no recursion error), integers are bounded before anything
formats or uses them (Python refuses to print ints over 4300 digits), and
YAML aliases are expanded only within a node budget (no "billion laughs").
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import ExitStack
from pathlib import Path

from slotsmith.errors import SlotsmithError

MAX_DEPTH = 64
"""Deepest nesting accepted in a JSON or YAML document (slotsmith's own formats need under 10)."""

MAX_INT_DIGITS = 20
"""Most decimal digits of an integer in a JSON or YAML document: 2^64 has 20."""

YAML_NODE_BUDGET = 100_000
"""Most YAML nodes, aliases expanded (the largest shipped layout has about 9,000)."""

YAML_CAP = 8_000_000
"""Largest YAML file read, in bytes (the shipped layouts are under 100 KB)."""

_REASONS = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a directory",
}

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def os_error(path: str | os.PathLike, e: OSError, doing: str = "cannot read") -> SlotsmithError:
    """The one line for an ``OSError`` on ``path``: ``PATH: <what went wrong>``.

    Args:
        path: The file.
        e: The error.
        doing: What failed, for errors without a plain reason (``cannot read``).

    Returns:
        The error to raise.
    """
    reason = _REASONS.get(e.errno)
    return SlotsmithError(f"{path}: {reason}" if reason else f"{path}: {doing} ({e.strerror or e})")


def safe_repr(value: object, limit: int = 60) -> str:
    """A short, one-line repr of a value read from a file, for messages.

    Strings are cut to ``limit`` characters (``repr`` escapes their control
    characters); anything but a short scalar is named by its type, so a
    hostile value can neither flood a message nor recurse.
    """
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, bool | float) or (isinstance(value, int) and int_digits(value) <= MAX_INT_DIGITS):
        return repr(value)
    return f"a {type(value).__name__}"


def open_input(path: str | os.PathLike, what: str = "file") -> int:
    """Open a regular file for reading, links followed.

    Opened without blocking (a FIFO would otherwise block in ``open``) and
    checked with ``fstat`` on the open descriptor, so what is checked is what
    is read.

    Args:
        path: The file.
        what: What the file should be, for the messages (``"safetensors file"``).

    Returns:
        A read-only descriptor; the caller closes it.

    Raises:
        SlotsmithError: Missing, a folder, not a regular file, or any OSError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise os_error(path, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SlotsmithError(f"{path}: is a directory, not a {what}")
        if not stat.S_ISREG(mode):
            raise SlotsmithError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (links followed); False when it does not exist.

    Raises:
        SlotsmithError: Any other OSError (a link loop, a name too long...).
    """
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise os_error(path, e) from None


def read_input(path: str | os.PathLike, cap: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes (size checked before reading).

    Raises:
        SlotsmithError: See ``open_input``; over the cap; a read error.
    """
    fd = open_input(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise SlotsmithError(f"{path}: {what} is {size} bytes, over the {cap}-byte cap")
        chunks, total = [], 0
        while total <= cap:  # the file may grow while read: never take more than the cap
            chunk = os.read(fd, min(cap + 1 - total, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise SlotsmithError(f"{path}: {what} is over the {cap}-byte cap")
        return b"".join(chunks)
    except OSError as e:
        raise os_error(path, e) from None
    finally:
        os.close(fd)


def int_digits(n: int) -> int:
    """Decimal digits of ``|n|``, without formatting it (approximate by at most one)."""
    return max(1, int(abs(n).bit_length() * 0.30103) + 1)


def check_tree(obj: object, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a decoded document nested deeper than ``max_depth`` or holding huge integers.

    Iterative, so it cannot itself overflow the stack.

    Raises:
        SlotsmithError: Names ``what`` and the problem.
    """
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, list | tuple):
            children = node
        else:
            if isinstance(node, int) and not isinstance(node, bool) and int_digits(node) > MAX_INT_DIGITS:
                raise SlotsmithError(
                    f"{what}: integer of about {int_digits(node)} digits (at most {MAX_INT_DIGITS} allowed)"
                )
            continue
        if depth > max_depth:
            raise SlotsmithError(f"{what}: nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children)


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"integer of {digits} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(text)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_json(raw: bytes, what: str, max_depth: int | None = MAX_DEPTH) -> object:
    """Decode UTF-8 JSON strictly: no duplicate keys, bounded integers and nesting.

    Args:
        raw: The bytes to decode.
        what: Names the source in error messages (usually the file path).
        max_depth: Deepest nesting accepted; None only where the caller
            validates the structure without recursing (a safetensors header).

    Returns:
        The decoded value.

    Raises:
        SlotsmithError: Invalid UTF-8 or JSON, duplicate keys, an integer of
            more than 20 digits, a lone surrogate escape, or too deep.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlotsmithError(f"{what}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_int=_bounded_int)
    except RecursionError:
        raise SlotsmithError(f"{what}: invalid JSON (nested too deep)") from None
    except ValueError as e:
        raise SlotsmithError(f"{what}: invalid JSON ({e})") from None
    if max_depth is not None:
        check_tree(obj, what, max_depth)
    if _SURROGATE_ESCAPE.search(text):
        # A lone surrogate escape (\ud800) decodes to a str that cannot be encoded
        # back to UTF-8, which would crash digests and writers later: refuse it here.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise SlotsmithError(f"{what}: invalid JSON (lone UTF-16 surrogate escape)") from None
    return obj


def parse_json_object(raw: bytes, what: str, max_depth: int | None = MAX_DEPTH) -> dict:
    """``parse_json`` for JSON that must be an object.

    Raises:
        SlotsmithError: See ``parse_json``; or not an object.
    """
    obj = parse_json(raw, what, max_depth)
    if not isinstance(obj, dict):
        raise SlotsmithError(f"{what}: JSON must be an object, got {type(obj).__name__}")
    return obj


def load_json(path: str | os.PathLike, cap: int, what: str = "JSON file") -> object:
    """Read and parse a JSON file under the reader rule (see the module docstring).

    Raises:
        SlotsmithError: One line naming ``path`` and the problem.
    """
    return parse_json(read_input(path, cap, what), str(path))


def _yaml_loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_YAML_INT = re.compile(r"[-+]?(0x[0-9a-fA-F_]+|0b[01_]+|0o[0-7_]+|[0-9_]+)")


def _check_yaml_events(text: str, what: str, bound_ints: bool = True) -> None:
    """Bound a YAML document's depth, expanded size and integers from its parse events alone.

    Runs before anything is composed (composing costs ten times more per
    node), so a huge or bomb document is refused after reading at most
    ``YAML_NODE_BUDGET`` nodes. An alias counts as the whole subtree it
    names, so the budget caps the size once aliases are expanded.

    Raises:
        SlotsmithError: Too deep, too many nodes, an alias of an unfinished
            anchor (a recursive document), or a huge integer.
        yaml.YAMLError: Not valid YAML (the caller words it).
    """
    import yaml

    loader = _yaml_loader()(text)
    try:
        count, depth = 0, 0
        sizes: dict[str, int] = {}  # anchor -> expanded node count of what it names
        open_collections: list[tuple[str | None, int]] = []
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes:
                    raise SlotsmithError(f"{what}: alias *{event.anchor} refers to an unknown or unfinished anchor")
                count += sizes[event.anchor]
            elif isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor:
                    sizes[event.anchor] = 1
                value = event.value
                if bound_ints and len(value) > MAX_INT_DIGITS and _YAML_INT.fullmatch(value) and (
                    event.tag is None or event.tag.endswith(":int")
                ):
                    digits = sum(c.isdigit() for c in value)
                    if digits > MAX_INT_DIGITS:
                        raise SlotsmithError(f"{what}: integer of {digits} digits (at most {MAX_INT_DIGITS} allowed)")
            elif isinstance(event, yaml.CollectionStartEvent):
                count += 1
                depth += 1
                if depth > MAX_DEPTH:
                    raise SlotsmithError(f"{what}: nested more than {MAX_DEPTH} levels deep")
                open_collections.append((event.anchor, count))
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, start = open_collections.pop()
                if anchor:
                    sizes[anchor] = count - start + 1
            if count > YAML_NODE_BUDGET:
                raise SlotsmithError(
                    f"{what}: more than {YAML_NODE_BUDGET} YAML nodes once aliases are expanded (too large, or an alias bomb)"
                )
    finally:
        loader.dispose()


def check_yaml(text: str, what: str, bound_ints: bool = True) -> None:
    """Bound a YAML text's nesting, expanded size (and integers) without building it.

    For readers with a loader of their own (the cast file's strict one, which
    types every value itself and so passes ``bound_ints=False``).

    Raises:
        SlotsmithError: Too deep, too many nodes, a recursive alias or a huge
            integer. (A syntax error is left to the caller's own parser, which words it.)
    """
    import yaml

    try:
        _check_yaml_events(text, what, bound_ints)
    except yaml.YAMLError:
        return


def parse_yaml(text: str, what: str) -> object:
    """Parse one YAML document safely: safe types only, bounded depth, size and integers.

    Args:
        text: The document.
        what: Names the source in error messages.

    Returns:
        The constructed value (None for an empty document).

    Raises:
        SlotsmithError: Invalid YAML, too deep, too many nodes, a huge integer.
    """
    import yaml

    loader = None
    try:
        _check_yaml_events(text, what)
        loader = _yaml_loader()(text)
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        raise SlotsmithError(f"{what}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError) as e:
        # SafeConstructor's own failures on hostile scalars (``!!int ""`` is an IndexError)
        raise SlotsmithError(f"{what}: not valid YAML ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | os.PathLike, cap: int = YAML_CAP, what: str = "YAML file") -> object:
    """Read and parse a YAML file under the reader rule (see the module docstring).

    Raises:
        SlotsmithError: One line naming ``path`` and the problem.
    """
    raw = read_input(path, cap, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlotsmithError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return parse_yaml(text, str(path))


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class InputFiles:
    """Read-only file descriptors of input files, opened once, closed together."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        """The descriptor of ``path``, opened on first use (regular files only, see ``open_input``).

        Raises:
            SlotsmithError: The file cannot be opened.
        """
        if path not in self._fds:
            fd = open_input(path)
            self._stack.callback(os.close, fd)
            self._fds[path] = fd
        return self._fds[path]

    def stamps(self) -> dict[Path, tuple[int, ...]]:
        """What identifies the content of every file open here: device, inode, size, mtime, ctime.

        Any write to a file changes its ctime (which no user can set back), so
        equal stamps later mean the bytes read in between were the bytes checked.
        """
        return {path: _stamp(os.fstat(fd)) for path, fd in self._fds.items()}

    def changed_since(self, stamps: dict[Path, tuple[int, ...]]) -> list[str]:
        """One line per file whose stamp differs from ``stamps``, or whose path now names another file."""
        problems = []
        for path, before in stamps.items():
            now = _stamp(os.fstat(self._fds[path]))
            try:
                named = _stamp(os.stat(path))
            except OSError:
                named = None
            if now != before or named != before:
                problems.append(f"{path}: changed while it was read (size, time or inode differ)")
        return problems

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
