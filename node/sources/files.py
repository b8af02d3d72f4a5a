"""Replay sources read from files: video files, image folders and glob patterns.

Every input frame is yielded once, in order; nothing is dropped. A frame that cannot be read is
yielded with ``image=None`` and ``error`` set, and counted in ``errors``; it is not fatal.
``Source`` is the base class every source (camera, bag, ROS topic) shares, and ``SourceError``
the one error they raise. ``node.sources.open_source`` picks a source from a URI.
"""

from __future__ import annotations

import errno
import glob as globlib
import logging
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from node.types import Frame

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".ts")
BAG_SUFFIXES = (".mcap", ".db3")
LIVE_SCHEMES = ("csi", "v4l2", "rtsp", "rtsps")


class SourceError(ValueError):
    """A source cannot be opened or has failed for good. The message names the URI or file."""


def natural_key(text: str) -> list:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


class Source:
    """An iterator of ``Frame`` with a lifetime (``close``, context manager).

    Attributes:
        name: the URI or path the source was opened from.
        is_live: live sources drop stale frames; replay sources never drop.
        dropped: frames overwritten before being consumed (live only).
        errors: frames that could not be read (yielded with ``image=None``) or, for a video
            that ends early, the frames the container announced but did not deliver.
        warnings: one-line notes on problems that did not stop the source.
    """

    is_live = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.dropped = 0
        self.errors = 0
        self.warnings: list[str] = []
        self._closed = False
        self._frames: Iterator[Frame] | None = None

    @property
    def health(self) -> dict:
        """Status a pipeline can publish (``node.publish.ros_msgs.health_fields``)."""
        return {"state": "closed" if self._closed else "ok", "dropped": self.dropped,
                "errors": self.errors}

    def __iter__(self) -> Source:
        return self

    def __len__(self) -> int:
        """Frames expected (for progress bars); ``TypeError`` where unknown (live)."""
        raise TypeError(f"{self.name}: frame count unknown")

    def __next__(self) -> Frame:
        if self._closed:
            raise StopIteration
        if self._frames is None:
            self._frames = self._generate()
        return next(self._frames)

    def _generate(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the underlying device or files; safe to call twice."""
        if not self._closed:
            self._closed = True
            if self._frames is not None:
                self._frames.close()  # runs the generator's cleanup (finally blocks)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoFileSource(Source):
    """A video file decoded with ``cv2.VideoCapture``; ``source_name`` is ``None``.

    A file that cannot be opened raises ``SourceError``. A file whose decoding stops before
    the container's frame count (truncated, corrupt) ends there: the shortfall is added to
    ``errors`` and described in ``warnings``. A few failed reads in a row are retried first,
    so one corrupt frame in the middle becomes one error frame and decoding goes on.
    """

    def __init__(self, path: str | Path, *, max_bad_frames: int = 3) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: video file not found")
        if self.path.stat().st_size == 0:
            raise SourceError(f"{self.path}: video file is empty")
        self._capture = cv2.VideoCapture(str(self.path))
        if not self._capture.isOpened():
            self._capture.release()
            raise SourceError(f"{self.path}: cannot open video (corrupt, truncated or "
                              f"unsupported container)")
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.frame_count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.max_bad_frames = max_bad_frames
        self.start_stamp = time.time()

    def _generate(self) -> Iterator[Frame]:
        index = 0
        pending_bad: list[float] = []
        try:
            while True:
                t0 = time.perf_counter()
                ok, image = self._capture.read()
                capture_ms = (time.perf_counter() - t0) * 1e3
                if not ok or image is None:
                    if self.frame_count <= 0 or index + len(pending_bad) >= self.frame_count \
                            or len(pending_bad) >= self.max_bad_frames:
                        break
                    pending_bad.append(capture_ms)
                    continue
                for bad_ms in pending_bad:  # decoding recovered: the failed reads were frames
                    self.errors += 1
                    yield Frame(index, self._stamp(index), None, None, bad_ms,
                                error=f"{self.path.name}: frame {index} could not be decoded")
                    index += 1
                pending_bad.clear()
                yield Frame(index, self._stamp(index), _as_bgr(image), None, capture_ms)
                index += 1
            if self.frame_count > 0 and index < self.frame_count:
                missing = self.frame_count - index
                self.errors += missing
                note = (f"{self.path.name}: decoding stopped after {index} of "
                        f"{self.frame_count} frames (truncated or corrupt video)")
                self.warnings.append(note)
                log.warning(note)
        finally:
            self._capture.release()

    def __len__(self) -> int:
        if self.frame_count <= 0:
            raise TypeError(f"{self.name}: container reports no frame count")
        return self.frame_count

    def _stamp(self, index: int) -> float:
        pos_ms = float(self._capture.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
        if pos_ms <= 0.0 and index > 0 and self.fps > 0:
            pos_ms = 1e3 * index / self.fps
        return self.start_stamp + pos_ms / 1e3

    def close(self) -> None:
        super().close()
        self._capture.release()


class ImageFilesSource(Source):
    """Image files in the given order; ``source_name`` is the file name.

    Zero-byte, non-image and undecodable files become error frames (``image=None``,
    ``error="<file>: unreadable image"``) and count in ``errors``; so do broken and looping
    symbolic links (``"<file>: broken symbolic link"``, ``"... symbolic link loop"``).

    The next ``read_ahead`` files are read and decoded on a background thread while the
    node works on the current frame (``cv2.imdecode`` releases the GIL), so decoding
    overlaps with the rest of the loop; 0 reads each file when it is asked for. The frames,
    their order and their errors are the same either way.
    """

    def __init__(self, paths: list[Path], name: str, *, read_ahead: int = 2) -> None:
        super().__init__(name)
        self.paths = paths
        self.read_ahead = max(0, int(read_ahead))

    def __len__(self) -> int:
        return len(self.paths)

    def _generate(self) -> Iterator[Frame]:
        if self.read_ahead == 0:
            for index, path in enumerate(self.paths):
                yield self._frame(index, path, *_read_image(path))
            return
        todo = iter(enumerate(self.paths))
        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:

            def start_next() -> None:
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((*nxt, pool.submit(_read_image, nxt[1])))

            try:
                for _ in range(self.read_ahead + 1):
                    start_next()
                while pending:
                    index, path, job = pending.popleft()
                    image, decode_ms = job.result()
                    start_next()
                    yield self._frame(index, path, image, decode_ms)
            finally:  # stopped early: files not yet started are not read
                for *_, job in pending:
                    job.cancel()

    def _frame(self, index: int, path: Path, image: np.ndarray | None,
               capture_ms: float) -> Frame:
        if image is None:
            self.errors += 1
            return Frame(index, time.time(), None, path.name, capture_ms,
                         error=f"{path.name}: {_link_problem(path) or 'unreadable image'}")
        return Frame(index, time.time(), image, path.name, capture_ms)


def _read_image(path: Path) -> tuple[np.ndarray | None, float]:
    """The decoded BGR image (None where it cannot be read) and the ms reading took."""
    t0 = time.perf_counter()
    image = None
    try:
        if path.stat().st_size > 0:
            data = np.fromfile(path, dtype=np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except OSError:
        image = None
    return image, (time.perf_counter() - t0) * 1e3


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link leads to no file ("broken symbolic link", "symbolic link loop"),
    or None when ``path`` is not such a link."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT:
            return "broken symbolic link"
        return f"symbolic link unreadable ({exc.strerror})"
    return None


def _is_frame_file(path: Path) -> bool:
    """A regular file, or a symbolic link that leads nowhere (it becomes an error frame, so
    that it is counted and reported rather than skipped)."""
    return path.is_file() or _link_problem(path) is not None


def image_folder(path: Path) -> ImageFilesSource:
    """Every regular, non-hidden file in ``path``, in natural order of its name (broken and
    looping symbolic links included: they become error frames)."""
    files = sorted((p for p in path.iterdir()
                    if _is_frame_file(p) and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise SourceError(f"{path}: image folder is empty")
    return ImageFilesSource(files, str(path))


def image_glob(pattern: str) -> ImageFilesSource:
    """Files matching a glob pattern (``**`` recurses), in natural order of their path."""
    files = sorted((Path(p) for p in globlib.glob(pattern, recursive=True)
                    if _is_frame_file(Path(p))), key=lambda p: natural_key(str(p)))
    if not files:
        raise SourceError(f"{pattern}: no files match this pattern")
    return ImageFilesSource(files, pattern)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Grey and BGRA uint8 images as BGR; anything else unchanged (the pipeline records a
    frame of the wrong shape or dtype as an error frame, it must not kill a capture thread)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        return image
    if image.ndim == 2 and image.size:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4 and image.size:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image
