"""Atomic writes (a reader sees the previous output or the new one, never half of either), and
content hashes of directories."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

# A write that failed for want of room or a working disk (safetensors reports these as SafetensorError)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success rename it onto ``target``.

    On an exception the temporary path is removed and ``target`` is left exactly as it was (an I/O
    error, such as a full disk, is raised again as an ``OSError`` that names ``target``). What a
    writer killed outright (SIGKILL, power loss) left behind is recovered first: see :func:`recover`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    work = tmp if is_dir else tmp / target.name
    try:
        yield work
        if is_dir:
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SafetensorError) or getattr(e, "errno", None) in WRITE_ERRNOS:
            raise OSError(f"{target} was not written ({e}); the previous version is kept") from e
        raise


def recover(target: Path) -> None:
    """Undo what a killed :func:`atomic_path` writer of ``target`` left: a directory's previous
    version moved aside (killed between its two renames) goes back, and the temporary siblings of
    writers that are no longer running (the pid in their name) are removed."""
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        old.rename(target)
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def update_with_tree(digest: hashlib._Hash, root: str | os.PathLike) -> None:
    """Feed every file under ``root`` into ``digest``: relative path and bytes, in sorted order
    (``__pycache__`` skipped), so the result names the directory's content wherever it lies."""
    root = Path(root)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:  # in chunks: a policy's weights are hundreds of MB
            hashlib.file_digest(fh, lambda: digest)


def tree_sha256(root: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    update_with_tree(digest, root)
    return digest.hexdigest()
