"""Output paths checked before the first frame: nothing is written when one of them fails.

``check_outputs`` runs before the model is loaded and before any output is created. For each
output file (``--jsonl``, ``--video-out``, ``--summary``) and the ``--bag`` folder it refuses:

- an existing file or bag, unless ``overwrite`` (GNU ``cp -n``: never replace silently);
- a directory where a file is wanted, and the same path given for two outputs;
- a place where the file cannot be created: the nearest existing folder is probed by creating
  and removing a temporary file or folder there (permission bits say nothing to root, and
  ``/proc`` refuses new files whatever they say).

Devices and pipes (``/dev/stdout``, a FIFO) are accepted as they are; ``-`` is stdout.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from node.publish.publishers import PublisherError, refuse_existing


def check_outputs(outputs: dict[str, str | Path | None], overwrite: bool = False) -> None:
    """Check every output before any is created.

    Args:
        outputs: flag → path (``None`` = not asked for). ``--bag`` is a folder, the rest files.
        overwrite: existing outputs may be replaced.

    Raises:
        PublisherError: one line naming the first output that cannot be written.
    """
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None or str(path) == "-":
            continue
        p = Path(path)
        key = Path(os.path.abspath(p))
        if key in seen:
            raise PublisherError(f"{p}: given for both {seen[key]} and {flag}")
        seen[key] = flag
        if flag == "--bag":
            _check_bag(p, overwrite)
        else:
            _check_file(p, flag, overwrite)


def _check_file(path: Path, flag: str, overwrite: bool) -> None:
    if path.is_dir():
        raise PublisherError(f"{path}: is a directory ({flag} needs a file name)")
    refuse_existing(path, overwrite)
    if path.exists():  # a device, a pipe, or a file --overwrite may replace
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise PublisherError(f"{path}: cannot write {flag} ({exc.strerror})") from None
        return
    _probe(path, flag)


def _check_bag(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise PublisherError(f"{path}: exists and is not a bag folder (--bag)")
        if not overwrite:
            raise PublisherError(f"{path}: bag already exists; not overwriting it (pass "
                                 f"--overwrite to replace it)")
        if not (path / "metadata.yaml").is_file() and any(path.iterdir()):
            raise PublisherError(f"{path}: exists and is not a ROS 2 bag; not replacing it")
    _probe(path, "--bag")


def _probe(path: Path, flag: str) -> None:
    """Create and remove a temporary entry where ``path`` (or its first missing parent
    folder) would be created."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PublisherError(f"{path}: cannot write {flag} ({folder} is not a directory)")
    try:
        if folder == path.parent:
            fd, name = tempfile.mkstemp(dir=folder, prefix=".node-write-test-")
            os.close(fd)
            os.unlink(name)
        else:  # parent folders would be created: try to create one
            os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".node-write-test-"))
    except OSError as exc:
        raise PublisherError(f"{path}: cannot write {flag} ({exc.strerror or exc})") from None
