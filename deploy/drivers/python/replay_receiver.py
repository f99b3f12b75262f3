#!/usr/bin/env python3
"""A reference receiver driver in Python: Bob's side of the device API (proto/device.proto,
package qkd.device.v1) served with grpcio, from a recording made by `qkdctl device record` or
`qkdctl device emulate --record`.

It shows how a vendor SDK plugs into the daemons: a driver for a real time tagger (Swabian
Time Tagger, PicoQuant, qutools, ...) has the same four methods, with the tags read from the
instrument instead of a file:

  Describe           the device's description (channel map, pulse period, ...)
  StreamTags         batches of raw time tags (channel, picoseconds), gaps in place
  ReportPhaseErrors  the daemon's X-basis error reports, for the phase actuator
  ReadMonitors       count rates, temperatures, locks

Usage:
  python -m grpc_tools.protoc -I proto/proto --python_out=GEN --grpc_python_out=GEN device.proto
  PYTHONPATH=GEN python replay_receiver.py --listen 127.0.0.1:7202 RECORDING

Recording format (version 1, see common/device/src/record.rs): the 8-byte magic
b"\\x89QKDREC\\n", a u32 little-endian version, then one zlib stream of records, each a LEB128
length n, n bytes of protobuf and the CRC-32 of those bytes (u32 little-endian); the first
record is a RecordingHeader, then RecordingEntry records, the last holding a RecordingEnd.
"""

import argparse
import signal
import sys
import threading
import time
import zlib
from concurrent import futures

import grpc

import device_pb2
import device_pb2_grpc

MAGIC = b"\x89QKDREC\n"
VERSION = 1


class RecordingError(Exception):
    """A damaged or foreign recording, with the file and offset."""


def read_records(path):
    """The header and the entries of the recording at `path` (every CRC checked)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise RecordingError(f"{path}: offset 0: bad magic {data[:8]!r}: not a qkd-device recording")
    version = int.from_bytes(data[8:12], "little")
    if version != VERSION:
        raise RecordingError(f"{path}: offset 8: format version {version} is not supported")
    try:
        stream = zlib.decompressobj().decompress(data[12:])
    except zlib.error as e:
        raise RecordingError(f"{path}: compressed data: {e}") from e
    pos, records = 0, []
    while pos < len(stream):
        start, n, shift = pos, 0, 0
        while True:
            if pos >= len(stream):
                raise RecordingError(f"{path}: record offset {start}: truncated length")
            b = stream[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        body, crc = stream[pos:pos + n], stream[pos + n:pos + n + 4]
        if len(body) != n or len(crc) != 4:
            raise RecordingError(f"{path}: record offset {start}: truncated record")
        if zlib.crc32(body) != int.from_bytes(crc, "little"):
            raise RecordingError(f"{path}: record offset {start}: CRC mismatch")
        records.append(body)
        pos += n + 4
    if not records:
        raise RecordingError(f"{path}: no header")
    header = device_pb2.RecordingHeader.FromString(records[0])
    entries = [device_pb2.RecordingEntry.FromString(r) for r in records[1:]]
    if not entries or entries[-1].WhichOneof("entry") != "end":
        raise RecordingError(f"{path}: truncated: no end record")
    return header, entries


class Receiver(device_pb2_grpc.ReceiverServicer):
    """Bob's receiver from a recording's tag batches."""

    def __init__(self, header, entries, pace):
        self.description = header.receiver
        self.batches = [e.tags for e in entries if e.WhichOneof("entry") == "tags"]
        self.pace = pace
        self.reports = 0
        self.lock = threading.Lock()

    def Describe(self, request, context):
        return self.description

    def StreamTags(self, request, context):
        # One stream from the start of the recording. With pacing, batches go out at the rate
        # their tags were taken (a real tagger delivers them as they happen).
        t0, first_ps = time.monotonic(), None
        for batch in self.batches:
            if not context.is_active():
                return
            if self.pace and batch.complete_until_ps:
                if first_ps is None:
                    first_ps = batch.complete_until_ps
                due = t0 + (batch.complete_until_ps - first_ps) * 1e-12
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield batch

    def ReportPhaseErrors(self, request, context):
        # A recording cannot move a phase actuator: the reports are counted and acknowledged.
        with self.lock:
            self.reports += 1
        return device_pb2.PhaseErrorAck(correction_steps=0)

    def ReadMonitors(self, request, context):
        return device_pb2.MonitorReadings(
            reference_clock=device_pb2.LOCK_STATE_ABSENT,
            sync=device_pb2.LOCK_STATE_LOCKED,
            phase=device_pb2.LOCK_STATE_ABSENT,
            frames=0,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", help="a recording made by qkdctl device record / emulate --record")
    parser.add_argument("--listen", default="127.0.0.1:7202", help="HOST:PORT to serve the Receiver on")
    parser.add_argument("--no-pace", action="store_true", help="send the tags as fast as they are read")
    args = parser.parse_args()
    try:
        header, entries = read_records(args.recording)
    except (OSError, RecordingError) as e:
        print(f"replay_receiver: {e}", file=sys.stderr)
        return 1
    receiver = Receiver(header, entries, pace=not args.no_pace)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    device_pb2_grpc.add_ReceiverServicer_to_server(receiver, server)
    server.add_insecure_port(args.listen)
    server.start()
    print(
        f"replay_receiver: serving {len(receiver.batches)} tag batches of {args.recording} "
        f"({receiver.description.model or 'receiver'}) on {args.listen}",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    print(f"replay_receiver: stopped after {receiver.reports} phase reports", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
