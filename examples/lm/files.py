"""Where the scripts write: output folders checked before any work, files and folders written whole.

Every script checks its output folders with :func:`check_folder` before it reads, tokenizes or
trains anything, so a typo, a read-only place or a full disk costs a one-line error
(:class:`OutputError`), not a run. Results are written with :func:`write_text` and
:func:`staged_folder`: to a temporary sibling first, then renamed into place, so a failure leaves
the earlier file or folder as it was and never a half-written one.
"""

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

# Free space asked of every output folder beyond what a run says it will write (logs, plots, JSON).
MARGIN_BYTES = 16 * 2**20


class OutputError(Exception):
    """An output path that cannot be written: the message is one line naming the flag and the path."""


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def check_folder(path: str | pathlib.Path, flag: str, need_bytes: int = 0, create: bool = True) -> pathlib.Path:
    """``path`` as a folder that exists (made when ``create``), takes a file, and has ``need_bytes`` free.

    With ``create=False`` a missing ``path`` is checked through its nearest existing parent and
    left uncreated (for a folder written whole at the end, such as an export).

    Raises:
      OutputError: ``path`` is a file, cannot be created or written, or its file system has less
        than ``need_bytes`` plus :data:`MARGIN_BYTES` free.
    """
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file, not a folder")
    probe_in = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            while not probe_in.exists():
                probe_in = probe_in.parent
            if not probe_in.is_dir():
                raise OutputError(f"{flag} {path}: {probe_in} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(probe_in).free
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write there ({_reason(e)})") from None
    if free < need_bytes + MARGIN_BYTES:
        raise OutputError(
            f"{flag} {path}: {free / 2**20:,.0f} MiB free on its file system, this run needs about "
            f"{(need_bytes + MARGIN_BYTES) / 2**20:,.0f} MiB"
        )
    return path


def umask_mode(directory: bool = False) -> int:
    """The mode a file (or folder) the user creates gets: ``0o666`` (``0o777``) less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_text(path: str | pathlib.Path, text: str) -> None:
    """Writes ``path`` whole: a temporary sibling renamed over it (the old file stays on failure),
    readable as any file the user writes (the umask's mode, not the temporary file's 0600)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_folder(final: str | pathlib.Path, last: tuple[str, ...] = ()) -> Iterator[pathlib.Path]:
    """A temporary sibling folder whose files move into ``final`` when the block completes (those
    named in ``last`` at the end, so their presence marks a complete folder); other files already
    in ``final`` stay. An error leaves ``final`` as it was (not even created). The files get the
    umask's mode (a library writing into the temporary folder may have made them 0600)."""
    final = pathlib.Path(final).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        final.mkdir(exist_ok=True)
        for name in sorted(os.listdir(tmp), key=lambda n: (n in last, last.index(n) if n in last else 0, n)):
            os.chmod(tmp / name, umask_mode(directory=(tmp / name).is_dir()))
            os.replace(tmp / name, final / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
