"""``python -m node reindex DIR``: make an interrupted MCAP bag readable (``ros2 bag reindex``).

A node killed while it writes a bag (``kill -9``, a power cut) leaves an MCAP file without its
summary, footer and ``metadata.yaml``: no reader opens it. The node flushes whole chunks at
least every second (``node.publish.publishers.BagPublisher``), so the file holds every message up to
the last flushed chunk. ``reindex`` reads the file record by record, keeps every schema,
channel and message of the whole records (a chunk cut short by the kill is dropped), and
writes them as a complete bag: the MCAP with its index and summary, and ``metadata.yaml``.
The original file is kept beside it as ``<name>.mcap.interrupted``.

A bag that already opens is left as it is.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from node.cli.common import CliError

MAGIC = b"\x89MCAP0\r\n"
OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x03, 0x04, 0x05, 0x06, 0x0F


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", metavar="DIR", help="the bag folder (holding one .mcap file)")


def main(args: argparse.Namespace) -> int:
    path = Path(args.bag)
    if not path.is_dir():
        raise CliError(f"{path}: not a bag folder")
    if _opens(path):
        print(f"{path}: bag is readable; nothing to do", flush=True)
        return 0
    counts = reindex(path)
    total = sum(counts.values())
    print(f"{path}: reindexed, {total} messages recovered "
          f"(original kept as {_mcap_of(path).name}.interrupted)", flush=True)
    for topic, count in sorted(counts.items()):
        print(f"  {topic}: {count} messages", flush=True)
    return 0


@dataclass
class Recovered:
    """What the whole records of an MCAP file hold."""

    schemas: dict[int, tuple[str, str, bytes]] = field(default_factory=dict)  # name, enc, data
    channels: dict[int, tuple[int, str, str]] = field(default_factory=dict)  # schema, topic, enc
    messages: list[tuple[int, int, bytes]] = field(default_factory=list)  # log ns, channel, data
    torn: bool = False


def reindex(path: Path) -> dict[str, int]:
    """Rewrite the bag at ``path`` from the whole records of its MCAP file; returns the
    recovered message count per topic.

    Raises:
        CliError: no single ``.mcap`` file, not MCAP, or no channel in the whole records.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    from node.publish.ros_msgs import build_typestore

    mcap = _mcap_of(path)
    found = recover(mcap.read_bytes(), mcap)
    if not found.channels:
        raise CliError(f"{mcap}: no whole record holds a channel (the node was killed before "
                       f"its first chunk was flushed); nothing to recover")
    typestore = build_typestore()
    work = Path(tempfile.mkdtemp(prefix=".reindex-", dir=path.parent))
    try:
        staged = work / path.name
        writer = Writer(staged, version=8, storage_plugin=StoragePlugin.MCAP)
        writer.open()
        connections = {}
        for cid, (schema_id, topic, encoding) in sorted(found.channels.items()):
            name, _, definition = found.schemas.get(schema_id, ("", "", b""))
            connections[cid] = writer.add_connection(
                topic, name, msgdef=definition.decode(), rihs01=_rihs01(typestore, name),
                serialization_format=encoding or "cdr")
        counts = dict.fromkeys((c.topic for c in connections.values()), 0)
        for stamp, cid, data in sorted(found.messages, key=lambda m: m[0]):
            if cid in connections:
                writer.write(connections[cid], stamp, data)
                counts[connections[cid].topic] += 1
        writer.close()
        (new_mcap,) = staged.glob("*.mcap")
        mcap.rename(mcap.with_name(mcap.name + ".interrupted"))
        shutil.move(str(new_mcap), str(mcap))
        metadata = (staged / "metadata.yaml").read_text()
        if new_mcap.name != mcap.name:
            metadata = metadata.replace(new_mcap.name, mcap.name)
        (path / "metadata.yaml").write_text(metadata)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


def recover(data: bytes, name: Path | str = "bag") -> Recovered:
    """The schemas, channels and messages of the whole records of an MCAP file (top level
    and inside whole chunks), up to its data end or the first torn record."""
    if not data.startswith(MAGIC):
        raise CliError(f"{name}: not an MCAP file")
    found = Recovered()
    found.torn = not _records(data, len(MAGIC), len(data), found, top=True)
    return found


def _records(data: bytes, pos: int, end: int, found: Recovered, top: bool) -> bool:
    """Parse records in ``data[pos:end]``; False when a record is cut short."""
    while pos < end:
        if pos + 9 > end:
            return False
        op = data[pos]
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        body, pos = pos + 9, pos + 9 + length
        if pos > end:
            return False  # the record the kill interrupted
        if op == OP_DATA_END:
            return True  # the summary section repeats what came before
        try:
            _record(op, data, body, pos, found, top)
        except (struct.error, UnicodeDecodeError, ValueError):
            return False  # garbage: keep what came before
    return True


def _record(op: int, data: bytes, body: int, end: int, found: Recovered, top: bool) -> None:
    if op == OP_SCHEMA:
        (sid,) = struct.unpack_from("<H", data, body)
        name, at = _string(data, body + 2)
        encoding, at = _string(data, at)
        (size,) = struct.unpack_from("<I", data, at)
        found.schemas[sid] = (name, encoding, data[at + 4:at + 4 + size])
    elif op == OP_CHANNEL:
        cid, sid = struct.unpack_from("<HH", data, body)
        topic, at = _string(data, body + 4)
        encoding, _ = _string(data, at)
        found.channels[cid] = (sid, topic, encoding)
    elif op == OP_MESSAGE:
        cid, _, log_time, _ = struct.unpack_from("<HIQQ", data, body)
        found.messages.append((log_time, cid, data[body + 22:end]))
    elif op == OP_CHUNK and top:
        _, _, size, crc = struct.unpack_from("<QQQI", data, body)
        compression, at = _string(data, body + 28)
        (compressed,) = struct.unpack_from("<Q", data, at)
        raw = data[at + 8:at + 8 + compressed]
        if len(raw) != compressed:
            raise ValueError("chunk cut short")
        if compression:
            from rosbags.rosbag2.storage_mcap import decompress

            raw = decompress(raw, compression, size, crc)
        _records(raw, 0, len(raw), found, top=False)


def _string(data: bytes, at: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("<I", data, at)
    text = data[at + 4:at + 4 + size]
    if len(text) != size:
        raise ValueError("string cut short")
    return text.decode(), at + 4 + size


def _mcap_of(path: Path) -> Path:
    files = sorted(path.glob("*.mcap"))
    if len(files) != 1:
        found = "no .mcap file" if not files else f"{len(files)} .mcap files"
        raise CliError(f"{path}: {found} in this folder (reindex repairs a one-file MCAP bag)")
    return files[0]


def _opens(path: Path) -> bool:
    if not (path / "metadata.yaml").is_file():
        return False
    try:
        from rosbags.highlevel import AnyReader

        with AnyReader([path]) as reader:
            return reader.message_count >= 0
    except Exception:  # noqa: BLE001 - any failure to open means it needs reindexing
        return False


def _rihs01(typestore, msgtype: str) -> str:
    """The type hash where the node knows the type; a placeholder otherwise (only the
    metadata records it; readers decode with the embedded definition)."""
    try:
        return typestore.hash_rihs01(msgtype)
    except Exception:  # noqa: BLE001 - an unknown type
        return "RIHS01_" + "0" * 64
