"""Put a rendered package on disk atomically, or compare it with what is there.

The package is written into a temporary sibling directory and swapped into place only when complete, so an
interrupted or failed build leaves the previous output as it was. The swap is one system call where the kernel offers
it (Linux's renameat2 with RENAME_EXCHANGE exchanges the two directories atomically), so `DIR/<name>` holds the old tree
or the new one at every instant. Elsewhere it takes two renames (old tree aside, new tree in); a build killed between
them leaves no `DIR/<name>`, and the next build puts the retired tree back before anything else and says so.
"""

from __future__ import annotations

import ctypes
import difflib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Called with the name of each step of a swap; tests set it to kill the process at an exact step.
after_step: Callable[[str], None] = lambda step: None  # noqa: E731


def write_package(files: dict[str, str], target: Path, exchange: bool = True) -> list[str]:
    """Write `files` as the directory `target`; return notes on anything a previous, interrupted build left behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    notes = recover_interrupted_swap(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-{os.getpid()}-", dir=target.parent))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        after_step("staged")
        replace_directory(staging, target, exchange=exchange)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return notes


def replace_directory(staging: Path, target: Path, exchange: bool = True) -> None:
    """Move a completed `staging` directory to `target`, retiring what was there only once the new one is in place."""
    if not target.exists():
        staging.rename(target)
        after_step("renamed")
        return
    if exchange and _exchange(staging, target):
        after_step("exchanged")  # target is the new tree; staging now holds the old one
        shutil.rmtree(staging, ignore_errors=True)
        after_step("retired")
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}-{staging.name}"
    target.rename(retired)
    after_step("set-aside")  # the window: no target until the next rename (recover_interrupted_swap closes it)
    staging.rename(target)
    after_step("renamed")
    shutil.rmtree(retired, ignore_errors=True)
    after_step("retired")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(code, f"cannot swap {b} with the new tree: {os.strerror(code)}", str(b))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            if hasattr(_LIBC, "renameat2"):
                _LIBC.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _LIBC.renameat2.restype = ctypes.c_int
        except OSError:
            return None
    return _LIBC


def recover_interrupted_swap(target: Path) -> list[str]:
    """Undo what a killed build left next to `target`: put a retired tree back when `target` is missing, delete leftovers.

    Leftovers of a build still running (its process is alive) are left alone.
    """
    notes: list[str] = []
    leftovers = [p for p in target.parent.glob(f".{target.name}.*") if p.is_dir() and _is_leftover(p, target.name)]
    retired = sorted((p for p in leftovers if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if not target.exists() and retired:
        restored = retired.pop()
        restored.rename(target)
        notes.append(f"recovered {target}: a build was killed between the two renames of its swap; "
                     f"the previous tree is back in place (from {restored.name})")
    for leftover in leftovers:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
            notes.append(f"removed {leftover.name}, left by a build that was killed")
    return notes


def _is_leftover(path: Path, name: str) -> bool:
    """A staging or retired directory of `name` whose build process no longer runs."""
    rest = path.name.removeprefix(f".{name}.")
    kind, _, tail = rest.partition("-")
    if kind not in ("building", "old"):
        return False
    pid = tail.split("-", 1)[0]
    return not (pid.isdigit() and _alive(int(pid)))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts no second build of the same target while one is running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def diff_package(files: dict[str, str], target: Path) -> list[str]:
    """Unified diffs (one string per differing file) between the rendered files and the directory on disk."""
    target = Path(target)
    diffs = []
    on_disk = ({str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and not _installed_byproduct(p, target)}
               if target.exists() else set())
    for relative in sorted(set(files) | on_disk):
        expected = files.get(relative)
        path = target / relative
        actual = path.read_text(encoding="utf-8") if path.exists() else None
        if expected == actual:
            continue
        diff = difflib.unified_diff((actual or "").splitlines(keepends=True), (expected or "").splitlines(keepends=True),
                                    fromfile=f"{path} (on disk{'' if actual is not None else ', missing'})",
                                    tofile=f"{path} (from spec{'' if expected is not None else ': should not exist'})")
        diffs.append("".join(diff))
    return diffs


def _installed_byproduct(path: Path, package: Path) -> bool:
    """Files that running or installing the package writes into it (bytecode, `pip install -e`'s egg-info), not
    part of what archgen generates."""
    parts = path.relative_to(package).parts
    return "__pycache__" in parts or parts[0].endswith(".egg-info")
