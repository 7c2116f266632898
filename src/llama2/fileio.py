"""Small file helpers: atomic writes (a failure never leaves a half file) and the one safe way to
open a file the user named (a regular file, read with a bound).

Reading `-z /dev/zero` whole never ends, opening a FIFO blocks until a writer comes, and a 10 GB
sparse "tokenizer" fills the memory: `open_user_file` refuses anything but a regular file before a
byte is read (opening with O_NONBLOCK, so a FIFO cannot block), and `read_user_file` reads at most
a bound its caller takes from the format's header, or MAX_TEXT_BYTES for formats without one.
"""

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import FormatError

# The most bytes read from a file whose format has no header to bound it (JSON schemas, grammars,
# chat templates, config.json, tokenizer.json, sentencepiece models): the largest real ones, the
# tokenizer.json files of 100k+ vocabularies, are about 10 MB.
MAX_TEXT_BYTES = 64 << 20

# what a file that is not regular is, for the message (stat's S_IS* test, words)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_user_file(path, what: str = "file") -> int:
    """A read-only descriptor of `path`, which must be a regular file (symlinks to one are fine);
    else a FormatError naming the file, what it is, and `what` was expected."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO returns at once (then fails the check below) instead of
        # waiting for a writer; it changes nothing for a regular file
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FormatError(f"{name}: no such file (expected a {what})") from None
    except OSError as e:  # a symlink loop, permission denied, a name too long...
        raise FormatError(f"{name}: cannot open {what} ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((words for test, words in _KINDS if test(mode)), "not a regular file")
            raise FormatError(f"{name}: is {kind}, expected a {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def user_file(path, what: str = "file"):
    """`open_user_file` as a binary file object, closed after the block."""
    with os.fdopen(open_user_file(path, what), "rb") as f:
        yield f


def read_user_file(path, what: str = "file", limit: int = MAX_TEXT_BYTES, exact: bool = True) -> bytes:
    """The bytes of a regular file, at most `limit` of them: with `exact`, a longer file is an error
    (one line naming it); without, only its first `limit` bytes are read (formats whose header
    says how much of the file they use)."""
    with user_file(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if exact and size > limit:
            raise FormatError(f"{os.fspath(path)}: {size} bytes, more than a {what} can be "
                              f"({limit} bytes at most)")
        most = limit + 1 if exact else limit  # with `exact`, one byte more tells a longer file
        try:
            # no more than the file holds (a read of n bytes allocates n up front) nor than the
            # bound, even if the file grows meanwhile
            want = min(size + 1, most)
            data = f.read(want)
            if len(data) == want < most:
                data += f.read(most - want)
        except MemoryError:
            raise FormatError(f"{os.fspath(path)}: ran out of memory while reading this {what} "
                              f"({size} bytes)") from None
        except OSError as e:
            raise FormatError(f"{os.fspath(path)}: cannot read {what} ({e.strerror or e})") from None
    if exact and len(data) > limit:
        raise FormatError(f"{os.fspath(path)}: more than a {what} can be ({limit} bytes at most)")
    return data


def read_user_text(path, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """A regular file of at most `limit` bytes of UTF-8 text."""
    data = read_user_file(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{os.fspath(path)}: {what} is not UTF-8 text (byte {e.start})") from None


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give them the usual mode
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
