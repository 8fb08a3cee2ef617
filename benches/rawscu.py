"""A minimal C-FIND / C-MOVE SCU on a plain socket, for measuring servers.

pynetdicom's per-message overhead (threads, a polling event loop) is a
couple of milliseconds per query, more than either server takes to answer a
selective query, so it hides the servers' difference; DCMTK's tools add a
process start and dictionary load (about 12 ms) to every retrieval. This
client does only what a C-FIND or C-MOVE needs (PS3.8 PDUs, PS3.7 command
set in implicit VR little endian, the identifier encoded by pydicom) over
one association kept open, and reads every response whole, so both servers
are measured with the same, small, client cost.

    with RawScu(port, calling_ae, called_ae) as f:
        matches = f.find(dataset)   # number of pending responses (matches)
    with RawScu(port, calling_ae, called_ae, RawScu.MOVE) as m:
        completed, failed, warning = m.move(dataset, "DESTAE")
"""
from __future__ import annotations

import socket
import struct
from collections import deque

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
STUDY_ROOT_FIND = b"1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = b"1.2.840.10008.5.1.4.1.2.2.2"
IMPLICIT_LE = b"1.2.840.10008.1.2"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1057.1"
MAX_PDU = 262144


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(payload)) + payload


def _pdu(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxI", kind, len(payload)) + payload


def encode(ds: Dataset) -> bytes:
    """An identifier in implicit VR little endian."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def _even(value: bytes, pad: bytes) -> bytes:
    return value + (pad if len(value) % 2 else b"")


def _command(message_id: int, sop_class: bytes = STUDY_ROOT_FIND, move_to: str | None = None) -> bytes:
    """C-FIND-RQ (or, with `move_to`, C-MOVE-RQ) command set with its group
    length (PS3.7 E.1, 9.3.2.1 and 9.3.4.1)."""
    def el(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, tag, len(value)) + value
    field = 0x0020 if move_to is None else 0x0021
    body = (el(0x0002, _even(sop_class, b"\0")) + el(0x0100, struct.pack("<H", field))
            + el(0x0110, struct.pack("<H", message_id))
            + (el(0x0600, _even(move_to.encode(), b" ")) if move_to is not None else b"")
            + el(0x0700, struct.pack("<H", 0)) + el(0x0800, struct.pack("<H", 0x0000)))
    return el(0x0000, struct.pack("<I", len(body))) + body


def _command_us(command: bytes, element: int) -> int | None:
    """The US value of (0000,element) in an implicit VR LE command set."""
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        if (group, elem) == (0x0000, element):
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    return None


def _status(command: bytes) -> int:
    """(0000,0900) Status."""
    status = _command_us(command, 0x0900)
    if status is None:
        raise ValueError("response without a status")
    return status


class RawScu:
    FIND, MOVE = STUDY_ROOT_FIND, STUDY_ROOT_MOVE

    def __init__(self, port: int, calling: str, called: str, sop_class: bytes = FIND,
                 host: str = "127.0.0.1"):
        # A server that stops answering fails the run instead of hanging it.
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.message_id, self.sop_class = 0, sop_class
        self.pdvs: deque[tuple[int, bytes]] = deque()
        ts = _item(0x40, IMPLICIT_LE)
        pc = _item(0x20, struct.pack(">Bxxx", 1) + _item(0x30, sop_class) + ts)
        user = _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID))
        rq = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
              + bytes(32) + _item(0x10, APP_CONTEXT) + pc + user)
        self.sock.sendall(_pdu(0x01, rq))
        kind, body = self._read_pdu()
        if kind != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {kind:#x})")
        # The one presentation context (item 0x21) must be accepted (result 0).
        pos = 68
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
            if item == 0x21 and body[pos + 6] != 0:
                raise ConnectionError("the presentation context was rejected")
            pos += 4 + length

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        kind, length = struct.unpack(">BxI", self._read_exact(6))
        return kind, self._read_exact(length)

    def _next_pdv(self) -> tuple[int, bytes]:
        """(message control header, fragment) of the next PDV received."""
        while not self.pdvs:
            kind, body = self._read_pdu()
            if kind != 0x04:
                raise ConnectionError(f"unexpected PDU type {kind:#x}")
            pos = 0
            while pos < len(body):
                length = struct.unpack_from(">I", body, pos)[0]
                self.pdvs.append((body[pos + 5], body[pos + 6: pos + 4 + length]))
                pos += 4 + length
        return self.pdvs.popleft()

    def _read_message(self) -> tuple[bytes, bytes]:
        """One command set and its data set (empty when none follows)."""
        command, data = bytearray(), bytearray()
        while True:
            header, fragment = self._next_pdv()
            if not header & 1:
                raise ConnectionError("data set before its command")
            command += fragment
            if header & 2:
                break
        if _data_set_present(bytes(command)):
            while True:
                header, fragment = self._next_pdv()
                data += fragment
                if header & 2:
                    break
        return bytes(command), bytes(data)

    def _request(self, identifier: Dataset | bytes, move_to: str | None = None) -> None:
        self.message_id = (self.message_id + 1) & 0xFFFF
        data = identifier if isinstance(identifier, bytes) else encode(identifier)
        command = _command(self.message_id, self.sop_class, move_to)
        pdvs = (struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
                + struct.pack(">IBB", len(data) + 2, 1, 0x02) + data)
        self.sock.sendall(_pdu(0x04, pdvs))

    def find(self, identifier: Dataset | bytes) -> int:
        """Sends one C-FIND (an identifier, or one `encode`d before the clock
        starts); returns the number of matches (pending responses)."""
        self._request(identifier)
        matches = 0
        while True:
            command, _ = self._read_message()
            status = _status(command)
            if status in (0xFF00, 0xFF01):
                matches += 1
            elif status == 0x0000:
                return matches
            else:
                raise RuntimeError(f"C-FIND failed with status {status:#06x}")

    def move(self, identifier: Dataset | bytes, destination: str) -> tuple[int, int, int]:
        """Sends one C-MOVE to `destination` and reads every response up to
        the final one; returns its (completed, failed, warning) counts."""
        self._request(identifier, destination)
        while True:
            command, _ = self._read_message()
            status = _status(command)
            if status in (0xFF00, 0xFF01):
                continue
            counts = tuple(_command_us(command, e) or 0 for e in (0x1021, 0x1022, 0x1023))
            if status not in (0x0000, 0xB000):
                raise RuntimeError(f"C-MOVE failed with status {status:#06x}, counts {counts}")
            return counts

    def close(self) -> None:
        try:
            self.sock.sendall(_pdu(0x05, bytes(4)))
            self._read_pdu()
        finally:
            self.sock.close()

    def __enter__(self) -> "RawScu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _data_set_present(command: bytes) -> bool:
    """(0000,0800) Command Data Set Type: 0x0101 means none."""
    return _command_us(command, 0x0800) not in (None, 0x0101)
