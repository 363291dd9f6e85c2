"""The one safetensors writer: streaming, bounded memory, atomic.

A tensor's bytes are given as *parts*: byte strings, or ranges of already open
files (``FileRange``). File ranges are copied kernel-side with
``os.copy_file_range`` (falling back to a bounded buffered copy), so a splice
never holds a tensor in memory. The header is padded with spaces (which the
format allows) so that the data section can sit at the same offset modulo
4096 as a base's: every unchanged extent then keeps its block alignment, and
filesystems with reflinks (XFS, btrfs) share it instead of copying it.

Output goes to a temp file in the target folder, is fsynced, then renamed into
place; on any exception (Ctrl-C included) the temp file is removed and nothing
appears at the target. An ``OSError`` on the way (a full disk, a read-only
folder) becomes one ``SlotsmithError`` naming the target.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path

from slotsmith.errors import SlotsmithError
from slotsmith.io.files import os_error
from slotsmith.io.header import DTYPE_SIZES

BLOCK = 4096
"""Filesystem block size that reflinks need offsets aligned to."""

COPY_CHUNK = 256 * 1024 * 1024
"""Most bytes per copy_file_range call: keeps the progress bar moving."""

BUFFER = 8 * 1024 * 1024
"""Buffer of the fallback copy: the writer's peak extra memory."""

_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[start, end)`` of a file open for reading (absolute offsets)."""

    fd: int
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


Part = FileRange | bytes | memoryview


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write.

    Attributes:
        key: The key in the output file.
        dtype: Safetensors dtype.
        shape: Shape.
        parts: Its bytes, in order; their lengths must add up to
            ``numel x dtype size``.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_SIZES[self.dtype]


def part_nbytes(p: Part) -> int:
    """The number of bytes a part holds."""
    return p.nbytes if isinstance(p, FileRange) else memoryview(p).nbytes


def build_header(tensors: Sequence[TensorOut], metadata: dict[str, str] | None, data_mod: int | None) -> bytes:
    """The 8-byte length prefix plus the padded JSON header.

    Args:
        tensors: In data order.
        metadata: ``__metadata__`` (str -> str), or None.
        data_mod: Wanted ``data_start % 4096``; None pads to a multiple of 8
            (what the official writer does).

    Returns:
        The bytes that precede the data section.

    Raises:
        SlotsmithError: Part lengths that do not match a tensor's size.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        given = sum(part_nbytes(p) for p in t.parts)
        if given != t.nbytes:
            raise SlotsmithError(f"tensor {t.key!r}: {given} bytes given but {t.dtype}{list(t.shape)} needs {t.nbytes}")
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    start = 8 + len(raw)
    if data_mod is None:
        pad = -start % 8
    else:
        pad = (data_mod - start) % BLOCK
    return struct.pack("<Q", len(raw) + pad) + raw + b" " * pad


def _coalesce(tensors: Sequence[TensorOut]) -> Iterator[Part]:
    """Parts in output order, adjacent ranges of one file merged into one copy."""
    pending: FileRange | None = None
    for t in tensors:
        for p in t.parts:
            if isinstance(p, FileRange):
                if pending is not None and pending.fd == p.fd and pending.end == p.start:
                    pending = FileRange(p.fd, pending.start, p.end)
                    continue
                if pending is not None:
                    yield pending
                pending = p
            else:
                if pending is not None:
                    yield pending
                    pending = None
                if len(p):
                    yield p
    if pending is not None:
        yield pending


def write_all(fd: int, data: bytes | memoryview, pos: int = 0) -> None:
    """Write every byte of ``data`` at offset ``pos`` of ``fd`` (one ``pwrite`` may write less)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _buffered_copy(src: FileRange, dst: int, pos: int, progress: Callable[[int], None]) -> None:
    buf = bytearray(min(BUFFER, src.nbytes))
    view = memoryview(buf)
    at = src.start
    while at < src.end:
        n = os.preadv(src.fd, [view[: min(len(buf), src.end - at)]], at)
        if n == 0:
            raise OSError(errno.EIO, f"input ends at byte {at}, before byte {src.end}")
        write_all(dst, view[:n], pos)
        at, pos = at + n, pos + n
        progress(n)


def _copy_range(src: FileRange, dst: int, pos: int, progress: Callable[[int], None]) -> None:
    """Copy ``src`` to ``dst`` at ``pos``, kernel-side where the system allows."""
    at = src.start
    while at < src.end:
        # Copy an unaligned head up to the next block boundary on its own, so
        # that every later call starts block-aligned in the source and (the
        # output being congruent to the input mod 4096) in the output: the
        # kernel can then reflink it instead of copying.
        head = -at % BLOCK
        stop = min(src.end, at + (head or COPY_CHUNK))
        try:
            n = os.copy_file_range(src.fd, dst, stop - at, at, pos)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _buffered_copy(FileRange(src.fd, at, src.end), dst, pos, progress)
            return
        if n == 0:
            raise OSError(errno.EIO, f"input ends at byte {at}, before byte {src.end}")
        at, pos = at + n, pos + n
        progress(n)


def write_tensors(
    fd: int,
    tensors: Sequence[TensorOut],
    metadata: dict[str, str] | None = None,
    *,
    data_mod: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write a whole safetensors file into ``fd`` (from offset 0).

    Args:
        fd: An empty file open for writing.
        tensors: The tensors, in the order their data should follow.
        metadata: ``__metadata__``.
        data_mod: Wanted ``data_start % 4096`` (see ``build_header``).
        progress: Called with each count of data bytes written.

    Returns:
        The file size.
    """
    progress = progress or (lambda n: None)
    head = build_header(tensors, metadata, data_mod)
    write_all(fd, head)
    pos = len(head)
    for part in _coalesce(tensors):
        if isinstance(part, FileRange):
            _copy_range(part, fd, pos, progress)
            pos += part.nbytes
        else:
            n = part_nbytes(part)
            write_all(fd, part, pos)
            pos += n
            progress(n)
    os.ftruncate(fd, pos)
    return pos


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is synced
    finally:
        os.close(dfd)


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``.

    Raises:
        SlotsmithError: ``out`` exists (and not ``force``), or its folder is missing.
    """
    try:
        exists = os.path.lexists(out)
        if exists and not force:
            raise SlotsmithError(f"{out}: already exists (use --force to overwrite)")
        if not os.path.isdir(out.parent):
            raise SlotsmithError(f"{out.parent}: no such folder for the output")
        if not exists:
            os.stat(out)  # lexists hides ENAMETOOLONG and the like: let stat name them
    except FileNotFoundError:
        pass
    except OSError as e:
        raise os_error(out, e, "cannot write") from None


def refuse_input_as_output(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is one of the inputs, even with ``--force``.

    Replacing an input would lose it: the rule is that inputs never change.

    Raises:
        SlotsmithError: ``out`` is the same file (or folder) as an input.
    """
    for path in inputs:
        try:
            same = out.exists() and path.exists() and os.path.samefile(out, path)
        except OSError:
            same = False
        if same:
            raise SlotsmithError(f"{out}: is an input; choose another output name")


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move ``tmp`` to ``out``; without ``force``, never replace an existing file."""
    if force:
        if out.is_dir() and not tmp.is_dir():
            raise SlotsmithError(f"{out}: is a folder; cannot replace it with a file")
        if out.is_dir():
            # A folder cannot be atomically replaced; move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return
    if tmp.is_dir():
        if out.exists():
            raise SlotsmithError(f"{out}: already exists (use --force to overwrite)")
        os.rename(tmp, out)
        return
    try:
        os.link(tmp, out)  # atomic create-if-absent
    except FileExistsError:
        raise SlotsmithError(f"{out}: already exists (use --force to overwrite)") from None
    except OSError:
        if out.exists():
            raise SlotsmithError(f"{out}: already exists (use --force to overwrite)") from None
        os.rename(tmp, out)
        return
    os.unlink(tmp)


def write_error(out: str | os.PathLike, e: OSError) -> SlotsmithError:
    """The one-line error for a failed write of ``out`` (full disk, no permission...)."""
    return SlotsmithError(f"{out}: writing failed ({e.strerror or e}); nothing was written")


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_prefix(out: Path) -> str:
    """``.OUT.slotsmith-HOST-PID-``: whose temp it is, so a later run can tell a dead one's."""
    return f".{out.name}.slotsmith-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but another user's
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove the temps beside ``out`` that a killed run (SIGKILL, power loss) left behind.

    Only temps of this host whose process is gone are removed; each removal
    is said on stderr. (Where ``O_TMPFILE`` works, single files leave none.)

    Returns:
        The removed paths.
    """
    pattern = re.compile(r"^\." + re.escape(out.name) + r"\.slotsmith-(?P<host>.*)-(?P<pid>\d+)-[^-]*\.tmp$")
    removed = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        stale = out.parent / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        sys.stderr.write(f"note: removed {stale}, left by a killed run (process {m['pid']})\n")
        removed.append(stale)
    return removed


def _begin(out: str | os.PathLike, force: bool, make: Callable):
    """Check that ``out`` may be written, then make its hidden temp file or folder beside it.

    Args:
        out: The final output path.
        force: Replace an existing ``out``.
        make: ``tempfile.mkstemp`` or ``tempfile.mkdtemp``.

    Returns:
        ``(out as a Path, what make returned)``.

    Raises:
        SlotsmithError: ``out`` exists and not ``force``, its folder is
            missing, or the temp cannot be made.
    """
    out = Path(out)
    refuse_existing(out, force)
    clean_stale_temps(out)
    try:
        return out, make(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise write_error(out, e) from None


@contextmanager
def _publishing(out: Path, seal: Callable[[], None], publish: Callable[[], None], discard: Callable[[], None]) -> Iterator[None]:
    """The shared end of ``atomic_file`` and ``atomic_dir``.

    After the body: ``seal`` (sync the temp), ``publish`` it as ``out`` and
    sync the folder; whatever happens: ``discard`` (close and remove what is
    left of the temp). An ``OSError`` becomes a ``SlotsmithError`` naming ``out``.
    """
    try:
        yield
        seal()
        publish()
        _fsync_dir(out.parent)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        discard()


_LINKABLE: dict[int, bool] = {}
"""Per filesystem (``st_dev``): whether an unnamed file can be linked in through ``/proc``."""


def _open_unnamed(folder: Path) -> int | None:
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(folder, flag | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError:  # EOPNOTSUPP, EISDIR on old kernels...: the named temp file says why, if it fails too
        return None


def _linkable(folder: Path) -> bool:
    """Whether unnamed files of ``folder`` can be given a name (tried once per filesystem on an empty probe:
    some, e.g. overlay mounts, refuse the ``/proc`` link with EXDEV)."""
    try:
        dev = os.stat(folder).st_dev
    except OSError:
        return False
    if dev not in _LINKABLE:
        probe = _open_unnamed(folder)
        ok = False
        if probe is not None:
            name = folder / f".slotsmith-probe-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}.tmp"
            try:
                os.link(f"/proc/self/fd/{probe}", name, follow_symlinks=True)
                os.unlink(name)
                ok = True
            except OSError:
                pass
            finally:
                os.close(probe)
        _LINKABLE[dev] = ok
    return _LINKABLE[dev]


def _anonymous_file(folder: Path) -> int | None:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``) that can be linked in at the end,
    or None where the system or filesystem cannot do that."""
    return _open_unnamed(folder) if _linkable(folder) else None


def _link_anonymous(fd: int, out: Path, force: bool) -> None:
    """Give the unnamed file ``fd`` the name ``out`` (atomically; replacing it only with ``force``)."""
    src = f"/proc/self/fd/{fd}"
    if not force:
        try:
            os.link(src, out, follow_symlinks=True)  # atomic create-if-absent
        except FileExistsError:
            raise SlotsmithError(f"{out}: already exists (use --force to overwrite)") from None
        return
    if out.is_dir():
        raise SlotsmithError(f"{out}: is a folder; cannot replace it with a file")
    tmp = out.parent / f"{_temp_prefix(out)}{os.urandom(4).hex()}.tmp"
    os.link(src, tmp, follow_symlinks=True)
    try:
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(out: str | os.PathLike, *, force: bool = False) -> Iterator[int]:
    """Yield the fd of a new file for ``out``; publish it on success.

    On Linux the file is created unnamed (``O_TMPFILE``) and linked into
    place at the end, so a killed process (SIGKILL included) leaves nothing
    behind; elsewhere it is a hidden temp file beside ``out``, renamed into
    place (and removed by a later run if a kill left it). On success the file
    is fsynced first; on any exception (KeyboardInterrupt included) nothing
    appears at ``out`` and the exception propagates, an ``OSError`` (from the
    caller's writes too) as a ``SlotsmithError``.

    Raises:
        SlotsmithError: ``out`` exists and not ``force``, its folder is
            missing, or writing failed (naming ``out``).
    """
    out = Path(out)
    refuse_existing(out, force)
    fd = _anonymous_file(out.parent)
    if fd is not None:
        clean_stale_temps(out)
        open_fds = [fd]

        def seal() -> None:
            os.fchmod(fd, 0o644)
            os.fsync(fd)

        def publish() -> None:
            _link_anonymous(fd, out, force)

        def discard() -> None:
            os.close(open_fds.pop())

        with _publishing(out, seal, publish, discard):
            yield fd
        return
    out, (fd, name) = _begin(out, force, tempfile.mkstemp)
    tmp = Path(name)
    open_fds = [fd]

    def seal_named() -> None:
        os.fsync(fd)
        os.close(open_fds.pop())
        os.chmod(tmp, 0o644)

    def discard_named() -> None:
        if open_fds:
            os.close(open_fds.pop())
        tmp.unlink(missing_ok=True)

    with _publishing(out, seal_named, lambda: _publish(tmp, out, force), discard_named):
        yield fd


@contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; publish it as ``out`` on success.

    The caller writes files inside it with ``new_file_in``. On any exception
    the temp folder is removed; an ``OSError`` becomes a ``SlotsmithError``.

    Raises:
        SlotsmithError: ``out`` exists and not ``force``, its folder is
            missing, or writing failed (naming ``out``).
    """
    out, name = _begin(out, force, tempfile.mkdtemp)
    tmp = Path(name)

    def seal() -> None:
        _fsync_dir(tmp)
        os.chmod(tmp, 0o755)

    def discard() -> None:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    with _publishing(out, seal, lambda: _publish(tmp, out, force), discard):
        yield tmp


@contextmanager
def new_file_in(folder: Path, name: str) -> Iterator[int]:
    """Create ``folder/name`` for writing (it must not exist); fsync and close it on success.

    Meant for the files of an ``atomic_dir`` temp folder, which removes them on failure.
    """
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        yield fd
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(
    out: str | os.PathLike,
    tensors: Sequence[TensorOut],
    metadata: dict[str, str] | None = None,
    *,
    data_mod: int | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write one safetensors file atomically.

    Args:
        out: Target path.
        tensors: Tensors in data order.
        metadata: ``__metadata__``.
        data_mod: Wanted ``data_start % 4096`` (None: 8-byte aligned).
        force: Replace an existing ``out``.
        progress: Called with each count of data bytes written.

    Returns:
        ``out`` as a Path.

    Raises:
        SlotsmithError: ``out`` exists (without force), bad part lengths, or
            reading or writing failed (nothing is left behind).
    """
    out = Path(out)
    with atomic_file(out, force=force) as fd:
        write_tensors(fd, tensors, metadata, data_mod=data_mod, progress=progress)
    return out
