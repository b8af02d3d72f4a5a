"""Replay frames from a ROS 2 bag (MCAP or sqlite3) with ``rosbags``, no ROS install needed.

A bag *directory* (with ``metadata.yaml``) is read with ``rosbags.highlevel.AnyReader``, which
decodes with the definitions stored in the bag. A bare ``.mcap`` or ``.db3`` file (no
``metadata.yaml`` beside it) is read with rosbags' storage reader for that format and decoded
with the ROS 2 Humble definitions of ``sensor_msgs`` (identical in every ROS 2 release).

The image topic holds ``sensor_msgs/msg/Image`` or ``sensor_msgs/msg/CompressedImage``;
``topic=`` picks one, the default is the first image topic. A frame's stamp is its header stamp
(the log time where the header stamp is zero). A message that cannot be decoded becomes an
error frame, not a fatal error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from node.publish.ros_msgs import COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, image_to_bgr
from node.sources.files import Source, SourceError
from node.types import Frame

IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)


class BagSource(Source):
    """Frames of one image topic of a ROS 2 bag, in log-time order.

    Raises:
        SourceError: unreadable bag, no image topic, or ``topic`` not an image topic.
    """

    def __init__(self, path: str | Path, topic: str | None = None) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        self._stack = ExitStack()
        try:
            self._reader, self._deserialize = self._open()
        except SourceError:
            self._stack.close()
            raise
        except Exception as exc:  # noqa: BLE001 (rosbags raises many types for damaged bags)
            self._stack.close()
            raise SourceError(f"{self.path}: cannot read ROS 2 bag ({_one_line(exc)})") from None
        connections = list(self._reader.connections)
        images = [c for c in connections if c.msgtype in IMAGE_TYPES]
        if not images:
            self._stack.close()
            found = ", ".join(sorted({f"{c.topic} ({c.msgtype})" for c in connections}))
            raise SourceError(f"{self.path}: no sensor_msgs Image or CompressedImage topic in "
                              f"bag (topics: {found or 'none'})")
        if topic is None:
            topic = images[0].topic
        self.connections = [c for c in images if c.topic == topic]
        if not self.connections:
            self._stack.close()
            names = ", ".join(sorted({c.topic for c in images}))
            raise SourceError(f"{self.path}: topic {topic!r} is not an image topic in this bag "
                              f"(image topics: {names})")
        self.topic = topic
        self.message_count = sum(int(getattr(c, "msgcount", 0) or 0) for c in self.connections)

    def __len__(self) -> int:
        return self.message_count

    def _open(self) -> tuple[Any, Any]:
        from node.publish.ros_msgs import build_typestore

        typestore = build_typestore()
        if self.path.is_dir():
            from rosbags.highlevel import AnyReader

            reader = self._stack.enter_context(AnyReader([self.path],
                                                         default_typestore=typestore))
            return reader, reader.deserialize
        if self.path.suffix.lower() == ".mcap":
            from rosbags.rosbag2.storage_mcap import McapReader as StorageReader
        else:
            from rosbags.rosbag2.storage_sqlite3 import Sqlite3Reader as StorageReader
        reader = StorageReader(self.path)
        reader.open()
        self._stack.callback(reader.close)
        return reader, typestore.deserialize_cdr

    def _generate(self) -> Iterator[Frame]:
        index = 0
        try:
            messages = self._reader.messages(connections=self.connections)
            for connection, log_ns, raw in messages:
                t0 = time.perf_counter()
                stamp = log_ns / 1e9
                try:
                    msg = self._deserialize(raw, connection.msgtype)
                    header_stamp = msg.header.stamp.sec + msg.header.stamp.nanosec / 1e9
                    stamp = header_stamp if header_stamp > 0 else stamp
                    image, error = image_to_bgr(msg), None
                except Exception as exc:  # noqa: BLE001 (one bad message is an error frame)
                    image, error = None, f"{self.topic}#{index}: {_one_line(exc)}"
                capture_ms = (time.perf_counter() - t0) * 1e3
                if error:
                    self.errors += 1
                yield Frame(index, stamp, image, None, capture_ms, error=error)
                index += 1
        finally:
            self._stack.close()

    def close(self) -> None:
        super().close()
        self._stack.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
