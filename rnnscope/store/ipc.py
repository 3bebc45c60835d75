"""What an Arrow IPC file declares, read from its footer and its messages before any buffer is read.

A compressed buffer starts with its uncompressed length, and Arrow allocates that length before it
decompresses: a 57 MB block of zeros unpacked to 4 GB. So the sizes are summed here, from the bytes
the file reader itself would follow (the footer's record batch blocks, each message's buffer list),
and a file is refused before ``pyarrow`` is asked to read it. The footer and messages are
FlatBuffers; the few fields needed are read by hand, every offset checked against the file.
"""
from __future__ import annotations

import struct

MAGIC = b"ARROW1"
RECORD_BATCH = 3            # MessageHeader union: Schema 1, DictionaryBatch 2, RecordBatch 3
CONTINUATION = 0xFFFFFFFF   # before a message's length since Arrow 0.15


class _Bytes:
    """``data`` read at checked positions: a position out of the file is a ``ValueError``, not a crash."""

    def __init__(self, data: bytes):
        self.data = data

    def get(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise ValueError("its footer or a message points outside the file")
        return struct.unpack_from("<" + fmt, self.data, pos)[0]


class _Table:
    """One FlatBuffers table at ``pos``: its fields by index, through its vtable."""

    def __init__(self, b: _Bytes, pos: int):
        self.b, self.pos = b, pos
        self.vtable = pos - b.get("i", pos)
        self.vtable_size = b.get("H", self.vtable)

    def _offset(self, i: int) -> int:
        at = 4 + 2 * i
        return self.b.get("H", self.vtable + at) if at + 2 <= self.vtable_size else 0

    def scalar(self, i: int, fmt: str, default=0):
        off = self._offset(i)
        return self.b.get(fmt, self.pos + off) if off else default

    def table(self, i: int):
        off = self._offset(i)
        if not off:
            return None
        at = self.pos + off
        return _Table(self.b, at + self.b.get("I", at))

    def structs(self, i: int, size: int) -> list[int]:
        """The positions of a vector of ``size``-byte structs."""
        off = self._offset(i)
        if not off:
            return []
        at = self.pos + off
        at += self.b.get("I", at)
        n = self.b.get("I", at)
        if at + 4 + n * size > len(self.b.data):
            raise ValueError(f"its footer declares {n:,} entries, more than the file holds")
        return [at + 4 + k * size for k in range(n)]


def _root(b: _Bytes, start: int) -> _Table:
    return _Table(b, start + b.get("I", start))


def _batch_size(b: _Bytes, offset: int, meta_length: int, body_length: int) -> tuple[int, int]:
    """(bytes once decompressed, rows) of the record batch message at ``offset``."""
    start = offset + 8 if b.get("I", offset) == CONTINUATION else offset + 4
    message = _root(b, start)
    if message.scalar(1, "B") != RECORD_BATCH:
        raise ValueError("its footer lists a message that is not a record batch")
    batch = message.table(2)
    if batch is None:
        raise ValueError("a record batch message has no header")
    rows, body = batch.scalar(0, "q"), offset + meta_length
    compressed = batch.table(3) is not None
    if rows < 0 or meta_length < 0 or body_length < 0 or body + body_length > len(b.data):
        raise ValueError("a record batch declares a negative or out-of-file size")
    size = 0
    for at in batch.structs(2, 16):
        buf_offset, length = b.get("q", at), b.get("q", at + 8)
        if buf_offset < 0 or length < 0 or buf_offset + length > body_length:
            raise ValueError("a buffer lies outside its record batch")
        if compressed and length >= 8:
            unpacked = b.get("q", body + buf_offset)        # -1: stored uncompressed after the length
            length = length - 8 if unpacked == -1 else unpacked
            if length < 0:
                raise ValueError("a compressed buffer declares a negative length")
        size += length
    return size, rows


def declared_size(data: bytes) -> tuple[int, int]:
    """(bytes its record batches take once decompressed, rows) of the Arrow IPC file ``data``, from its
    footer and message headers only. ``ValueError`` when it is not one or declares what it cannot hold,
    or holds dictionary batches (columns of fixed types never need them)."""
    b = _Bytes(data)
    if len(data) < 18 or data[:6] != MAGIC or data[-6:] != MAGIC:
        raise ValueError("it is not an Arrow IPC file (no ARROW1 at both ends)")
    footer_length = b.get("i", len(data) - 10)
    start = len(data) - 10 - footer_length
    if footer_length <= 0 or start < 8:
        raise ValueError("its footer length is wrong")
    footer = _root(b, start)
    if footer.structs(2, 24):
        raise ValueError("it holds dictionary batches, which a watch log block never has")
    size = rows = 0
    for at in footer.structs(3, 24):     # Block: offset int64, metaDataLength int32, pad, bodyLength int64
        s, r = _batch_size(b, b.get("q", at), b.get("i", at + 8), b.get("q", at + 16))
        size, rows = size + s, rows + r
    return size, rows
