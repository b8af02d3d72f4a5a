"""Frame sources by URI, in the manner of jetson-inference's ``videoSource``.

``open_source(uri)`` picks the source from the URI:

- ``csi://N`` (Jetson CSI camera, GStreamer ``nvarguscamerasrc``), ``v4l2:///dev/videoN`` and
  ``rtsp://…`` are *live*: a capture thread keeps only the newest frame and counts the frames
  it overwrote in ``dropped``; lost cameras are reopened with exponential backoff (see
  ``node.sources.camera``).
- A video file, an image folder, a glob pattern and a ROS 2 bag (directory, ``.mcap`` or
  ``.db3``) are *replay*: nothing is dropped, every input frame is yielded once, in order. A
  frame that cannot be read is yielded with ``image=None`` and ``error`` set, and counted in
  ``errors``; it is not fatal.

Stamps: camera frames carry the wall-clock capture time; video frames carry *synthetic* stamps
(the time the source was opened plus the frame's position in the file, ``CAP_PROP_POS_MSEC``,
or ``index / fps`` where the container reports no position); image files carry the time they
were read; bag frames carry their header stamp (the log time where the header stamp is zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.sources.files import (
    BAG_SUFFIXES,
    IMAGE_SUFFIXES,
    LIVE_SCHEMES,
    VIDEO_SUFFIXES,
    ImageFilesSource,
    Source,
    SourceError,
    VideoFileSource,
    image_folder,
    image_glob,
    natural_key,
)


def open_source(uri: str, *, live: bool | None = None, **opts: Any) -> Source:
    """Open a frame source by URI or path.

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://…``, ``file://PATH`` or a plain path
            to a video file, an image folder, a glob pattern or a ROS 2 bag (directory with
            ``metadata.yaml``, ``.mcap`` or ``.db3`` file).
        live: ``None`` decides by kind (cameras live, files replay). ``True`` reads a file
            through the live reader (newest frame only, drops counted: overload tests);
            ``False`` reads a camera without dropping (every frame, consumer-paced).
        **opts: kind-specific options. Bags: ``topic``. Cameras: ``width``, ``height``,
            ``fps``, ``flip_method`` (csi), ``reconnect_initial_s``, ``reconnect_max_s``,
            ``max_attempts`` (0 = retry forever). Videos: ``max_bad_frames``.

    Raises:
        SourceError: one line naming the URI: missing file, unknown scheme, empty folder, no
            image topic, camera that cannot be opened, unknown option.
    """
    from node.sources import camera

    uri = str(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in LIVE_SCHEMES:
        return camera.open_camera(uri, live=live is not False, **opts)
    if scheme and scheme != "file":
        raise SourceError(f"{uri}: unknown source scheme {scheme + '://'!r} (expected csi://, "
                          f"v4l2://, rtsp://, file:// or a path)")
    path_text = uri[len("file://"):] if scheme == "file" else uri
    path = Path(path_text)
    if live:
        if not path.is_file():
            raise SourceError(f"{path}: video file not found")
        return camera.open_camera(uri, live=True, **opts)
    if any(ch in path_text for ch in "*?[") and not path.exists():
        _no_options(uri, opts)
        return image_glob(path_text)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if (path.is_dir() and (path / "metadata.yaml").is_file()) or suffix in BAG_SUFFIXES:
        from node.sources.bag import BagSource

        topic = opts.pop("topic", None)
        _no_options(uri, opts)
        return BagSource(path, topic=topic)
    if path.is_dir():
        _no_options(uri, opts)
        return image_folder(path)
    if suffix in IMAGE_SUFFIXES:
        _no_options(uri, opts)
        return ImageFilesSource([path], str(path))
    bad = opts.pop("max_bad_frames", 3)
    _no_options(uri, opts)
    return VideoFileSource(path, max_bad_frames=bad)


def _no_options(uri: str, opts: dict) -> None:
    if opts:
        raise SourceError(f"{uri}: unknown source option {min(opts)!r} for this kind")


__all__ = ["BAG_SUFFIXES", "IMAGE_SUFFIXES", "LIVE_SCHEMES", "VIDEO_SUFFIXES", "ImageFilesSource",
           "Source", "SourceError", "VideoFileSource", "image_folder", "image_glob", "natural_key",
           "open_source"]
