"""Accepted result payloads on disk: one append-only segment file per ingested batch.

Why segments and not one file per device: durability costs an fsync, and one fsync'd file per
result made the disk the bottleneck of ingestion (~6-7 ms per result). A batch of accepted frames
goes into one new file `submissions/r{round}/seg-*.seg` as length-prefixed records, fsync'd (file
and directory) *before* the registry commits the batch's `accepted` rows, so every accepted row has
its payload on disk. A segment is written under a temporary name and renamed whole, so a process
reading the round meanwhile (an orchestrator fed by ingestion workers) never sees half of one; a
crash mid-write leaves a `.tmp-seg-*` file nobody reads.

The database stays the truth: a record only counts when its (round, device) row is `accepted` with
the same digest. Records of a batch whose commit failed (and was retried: the retry writes a new
segment), of a different submission, or a torn trailing record of a crash mid-write are ignored.
No schema change: device and round are in the frame header, the digest is in the row.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from device_firmware_py.contract import codec
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError

log = logging.getLogger("koala.submissions")
MAGIC = b"KSEG"  # file header: segment format 1
_LEN = struct.Struct(">I")  # record: 4-byte big-endian length, then the frame bytes


def round_dir(root: Path, round_id: int) -> Path:
    return root / "submissions" / f"r{round_id}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_segment(root: Path, round_id: int, frames: list[bytes]) -> Path:
    """Append `frames` to a new segment of the round and make it durable (file + directory fsync)."""
    d = round_dir(root, round_id)
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(d.parent)
    name = f"seg-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}.seg"
    path, tmp = d / name, d / f".tmp-{name}"
    buf = bytearray(MAGIC)
    for f in frames:
        buf += _LEN.pack(len(f))
        buf += f
    with open(tmp, "xb") as fh:
        fh.write(buf)
        fh.flush()
        os.fsync(fh.fileno())
    # renamed whole: another process reading the round's segments (an orchestrator fed by
    # ingestion workers, submission_log.SegmentIndex) never sees a half-written one
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def _spans(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(start, length) of each whole record of a segment's bytes (after MAGIC), and the offset
    where the whole records end: len(data), unless a torn record follows."""
    spans, pos = [], len(MAGIC)
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        start = pos + _LEN.size
        if start + n > len(data):
            break
        spans.append((start, n))
        pos = start + n
    return spans, pos


def read_segment(path: Path) -> Iterator[bytes]:
    """The whole records of one segment; stops at a torn (short) trailing record."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        log.warning("not a submission segment: %s", path)
        return
    spans, end = _spans(data)
    for start, n in spans:
        yield data[start : start + n]
    if end + _LEN.size <= len(data):
        log.warning("torn record at the end of %s (offset %d): ignored", path, end)


def recover(root: Path, round_id: int, accepted: Mapping[str, str | None]) -> dict[str, cm.Result]:
    """Results of a round for the `accepted` rows ({device: digest}) from its segments (and from
    per-device `{device}.bin` files written by earlier versions). Only a frame of the same round
    and device whose digest equals the row's counts."""
    d = round_dir(root, round_id)
    out: dict[str, cm.Result] = {}
    if not d.is_dir():
        return out
    candidates: list[bytes] = []
    for p in sorted(d.glob("seg-*.seg")):
        try:
            candidates.extend(read_segment(p))
        except OSError as exc:
            log.error("segment unreadable %s: %s", p, exc)
    for dev in accepted:
        legacy = d / f"{dev}.bin"
        if legacy.is_file():
            try:
                candidates.append(legacy.read_bytes())
            except OSError as exc:
                log.error("result file unreadable %s: %s", legacy, exc)
    digests = set(accepted.values())
    for frame in candidates:
        digest = codec.frame_digest(frame)
        if digest not in digests and None not in digests:
            digest = codec.payload_digest(frame)  # rows written before frame_digest: whole-payload sha256
        if digest not in digests and None not in digests:
            continue  # not an accepted submission (a retried batch's copy, a superseded frame): skip decoding
        try:
            msg = codec.decode_frame(frame, cm.Result)
        except ContractError as exc:
            log.warning("undecodable record in round %d: %s", round_id, exc)
            continue
        dev = msg.device_id
        if msg.round_id == round_id and dev in accepted and dev not in out and accepted[dev] in (None, digest):
            out[dev] = msg
    return out


class SegmentIndex:
    """Incremental reader of one round's segments, for an orchestrator whose results are accepted
    by other processes (ingestion workers): `load({device: digest})` returns the results of newly
    accepted rows, reading only segments it has not indexed yet plus the records it needs.

    Why an index and not `recover` each time: recover reads every segment of the round, and the
    orchestrator asks every half second while a round collects (O(rounds x bytes)). A segment is
    durable before its rows commit, so a row seen accepted always finds its record here; records
    of rows not (yet) accepted stay indexed by digest (~100 bytes each), not held as tensors."""

    def __init__(self, root: Path, round_id: int):
        self.dir = round_dir(root, round_id)
        self.round_id = round_id
        self._seen: set[str] = set()
        self._where: dict[str, tuple[Path, int, int]] = {}  # frame digest -> (segment, offset, length)

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("seg-*.seg")):
            if p.name in self._seen:
                continue
            try:
                data = p.read_bytes()
            except OSError as exc:
                log.error("segment unreadable %s: %s", p, exc)
                continue
            spans, end = _spans(data) if data.startswith(MAGIC) else ([], len(data))
            for start, n in spans:
                self._where.setdefault(codec.frame_digest(data[start : start + n]), (p, start, n))
            if end == len(data):  # else torn by a crash mid-write (its rows never committed): read again
                self._seen.add(p.name)

    def nbytes(self, digest: str) -> int:
        """Size of an indexed record (0 when unknown): the result message's bytes for round stats."""
        where = self._where.get(digest)
        return 0 if where is None else where[2]

    def load(self, accepted: Mapping[str, str]) -> dict[str, cm.Result]:
        """Results for `accepted` rows ({device: digest}); a device whose record is not found (yet)
        is left out and logged by the caller."""
        if any(dg not in self._where for dg in accepted.values()):
            self._refresh()
        out: dict[str, cm.Result] = {}
        for dev, digest in accepted.items():
            where = self._where.get(digest)
            if where is None:
                continue
            path, start, n = where
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    frame = fh.read(n)
                msg = codec.decode_frame(frame, cm.Result)
            except (OSError, ContractError) as exc:
                log.error("accepted record unreadable round=%d device=%s: %s", self.round_id, dev, exc)
                continue
            if msg.round_id == self.round_id and msg.device_id == dev:
                out[dev] = msg
        return out
