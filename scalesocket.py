#!/usr/bin/env python3
"""scalesocket.py: turn any stdin/stdout program into a multi-room WebSocket server.

Usage: python3 scalesocket.py [OPTIONS] CMD [-- ARGS...]

A client of ws://HOST:9000/ROOM joins ROOM. The first client of a room starts
CMD for it; every message a client sends goes to the child's stdin, and every
message the child writes to stdout goes to the clients of the room. When the
last client leaves, the child is stopped.

A reimplementation of ScaleSocket (https://github.com/scalesocket/scalesocket)
in one file: standard library only, Python >= 3.9. Importing it has no side
effects; embed it with ``Server(Config(...))`` or run ``main(argv)``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import codecs
import collections
import contextlib
import email.utils
import enum
import fcntl
import hashlib
import html
import http
import ipaddress
import json
import logging
import math
import mimetypes
import mmap
import os
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import termios
import urllib.parse
import zlib
from dataclasses import dataclass, field

__version__ = "0.5.0"

__all__ = [
    "__version__",
    "CloseCode",
    "Config",
    "Frame",
    "FrameParser",
    "HTTPError",
    "Message",
    "Opcode",
    "PerMessageDeflate",
    "ProtocolError",
    "Server",
    "WebSocketProtocol",
    "main",
    "parse_args",
    "serve",
]

log = logging.getLogger("scalesocket")


###############################################################################
# 1. Constants and errors #####################################################
###############################################################################

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_MAX_HEAD = 16 * 1024  # --maxhead: request line plus headers, in bytes
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024  # --maxsize
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # --handshaketimeout: seconds to send a whole request head
DEFAULT_MAX_CLIENTS = 10000  # --maxclients: WebSocket clients at once
DEFAULT_MAX_BACKLOG = 8 * 1024 * 1024  # --maxbacklog: bytes a client may leave unread
DEFAULT_PING = 20.0  # --ping: seconds between keepalive pings
DEFLATE_MIN_SIZE = 128  # smaller messages are sent uncompressed (RFC 7692 allows either)
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's side of a closing handshake
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a child
EXIT_DRAIN = 1.0  # seconds after a child's exit for what it started to let go of its output
TCP_CONNECT_TIMEOUT = 10.0  # seconds for a --tcp child to accept its connection
CHILD_HIGH_WATER = 64 * 1024  # bytes queued for a child before its clients wait
WAIT_PING = 2.0  # seconds between pings to a client waiting on its child
FILE_CHUNK = 64 * 1024
TABLE_SLOTS_MAX = 1 << 22  # slots of a worker's table of clients by address (--maxclientsperaddr): 64 MiB
FDS_PER_ROOM = 4  # a child's three pipes and the descriptor that watches it
RESERVED_FDS = 32  # the listener, the event loop, logs, static files being read
DEFAULT_PASSENV = ("PATH", "DYLD_LIBRARY_PATH")
FRAME_MODES = ("json", "gwsocket")
# The ioctl that tells how many bytes a socket's send queue holds (Linux:
# SIOCOUTQ, the same number as TIOCOUTQ); elsewhere only our own buffer counts.
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None
RESERVED_ROOMS = frozenset(
    {"api", "metrics", "health", "static", "upload", "robots.txt", "favicon.ico"}
)


class Opcode(enum.IntEnum):
    """Frame opcodes of RFC 6455 §5.2."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_OPCODES = {op.value: op for op in Opcode}  # a lookup: cheaper than calling Opcode() per frame


class CloseCode(enum.IntEnum):
    """Close codes of RFC 6455 §7.4.1 (and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class ScaleSocketError(Exception):
    """Base of every error this module raises on purpose."""


class HTTPError(ScaleSocketError):
    """A request that is answered with an HTTP error status."""

    status = 500

    def __init__(self, reason: str = "", headers: list[tuple[str, str]] | None = None, status: int | None = None,
                 html: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers or []
        self.html = html  # a page for a browser, instead of the reason as text
        if status is not None:
            self.status = status


class BadRequest(HTTPError):
    status = 400


class NotFound(HTTPError):
    status = 404


class Forbidden(HTTPError):
    status = 403


class MethodNotAllowed(HTTPError):
    status = 405


class UpgradeRequired(HTTPError):
    status = 426


class HeadersTooLarge(HTTPError):
    status = 431


class TooManyRequests(HTTPError):
    status = 429


class ServiceUnavailable(HTTPError):
    status = 503


class ProtocolError(ScaleSocketError):
    """A WebSocket peer broke RFC 6455; the connection is closed with ``code``."""

    code = CloseCode.PROTOCOL_ERROR

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidPayload(ProtocolError):
    code = CloseCode.INVALID_DATA


class MessageTooBig(ProtocolError):
    code = CloseCode.MESSAGE_TOO_BIG


class RoomUnavailable(ScaleSocketError):
    """A client cannot be served by its room; it is closed with ``code``."""

    code = CloseCode.INTERNAL_ERROR

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class ProcessSpawnError(RoomUnavailable):
    """The room's child could not be started."""


class FramingError(ScaleSocketError):
    """A message does not fit the configured framing; it is dropped."""


###############################################################################
# 2. WebSocket protocol (sans-I/O) ############################################
###############################################################################


def accept_key(key: str) -> str:
    """Return the Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


_MASK_BLOCK = 64 * 1024  # unmasked a block at a time, so the integers stay in the CPU's cache
_REPUNIT = int.from_bytes(b"\1\0\0\0" * (_MASK_BLOCK // 4), "little")  # times a mask: the mask repeated


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` (any bytes-like object) with the 4-byte ``mask`` repeated (RFC 6455 §5.3).

    One big-integer XOR per block runs in C, which is far faster than any
    per-byte loop in Python.
    """
    n = len(data)
    if n > _MASK_BLOCK:
        with memoryview(data) as view:
            return b"".join([apply_mask(view[i : i + _MASK_BLOCK], mask) for i in range(0, n, _MASK_BLOCK)])
    words = (n + 3) // 4
    repunit = _REPUNIT if words == _MASK_BLOCK // 4 else _REPUNIT >> (32 * (_MASK_BLOCK // 4 - words))
    key = int.from_bytes(mask, "little") * repunit
    return (int.from_bytes(data, "little") ^ key).to_bytes(4 * words, "little")[:n]


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _close_code_allowed(code: int) -> bool:
    # RFC 6455 §7.4: 1004-1006 and 1015 must never be sent; 1016-2999 are
    # reserved for future RFCs; 3000-4999 belong to libraries and apps.
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


def encode_frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False, mask_key: bytes | None = None) -> bytes:
    """Return one frame on the wire; unmasked unless ``mask_key`` is given."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    m = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask_key is None:
        return head + payload
    return head + mask_key + apply_mask(payload, mask_key)


def close_payload(code: int | None, reason: str = "") -> bytes:
    """Return the body of a close frame; the reason is cut to fit 125 bytes."""
    if code is None or code == CloseCode.NO_STATUS:
        return b""
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


@dataclass
class Frame:
    """One WebSocket frame. Masking and the length field exist only on the wire."""

    opcode: Opcode
    payload: bytes = b""
    fin: bool = True
    rsv1: bool = False

    def serialize(self, mask_key: bytes | None = None) -> bytes:
        """Return the frame's bytes, masked with ``mask_key`` when given (clients)."""
        return encode_frame(self.opcode, self.payload, self.fin, self.rsv1, mask_key)


class FrameParser:
    """Cut a byte stream into frames, however it is split.

    Checks everything that can be checked on one frame: reserved bits and
    opcodes, masking, control-frame rules and the size limit.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE, *, masked: bool = True) -> None:
        self.max_size = max_size
        self.masked = masked  # True on a server: every client frame is masked
        self._buf = bytearray()
        # (opcode, payload offset, mask key) of a frame whose payload is still arriving
        self._partial: tuple[int, int, bytes] | None = None
        self.allow_rsv1 = False  # set when permessage-deflate is negotiated
        self._plain: list[bytes] = []  # the unmasked start of the frame still arriving
        self._plain_size = 0
        self._frames: list[Frame] = []
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer ``data`` and return the frames it completes.

        Frames that precede a violation are returned first; the error is
        raised by the next call (or by ``check()``).

        Raises:
            ProtocolError: the stream breaks RFC 6455 (code 1002).
            MessageTooBig: a frame is longer than ``max_size`` (code 1009).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        self._partial = None
        self._frames = []
        try:
            self._parse()
        except ProtocolError as exc:
            if not self._frames:
                raise
            self._error = exc
        frames, self._frames = self._frames, []
        return frames

    def check(self) -> None:
        """Raise the violation found behind the frames last returned, if any."""
        if self._error is not None:
            raise self._error

    def _parse(self) -> None:
        buf = self._buf
        frames = self._frames
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x30 or b0 & 0x40 and (not self.allow_rsv1 or opcode == 0 or opcode >= 8):
                # RFC 7692 §6: with permessage-deflate, RSV1 marks the first
                # frame of a compressed message, never a continuation or control.
                raise ProtocolError("reserved bits must be 0")
            if opcode > 2 and opcode not in (8, 9, 10):
                raise ProtocolError(f"reserved opcode {opcode}")
            length = b1 & 0x7F
            if opcode >= 8:
                if not b0 & 0x80:
                    raise ProtocolError("fragmented control frame")
                if length > 125:
                    raise ProtocolError("control frame longer than 125 bytes")
            if bool(b1 & 0x80) != self.masked:
                # RFC 6455 §5.1: a server MUST close on an unmasked client frame,
                # and a client on a masked server frame.
                raise ProtocolError("frame must be masked" if self.masked else "frame must not be masked")
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise ProtocolError("frame length has its top bit set")
                head = 10
            if length > self.max_size:
                raise MessageTooBig(f"frame of {length} bytes exceeds the limit of {self.max_size}")
            if self.masked:
                head += 4
            if end - pos < head + length:
                mask = bytes(buf[pos + head - 4 : pos + head]) if self.masked else b""
                self._partial = (b0, head, mask)
                break
            done = self._plain_size  # unmasked while the frame arrived: only the rest is left
            with memoryview(buf) as view, view[pos + head + done : pos + head + length] as rest:
                if self.masked:
                    mask = bytes(view[pos + head - 4 : pos + head])
                    payload = apply_mask(rest, mask[done % 4 :] + mask[: done % 4])
                else:
                    payload = bytes(rest)
            if done:
                self._plain.append(payload)
                payload = b"".join(self._plain)
                self._plain, self._plain_size = [], 0
            frames.append(Frame(_OPCODES[opcode], payload, bool(b0 & 0x80), bool(b0 & 0x40)))
            pos += head + length
            del buf[:pos]  # consumed at once, so an error below keeps these frames
            end -= pos
            pos = 0

    @property
    def partial_opcode(self) -> int | None:
        """The opcode of a frame whose payload is still arriving, or None."""
        return None if self._partial is None else self._partial[0] & 0x0F

    @property
    def partial_compressed(self) -> bool:
        """Whether the frame still arriving has RSV1 (compressed) set."""
        return self._partial is not None and bool(self._partial[0] & 0x40)

    def partial_payload(self, start: int) -> bytes:
        """Return the payload received so far of the frame still arriving,
        from ``start`` on, unmasked.

        What is unmasked here is kept, so each byte is unmasked once, however
        the frame arrives. (It stays in the buffer too: cutting it out makes
        the buffer shrink and grow again on every read, which costs more.)
        """
        _, head, mask = self._partial
        done = self._plain_size
        buf = self._buf
        if len(buf) == head + done:
            new = b""
        else:
            with memoryview(buf) as view, view[head + done :] as received:
                new = apply_mask(received, mask[done % 4 :] + mask[: done % 4]) if mask else bytes(received)
            self._plain.append(new)
            self._plain_size += len(new)
        return b"".join(self._plain)[start:] if start < done else new[start - done :]


def inflate(inflater, data: bytes, final: bool, limit: int) -> bytes:
    """Inflate one fragment of a compressed message (RFC 7692 §7.2.2).

    Raises:
        MessageTooBig: the message inflates to more than ``limit`` more bytes
            (a zip bomb is stopped here, with no more than ``limit`` in memory).
        ProtocolError: the data is not valid deflate.
    """
    try:
        out = inflater.decompress(data, limit + 1)
        if final and not inflater.unconsumed_tail:
            out += inflater.decompress(b"\x00\x00\xff\xff", limit + 1 - len(out))
    except zlib.error:
        raise ProtocolError("compressed message is not valid deflate") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise MessageTooBig("message inflates past the size limit")
    return out


_compressors: dict[int, object] = {}  # one per window size, shared by every connection


def deflate(payload: bytes, window_bits: int) -> bytes:
    """Compress one message with no context takeover (RFC 7692 §7.2.1).

    A full flush after each message resets the compressor, so no message
    refers back to an earlier one: the same bytes suit every client that
    negotiated this window size, and one compressor serves them all.
    """
    compressor = _compressors.get(window_bits)
    if compressor is None:
        compressor = _compressors[window_bits] = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    return data[:-4]  # the flush ends in 00 00 ff ff, which the peer adds back


def encode_messages(messages: list[tuple[int, bytes]], window_bits: int | None = None) -> bytes:
    """Encode (opcode, payload) messages as server frames, compressed when the
    client negotiated permessage-deflate (``window_bits``) and it pays off."""
    if window_bits is None:
        return b"".join(encode_frame(opcode, payload) for opcode, payload in messages)
    return b"".join(
        encode_frame(opcode, deflate(payload, window_bits), rsv1=True) if len(payload) >= DEFLATE_MIN_SIZE
        else encode_frame(opcode, payload)
        for opcode, payload in messages
    )


class PerMessageDeflate:
    """permessage-deflate (RFC 7692) as this server runs it.

    The server always answers with server_no_context_takeover and
    client_no_context_takeover: every message is compressed on its own, so a
    broadcast is compressed once for all clients with the same window size,
    and an idle connection holds no zlib state at all.
    """

    def __init__(self, window_bits: int = zlib.MAX_WBITS) -> None:
        self.window_bits = window_bits  # of the server's compressor

    @classmethod
    def negotiate(cls, header: str) -> tuple[PerMessageDeflate, str] | None:
        """Accept the first permessage-deflate offer this server supports.

        Returns the extension and the Sec-WebSocket-Extensions answer, or
        None: offers with unknown, repeated or malformed parameters are
        declined, and so is server_max_window_bits=8, which zlib cannot do.
        """
        for offer in header.split(","):
            name, *params = [part.strip() for part in offer.split(";")]
            if name.lower() != "permessage-deflate":
                continue
            seen: dict[str, str] = {}
            for param in params:
                key, _, value = param.partition("=")
                key, value = key.strip().lower(), value.strip().strip('"')
                if key in seen:
                    break
                seen[key] = value
            else:
                window_bits = cls._window_bits(seen)
                if window_bits is None:
                    continue
                answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                if "server_max_window_bits" in seen:
                    answer += f"; server_max_window_bits={window_bits}"
                return cls(window_bits), answer
        return None

    @staticmethod
    def _window_bits(params: dict[str, str]) -> int | None:
        window_bits = zlib.MAX_WBITS
        for key, value in params.items():
            if key in ("server_no_context_takeover", "client_no_context_takeover"):
                if value:
                    return None
            elif key == "server_max_window_bits":
                if not (value.isascii() and value.isdigit() and 9 <= int(value) <= 15):
                    return None
                window_bits = int(value)
            elif key == "client_max_window_bits":
                # The server inflates with a 32 KiB window, which reads any smaller one.
                if value and not (value.isascii() and value.isdigit() and 8 <= int(value) <= 15):
                    return None
            else:
                return None
        return window_bits


class State(enum.Enum):
    """Where a connection is in its life after the opening handshake."""

    OPEN = 1
    CLOSING = 2  # we sent a close frame and wait for the peer's
    CLOSED = 3  # nothing more may be sent; the TCP connection can go


@dataclass
class Message:
    """A complete data message (fragments joined), text or binary."""

    opcode: Opcode
    data: bytes


class WebSocketProtocol:
    """Sans-I/O WebSocket connection: bytes in, messages and bytes out.

    Feed received bytes to ``receive_data()``, then take complete messages
    from ``events_received()`` and bytes to write from ``data_to_send()``.
    It answers pings, reassembles fragments, validates UTF-8 across them and
    runs the closing handshake. ``receive_data()`` never raises: a peer that
    breaks the protocol gets a close frame with the matching code, and the
    state becomes CLOSED.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE, *, client: bool = False,
                 deflate: PerMessageDeflate | None = None) -> None:
        self.max_size = max_size
        self.state = State.OPEN
        self.parser = FrameParser(max_size, masked=not client)
        self.deflate = deflate  # negotiated permessage-deflate, or None
        self.parser.allow_rsv1 = deflate is not None
        self._inflater = None  # inflates the compressed message being received
        self.client = client
        self.close_code: int | None = None  # from the peer's close frame
        self.close_reason = ""
        self.failed = False  # closed by fail(): the peer's unread bytes may still come
        self._events: list[Message] = []
        self._out: list[bytes] = []
        self._frag_opcode: Opcode | None = None
        self._frag_buf = bytearray()  # one buffer: tiny fragments cost no per-part memory
        self._decoder = None
        self._partial_decoder = None  # checks a text frame that is still arriving
        self._partial_checked = 0

    # Bytes in.

    def receive_data(self, data: bytes) -> None:
        """Process bytes received from the peer."""
        if self.state is State.CLOSED:
            return
        try:
            frames = self.parser.feed(data)
            if frames:
                self._partial_decoder = None
                self._partial_checked = 0
            for frame in frames:
                self._receive_frame(frame)
                if self.state is State.CLOSED:
                    return
            if frames:
                self.parser.check()  # raises a violation found behind these frames
            if self.state is State.OPEN:
                self._check_partial_text()
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)

    def _check_partial_text(self) -> None:
        """Fail fast on bad UTF-8 in a text frame before all of it has arrived."""
        opcode = self.parser.partial_opcode
        if opcode == Opcode.CONT:
            opcode = self._frag_opcode
        if opcode != Opcode.TEXT or self._inflater is not None or self.parser.partial_compressed:
            return  # compressed bytes are checked once inflated
        data = self.parser.partial_payload(self._partial_checked)
        if not data:
            return
        decoder = self._partial_decoder
        if decoder is None:
            decoder = self._partial_decoder = codecs.getincrementaldecoder("utf-8")()
            if self._decoder is not None:  # continue where the earlier fragments ended
                decoder.setstate(self._decoder.getstate())
        if not data.isascii() or decoder.getstate()[0]:  # ASCII after a whole character is valid
            try:
                decoder.decode(data, False)
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not valid UTF-8") from None
        self._partial_checked += len(data)

    def receive_eof(self) -> None:
        """Note that the peer closed the TCP connection."""
        if self.state is not State.CLOSED:
            self.close_code = self.close_code or CloseCode.ABNORMAL
            self.state = State.CLOSED

    def _receive_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode >= 8:
            if opcode == Opcode.CLOSE:
                self._receive_close(frame.payload)
            elif opcode == Opcode.PING and self.state is State.OPEN:
                self._send_frame(Opcode.PONG, frame.payload)
            return
        if self.state is not State.OPEN:
            return  # RFC 6455 §5.5.1: after sending a close frame, data is discarded.
        payload = frame.payload
        if opcode == Opcode.CONT:
            if self._frag_opcode is None:
                raise ProtocolError("continuation frame without a message to continue")
            opcode = self._frag_opcode
        elif self._frag_opcode is not None:
            raise ProtocolError("new message before the fragmented one ended")
        elif frame.rsv1:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        if self._inflater is not None:
            payload = inflate(self._inflater, payload, frame.fin, self.max_size - len(self._frag_buf))
            if frame.fin:
                self._inflater = None
        size = len(self._frag_buf) + len(payload)
        if size > self.max_size:
            raise MessageTooBig(f"message exceeds the limit of {self.max_size} bytes")
        if opcode == Opcode.TEXT:
            if frame.fin and self._frag_opcode is None:
                if not _is_utf8(payload):
                    raise InvalidPayload("text message is not valid UTF-8")
            else:
                # Decode fragment by fragment so that bad UTF-8 fails fast.
                if self._decoder is None:
                    self._decoder = codecs.getincrementaldecoder("utf-8")()
                try:
                    self._decoder.decode(payload, frame.fin)
                except UnicodeDecodeError:
                    raise InvalidPayload("text message is not valid UTF-8") from None
        if frame.fin:
            if self._frag_buf:
                self._frag_buf += payload
                payload = bytes(self._frag_buf)
            self._events.append(Message(opcode, payload))
            self._frag_opcode = None
            self._frag_buf = bytearray()
            self._decoder = None
        else:
            self._frag_opcode = opcode
            self._frag_buf += payload

    def _receive_close(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise ProtocolError("close frame with a 1-byte payload")
        if payload:
            code = (payload[0] << 8) | payload[1]
            if not _close_code_allowed(code):
                raise ProtocolError(f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidPayload("close reason is not valid UTF-8") from None
        else:
            code, reason = CloseCode.NO_STATUS, ""
        self.close_code, self.close_reason = code, reason
        if self.state is State.OPEN:
            # RFC 6455 §5.5.1: answer with a close frame, echoing the code.
            self._send_frame(Opcode.CLOSE, payload)
        self.state = State.CLOSED

    # Bytes out.

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask_key = os.urandom(4) if self.client else None
        self._out.append(encode_frame(opcode, payload, mask_key=mask_key))

    def send_text(self, text: str) -> None:
        """Queue a text message."""
        self.send_message(Opcode.TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        """Queue a binary message."""
        self.send_message(Opcode.BINARY, data)

    def send_message(self, opcode: int, data: bytes) -> None:
        """Queue a data message; nothing is sent once a close frame went out."""
        if self.state is State.OPEN:
            self._send_frame(opcode, data)

    def send_ping(self, data: bytes = b"") -> None:
        """Queue a ping."""
        if self.state is State.OPEN:
            self._send_frame(Opcode.PING, data)

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the state becomes CLOSING."""
        if self.state is State.OPEN:
            self._send_frame(Opcode.CLOSE, close_payload(code, reason))
            self.state = State.CLOSING

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection (RFC 6455 §7.1.7): send a close frame, then CLOSED."""
        if self.state is State.OPEN:
            self._send_frame(Opcode.CLOSE, close_payload(code, reason))
        self.state = State.CLOSED
        self.failed = True

    def events_received(self) -> list[Message]:
        """Return and forget the messages completed so far."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Return and forget the bytes queued for the peer."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out = []
        return out


###############################################################################
# 3. HTTP #####################################################################
###############################################################################

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters but tab, CR and LF


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def printable(text: str) -> str:
    """Return ``text`` with control characters and backslashes escaped (``\\x1b``, ``\\\\``).

    For log lines: what a client sends can never start a new line or drive
    the terminal that shows the log.
    """
    return _UNPRINTABLE.sub(lambda m: "\\\\" if m.group() == "\\" else f"\\x{ord(m.group()):02x}", text)


@dataclass
class Request:
    """An HTTP request head; header names are lower-case.

    Header values are ``str`` decoded as Latin-1, so each character is one
    byte as it came (RFC 9110 §5.5 allows bytes over 0x7F, obs-text, in
    values; browsers send UTF-8 cookies that way): ``value.encode("latin-1")``
    gives the bytes back.
    """

    method: str
    target: str
    path: str
    query: str
    headers: dict[str, str]
    version: str = "HTTP/1.1"
    remote_addr: str = ""  # the client's address: the peer's, or what a trusted proxy says
    passed: dict[str, str] = field(default_factory=dict)  # the headers the child may see (--passheaders)

    def header_tokens(self, name: str) -> set[str]:
        """Return the comma-separated tokens of a header, lower-cased."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, CRLF-terminated).

    Raises:
        BadRequest: the head is not a well-formed HTTP/1.x request.
        HTTPError: 505 for an HTTP version other than 1.0 or 1.1.
    """
    text = head.decode("latin-1")  # a byte a character: values may hold obs-text
    crlf = text.count("\r\n")  # every CR and LF in the head must be one of a CRLF pair
    if _CONTROL.search(text) or text.count("\r") != crlf or text.count("\n") != crlf:
        raise BadRequest("control character in the request head")
    lines = text.split("\r\n")
    if not lines[0].isascii():
        raise BadRequest("request line is not ASCII")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadRequest("malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if not re.match(r"HTTP/\d\.\d\Z", version):
            raise BadRequest("malformed HTTP version")
        raise HTTPError("only HTTP/1.0 and HTTP/1.1 are supported", status=505)
    if not target.startswith("/"):  # (no space in it: the line has three parts)
        raise BadRequest("request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest("malformed header line")
        value = value.strip(" \t")
        name = name.lower()
        if name in headers:
            if name == "host":
                raise BadRequest("more than one Host header")  # RFC 7230 §5.4
            # RFC 9110 §5.3: a repeated field is its values joined with
            # commas; cookies are joined the way one Cookie header holds them.
            value = f"{headers[name]}{'; ' if name == 'cookie' else ', '}{value}"
        headers[name] = value
    if "host" not in headers and version == "HTTP/1.1":
        # RFC 7230 §5.4: an HTTP/1.1 request without Host gets 400 (and RFC
        # 6455 §4.1 lists it among the handshake's fields).
        raise BadRequest("missing Host header")
    path, _, query = target.partition("?")
    query = query.partition("#")[0]
    return Request(method, target, path, query, headers, version)


def render_response(status: int, headers: list[tuple[str, str]] = (), body: bytes = b"", *, length: int | None = None) -> bytes:
    """Return a response head (and body); every response but 101 closes the connection."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if status != 101:
        if status != 304:
            lines.append(f"Content-Length: {len(body) if length is None else length}")
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(exc: HTTPError, *, head_only: bool = False) -> bytes:
    """Return the response for an HTTPError: its status, headers and reason."""
    if exc.html is not None:
        body, ctype = exc.html, "text/html; charset=utf-8"
    else:
        body, ctype = f"{exc.status} {http.HTTPStatus(exc.status).phrase}: {exc.reason}\n".encode("utf-8"), "text/plain; charset=utf-8"
    headers = exc.headers + [("Content-Type", ctype)]
    return render_response(exc.status, headers, b"" if head_only else body, length=len(body))


def is_websocket_upgrade(request: Request) -> bool:
    """Tell whether a request asks to become a WebSocket (its Upgrade names websocket)."""
    return "websocket" in request.header_tokens("upgrade")


def handshake_response(request: Request, compression: bool = True) -> tuple[bytes, PerMessageDeflate | None]:
    """Validate an opening handshake (RFC 6455 §4.2.1); return the 101 response
    and the negotiated permessage-deflate (None if not offered, supported or allowed).

    Raises:
        MethodNotAllowed: the method is not GET.
        BadRequest: HTTP/1.0, or a missing or malformed Connection or key header.
        UpgradeRequired: a Sec-WebSocket-Version other than 13.
    """
    if request.method != "GET":
        raise MethodNotAllowed("a WebSocket handshake must use GET", [("Allow", "GET")])
    if request.version != "HTTP/1.1":
        raise BadRequest("a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in request.header_tokens("connection"):
        raise BadRequest("Connection header must contain 'Upgrade'")
    if request.headers.get("sec-websocket-version") != "13":
        raise UpgradeRequired("only WebSocket version 13 is supported", [("Sec-WebSocket-Version", "13")])
    key = request.headers.get("sec-websocket-key", "")
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64, got no base64") from None
    if len(raw) != 16:  # RFC 6455 §4.1: a nonce of 16 random bytes
        raise BadRequest(f"Sec-WebSocket-Key must be 16 bytes in base64, got {len(raw)}")
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    deflate = None
    offer = request.headers.get("sec-websocket-extensions")
    if compression and offer:
        negotiated = PerMessageDeflate.negotiate(offer)
        if negotiated is not None:
            deflate, answer = negotiated
            headers.append(("Sec-WebSocket-Extensions", answer))
    return render_response(101, headers), deflate


def check_origin(request: Request, origins: frozenset[str] | None, same_origin: bool) -> None:
    """Refuse a browser's cross-site WebSocket (CSWSH) unless its Origin is allowed.

    A request without Origin does not come from a browser page and passes;
    ``origins`` entries are full origins (``https://example.com``) or hosts
    with an optional port (``example.com:8443``).

    Raises:
        Forbidden: the Origin is not the page's own host (--sameorigin) or
            not in ``origins``.
    """
    origin = request.headers.get("origin")
    if origin is None or (origins is None and not same_origin):
        return
    origin = origin.lower()
    try:
        host = urllib.parse.urlsplit(origin).netloc
    except ValueError:  # "http://[": not a URL
        raise Forbidden(f"origin {origin!r} is not allowed") from None
    if same_origin and host == request.headers.get("host", "").lower():
        return
    if origins is not None and (origin in origins or host in origins):
        return
    raise Forbidden(f"origin {origin!r} is not allowed")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an address; an IPv4-mapped IPv6 one (a dual-stack listener's) counts as IPv4.

    Raises:
        ValueError: not an IP address.
    """
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(value: str) -> list[str]:
    """Return the ``for=`` addresses of a Forwarded header (RFC 7239), first hop first.

    Raises:
        ValueError: an element has no usable ``for=`` address (none, unknown,
            an obfuscated name, or bad syntax).
    """
    hops = []
    for element in value.split(","):
        address = None
        for pair in element.split(";"):
            name, sep, token = pair.strip().partition("=")
            if not sep:
                raise ValueError(f"malformed pair {pair.strip()!r}")
            if name.lower() != "for":
                continue
            token = token.strip('"')
            if token.startswith("["):  # "[2001:db8::1]:4711"
                token = token[1:].partition("]")[0]
            elif token.count(":") == 1:  # "192.0.2.1:4711"
                token = token.partition(":")[0]
            address = token
        if address is None:
            raise ValueError("an element without for=")
        hops.append(address)
    return hops


def is_trusted(peer: str, trusted: tuple | None) -> bool:
    """Tell whether a peer address is in ``trusted`` (--trustproxy's networks)."""
    if not trusted or not peer:
        return False
    try:
        address = _ip(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def client_address(peer: str, headers: dict[str, str], trusted: tuple | None) -> str:
    """Return the client's address: the peer's, or, from a trusted proxy, the forwarded one.

    Only when the peer is in ``trusted`` (a tuple of networks, --trustproxy):
    the rightmost address of X-Forwarded-For that is not trusted itself (or
    the leftmost, if all are), else the same from Forwarded (RFC 7239). A
    header that does not parse is ignored, so a client can never choose its
    address, and a malformed one never costs more than the peer's address.
    """
    if not is_trusted(peer, trusted):
        return peer
    for name in ("x-forwarded-for", "forwarded"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            hops = [hop.strip() for hop in value.split(",")] if name == "x-forwarded-for" else _forwarded_for(value)
            addresses = [_ip(hop) for hop in hops]
        except ValueError as exc:
            log.debug("! ignoring a malformed %s header from %s: %s", name, peer, exc)
            continue
        for address in reversed(addresses):
            if not any(address in network for network in trusted):
                return str(address)
        return str(addresses[0])
    return peer


def passed_headers(headers: dict[str, str], passed: tuple[str, ...], from_proxy: tuple[str, ...],
                   trusted_peer: bool) -> dict[str, str]:
    """Return the request headers the child may see: ``passed`` ones, and ``from_proxy`` ones from a trusted proxy.

    A header that only a proxy may set (--proxyheaders) is empty for every
    other peer, so a client that reaches the server directly cannot forge it.
    Names are lower-case; a header not sent is left out.
    """
    names = passed + from_proxy if trusted_peer else passed
    return {name: headers[name] for name in names if name in headers}


def parse_cookies(header: str) -> dict[str, str]:
    """Return the cookies of a Cookie header (RFC 6265 §4.2.1: ``name=value; name2=value2``).

    A pair without ``=`` and an empty pair are skipped; a value in double
    quotes loses them; of a repeated name the first is kept (RFC 6265 §5.4
    sends the most specific cookie first). Never raises.
    """
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def cgi_name(header: str) -> str:
    """Return a header's name as CGI and the templates spell it: X-Forwarded-User -> X_FORWARDED_USER."""
    return header.upper().replace("-", "_")


def room_from_path(path: str) -> str:
    """Return the room named by an upgrade path: '/chat' is room 'chat'.

    Raises:
        NotFound: the path is not of the form /ROOM.
        BadRequest: the room name is malformed or reserved.
    """
    parts = path.split("/")
    if len(parts) != 2 or not parts[1]:
        raise NotFound("a room's path is /ROOM")
    try:
        room = urllib.parse.unquote(parts[1], errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("room name is not valid UTF-8") from None
    if "/" in room or any(c < " " or c == "\x7f" for c in room):
        raise BadRequest("room name has a slash or a control character")
    if room in RESERVED_ROOMS:
        raise BadRequest(f"room name {room!r} is reserved")
    return room


def resolve_static(root: str, url_path: str) -> str | None:
    """Return the file under ``root`` that ``url_path`` names, or None.

    A directory means its index.html. Nothing outside ``root`` is ever
    returned: '..' segments, NULs and backslashes are refused, and symlinks
    are resolved before the containment check.
    """
    try:
        path = urllib.parse.unquote(url_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, *parts))
    if os.path.isdir(full):
        full = os.path.realpath(os.path.join(full, "index.html"))
    if full != root and not full.startswith(root + os.sep):
        return None
    return full if os.path.isfile(full) else None


def not_modified_since(header: str | None, mtime: int) -> bool:
    """Tell whether an If-Modified-Since header makes a file's answer 304."""
    if not header:
        return False
    try:
        since = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False  # RFC 9110 §13.1.3: an invalid date is ignored
    if since is None or since.tzinfo is None:
        return False
    return mtime <= since.timestamp()


def guess_type(path: str) -> str:
    """Return the Content-Type for a file name; text types say UTF-8."""
    ctype, _ = mimetypes.guess_type(path)
    if ctype is None:
        return "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    return ctype


###############################################################################
# 4. Rooms and child processes ################################################
###############################################################################


@dataclass
class Config:
    """Everything the server needs to know; built by parse_args() or by hand."""

    cmd: str = "cat"
    args: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 9000
    binary: bool = False
    clientframe: str | None = None  # None, "json" or "gwsocket"
    serverframe: str | None = None
    joinmsg: str | None = None
    leavemsg: str | None = None
    staticdir: str | None = None
    max_size: int = DEFAULT_MAX_MESSAGE
    delimiters: bytes = b"\n"
    passenv: tuple[str, ...] = DEFAULT_PASSENV
    cache_size: int = 0  # --cache: replay this many messages to each new client
    cache_tagged: bool = False  # only messages with "_cache": true
    cache_persist: bool = False
    rooms: frozenset[str] | None = None  # --rooms: the only rooms accepted
    max_rooms: int | None = None
    oneshot: bool = False
    tcp: bool = False
    tcp_ports: tuple[int, int] = (9001, 9999)
    delay: float = 0.0
    metrics: bool = False
    api: bool = False
    log_format: str = "text"
    verbose: int = 0
    max_head: int = DEFAULT_MAX_HEAD
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_backlog: int = DEFAULT_MAX_BACKLOG
    ping: float = DEFAULT_PING  # 0: no keepalive pings
    origins: frozenset[str] | None = None  # --origins: allowed Origin values (or hosts)
    trust_proxy: tuple = ()  # --trustproxy: networks whose X-Forwarded-For/Forwarded is believed
    pass_headers: tuple[str, ...] = ()  # --passheaders: lower-case names of the headers the child sees
    proxy_headers: tuple[str, ...] = ()  # --proxyheaders: the same, only from a --trustproxy peer
    max_clients_per_addr: int | None = None  # --maxclientsperaddr
    max_rate: float | None = None  # --maxrate: messages a second per client
    max_burst: float = 1.0  # --maxrate's BURST: messages a client may send at once
    same_origin: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    compression: bool = True  # negotiate permessage-deflate when a client offers it
    pty: bool = False  # run the child on a pseudo-terminal
    devconsole: bool = False  # serve the built-in console page at /
    workers: int = 1  # --workers: processes that serve connections, each owning a share of the rooms


def child_env(config: Config, room: str, request: Request) -> dict[str, str]:
    """Return the child's environment: --passenv variables plus CGI-like ones."""
    env = {name: os.environ[name] for name in config.passenv if name in os.environ}
    # Python children flush every write, so their output is not held back in a
    # pipe buffer; naming PYTHONUNBUFFERED in --passenv leaves it to the server's.
    if "PYTHONUNBUFFERED" not in config.passenv:
        env["PYTHONUNBUFFERED"] = "1"
    if config.pty and "TERM" not in config.passenv:
        env["TERM"] = "xterm-256color"
    env["ROOM"] = room
    env["QUERY_STRING"] = request.query
    env["REMOTE_ADDR"] = request.remote_addr
    for name, value in request.passed.items():
        # The bytes as they came: os.fsencode() turns this back into them.
        env["HTTP_" + cgi_name(name)] = os.fsdecode(value.encode("latin-1"))
    return env


_TEMPLATE_VAR = re.compile(r"#(ID|ROOM|REMOTE_ADDR|QUERY_STRING|(?:QUERY|HEADER|COOKIE)_[A-Za-z0-9_]+)")


def render_template(template: str, conn_id: int, room: str, request: Request) -> str:
    """Fill #ID, #ROOM, #REMOTE_ADDR, #QUERY_STRING, #QUERY_<NAME>, #HEADER_<NAME> and #COOKIE_<NAME> in a template.

    One pass, so a value can never bring in another variable; room names,
    query values, header values and cookie values are percent-encoded (a
    header's bytes as they came), so they cannot break a JSON template. A
    header not passed (--passheaders) or not sent is empty.
    """
    query = urllib.parse.parse_qs(request.query, keep_blank_values=True)
    cookies = None

    def value(match: re.Match) -> str:
        nonlocal cookies
        name = match.group(1)
        if name == "ID":
            return str(conn_id)
        if name == "ROOM":
            return urllib.parse.quote(room, safe="")
        if name == "REMOTE_ADDR":
            return request.remote_addr
        if name == "QUERY_STRING":  # keeps its %XX escapes; " \\ < > and spaces get them
            return urllib.parse.quote(request.query, safe="/?&=%:;,+@!$'()*~")
        if name.startswith("HEADER_"):
            wanted = name[7:].upper()
            found = next((v for h, v in request.passed.items() if cgi_name(h) == wanted), "")
            return urllib.parse.quote(found.encode("latin-1"), safe="")
        if name.startswith("COOKIE_"):
            if cookies is None:
                cookies = parse_cookies(request.passed.get("cookie", ""))
            found = cookies.get(name[7:].lower(), cookies.get(name[7:], ""))
            return urllib.parse.quote(found.encode("latin-1"), safe="")
        values = query.get(name[6:].lower()) or query.get(name[6:]) or [""]
        return urllib.parse.quote(values[0], safe="")

    return _TEMPLATE_VAR.sub(value, template)


_GWSOCKET_HEADER = struct.Struct("!III")  # client id, type, payload length


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def to_child(message: Message, conn_id: int, config: Config) -> bytes:
    """Return the bytes written to the child's stdin for a client's message.

    Raises:
        FramingError: with --frame=json, the message is not a JSON object.
    """
    mode = config.clientframe
    if mode == "json":
        try:
            obj = json.loads(message.data, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise FramingError("message is not JSON") from None
        if not isinstance(obj, dict):
            raise FramingError("message is not a JSON object")
        obj["_from"] = conn_id  # set by the server, so it cannot be forged
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        # A lone surrogate from a \ud800 escape goes back out as that escape.
        return line.encode("utf-8", "backslashreplace") + b"\n"
    if mode == "gwsocket":
        kind = 2 if message.opcode == Opcode.BINARY else 1
        return _GWSOCKET_HEADER.pack(conn_id, kind, len(message.data)) + message.data
    if config.binary:
        return message.data
    return message.data + b"\n"


def line_to_child(line: str, conn_id: int, config: Config) -> bytes:
    """Return the bytes written to the child for a --joinmsg/--leavemsg line."""
    data = line.encode("utf-8")
    if config.clientframe == "gwsocket":
        return _GWSOCKET_HEADER.pack(conn_id, 1, len(data)) + data
    return data + b"\n"


def split_output(buf: bytes, delimiters: bytes, max_size: int, clean: int = 0) -> tuple[list[bytes], bytes]:
    """Cut child output at any delimiter byte; return (messages, unfinished rest).

    With the default newline delimiter a trailing CR is dropped. A line
    longer than ``max_size`` is cut into ``max_size`` pieces, so a child that
    never ends its line cannot grow memory without bound. The first
    ``clean`` bytes are known to hold no delimiter.
    """
    if len(delimiters) == 1:
        if not clean:
            pieces = buf.split(delimiters)
        else:  # find() passes the clean start at memchr speed; split() looks at every byte
            first = buf.find(delimiters, clean)
            pieces = [buf] if first < 0 else [buf[:first], *buf[first + 1 :].split(delimiters)]
    else:
        pieces = re.split(b"[" + re.escape(delimiters) + b"]", buf)
    rest = pieces.pop()
    if b"\n" in delimiters:
        pieces = [p[:-1] if p.endswith(b"\r") else p for p in pieces]
    if len(rest) > max_size or any(len(p) > max_size for p in pieces):
        pieces = [p[i : i + max_size] for p in pieces for i in range(0, len(p) or 1, max_size)]
        cut = len(rest) - len(rest) % max_size
        pieces += [rest[i : i + max_size] for i in range(0, cut, max_size)]
        rest = rest[cut:]
    return pieces, rest


def parse_gwsocket(buf: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, int, bytes]], int]:
    """Parse gwsocket messages from child output; return ([(to, type, payload)], used).

    Raises:
        FramingError: a message type is not 1 or 2, or a payload exceeds max_size.
    """
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 12:
        to, kind, length = _GWSOCKET_HEADER.unpack_from(buf, pos)
        if kind not in (1, 2):
            raise FramingError(f"gwsocket message type {kind} is neither 1 (text) nor 2 (binary)")
        if length > max_size:
            raise FramingError(f"gwsocket payload of {length} bytes exceeds the limit of {max_size}")
        if end - pos - 12 < length:
            break
        out.append((to, kind, bytes(buf[pos + 12 : pos + 12 + length])))
        pos += 12 + length
    return out, pos


@dataclass
class Routed:
    """Where a line from the child goes: ``to`` one client or (None) everyone."""

    to: int | None = None
    meta: dict | None = None  # "_meta": true: kept as the room's metadata, not sent
    cache: bool = False  # "_cache": true: kept by --cache tagged:N


_EVERYONE = Routed()


def from_child(line: bytes) -> Routed:
    """Read the routing fields (_to, _meta, _cache) of a JSON line from the child."""
    if not line.startswith(b"{") or not (b'"_to"' in line or b'"_meta"' in line or b'"_cache"' in line):
        return _EVERYONE  # the cheap test first: most lines are plain broadcasts
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return _EVERYONE
    if not isinstance(obj, dict):
        return _EVERYONE
    if obj.get("_meta") is True:
        return Routed(meta={key: value for key, value in obj.items() if key != "_meta"})
    to = obj.get("_to")
    return Routed(to if type(to) is int else None, None, obj.get("_cache") is True)


def text_payload(data: bytes) -> bytes:
    """Return ``data`` as valid UTF-8, with bad bytes replaced by U+FFFD."""
    if _is_utf8(data):
        return data
    return data.decode("utf-8", "replace").encode("utf-8")


class PortPool:
    """The --tcpports range; a port goes back to the pool when its room ends.

    With workers, each takes every ``step``-th port from ``start + offset``:
    no port can go to two children, and no worker asks another for one.
    """

    def __init__(self, start: int, end: int, offset: int = 0, step: int = 1) -> None:
        self.range = f"{start}:{end}" if step == 1 else f"{start}:{end} (this worker's share)"
        self._free = collections.deque(range(start + offset, end + 1, step))

    def take(self) -> int:
        """Return a free port.

        Raises:
            RoomUnavailable: every port of the range is in use (close 1013).
        """
        if not self._free:
            raise RoomUnavailable(f"no free TCP port in {self.range}", CloseCode.TRY_AGAIN_LATER)
        return self._free.popleft()

    def give(self, port: int) -> None:
        self._free.append(port)


def open_pty() -> tuple[int, int]:
    """Open a pseudo-terminal for a child: (master, slave), raw input, 24x80.

    On a terminal, C stdio and most programs flush every line. Input is raw,
    so what clients send reaches the child byte for byte and never comes back
    as echo; programs that want line editing (shells) set it up themselves.
    """
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    # Raw input: no line editing, no ^C/^D/^U meaning, no 4 KiB line limit, no
    # CR/NL mapping, no echo. Output keeps \n -> \r\n, as terminals expect.
    attrs[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.ISTRIP)  # iflag
    attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)  # lflag
    attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return master, slave


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Hand a child process's events to its room: its input's flow, its exit, what it logs.

    Its output is read elsewhere (``_StreamProtocol``); what comes through
    here (stderr, or stdout with --tcp) is logged. ``exited`` is done when
    the child exits, whoever still holds its pipes.
    """

    def __init__(self, child: Child, loop: asyncio.AbstractEventLoop) -> None:
        self.child = child
        self.room = child.room
        self.exited = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.child.log_received(fd, data)  # stderr, or stdout with --tcp

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.room.input_resumed()  # nothing more can be written: no one waits for it

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def pause_writing(self) -> None:
        self.room.input_paused()

    def resume_writing(self) -> None:
        self.room.input_resumed()


class _StreamProtocol(asyncio.Protocol):
    """Hand what a child writes (its stdout pipe, TCP connection or terminal) to its room, as it is read."""

    def __init__(self, room: Room, output: bool = True) -> None:
        self.room = room
        self.output = output  # False for the terminal's write side

    def data_received(self, data: bytes) -> None:
        self.room.output_received(data)

    def eof_received(self) -> bool:
        self.room.output_ended()
        return True  # the child may still read its input: ``_kill`` closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset connection, or EIO from a terminal whose other side has
        # closed, also ends the output; what was read before it is delivered.
        if self.output:
            self.room.output_ended()
        self.room.input_resumed()

    def pause_writing(self) -> None:
        self.room.input_paused()

    def resume_writing(self) -> None:
        self.room.input_resumed()


class Child:
    """A room's child process: its start, its input and output, its end.

    The input and output are the child's stdin and stdout, a connection to
    the port it listens on (--tcp), or a terminal (--pty). Output goes to the
    room as it is read (``room.output_received``, then ``room.output_ended``);
    ``write`` feeds the input, and the room hears when the child falls behind
    on it (``room.input_paused``, ``room.input_resumed``). ``exited`` is done
    when the process has exited; ``stop`` ends it and reaps it.
    """

    def __init__(self, room: Room) -> None:
        self.room = room
        self.config = room.config
        self.pid: int | None = None
        self.port: int | None = None  # --tcp: the port it listens on
        self.exited: asyncio.Future | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._input: asyncio.WriteTransport | None = None
        self._output: asyncio.ReadTransport | None = None
        self._killed = False
        self._tasks: list[asyncio.Task] = []

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    async def start(self, env: dict[str, str]) -> None:
        """Start the child and connect to its input and output.

        Raises:
            ProcessSpawnError: the child could not be started or, in TCP mode,
                did not accept a connection in time.
            RoomUnavailable: no TCP port is free.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        stdin = stdout = stderr = subprocess.PIPE
        if config.tcp:
            self.port = self.room.hub.ports.take()
            env["PORT"] = str(self.port)
            stdin = subprocess.DEVNULL
        elif config.pty:
            try:
                master, stdin = open_pty()
            except OSError as exc:  # no /dev/pts in a minimal container, or the system's limit reached
                raise ProcessSpawnError(f"cannot start {config.cmd}: no terminal available ({exc.strerror or exc})") from None
            stdout = stderr = stdin  # all three on the terminal, as in a terminal window
        else:
            # stdout on a pipe of our own: asyncio's subprocess transport hands
            # each read over with call_soon, one more event-loop turn a read.
            output, stdout = os.pipe()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ChildProtocol(self, loop),
                config.cmd,
                *config.args,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=env,
                # Own session and process group: a Ctrl-C on the server's
                # terminal reaches only the server, which stops every child in
                # order, and a signal to the group reaches what the child started.
                start_new_session=True,
            )
        except OSError as exc:
            self._release_port()
            if config.pty:
                os.close(master)
            elif not config.tcp:
                os.close(output)
            raise ProcessSpawnError(f"cannot start {config.cmd}: {exc.strerror or exc}") from None
        finally:
            if config.pty:
                os.close(stdin)  # the child has its own copy of the terminal's side
            elif not config.tcp:
                os.close(stdout)  # and of its output pipe's
        self._transport = transport
        self.pid = transport.get_pid()
        self.exited = protocol.exited
        self.room.hub.on_child_start(self.room)
        if config.tcp:
            try:
                self._input = self._output = await self._connect_tcp()
            except ProcessSpawnError:
                await self.stop()
                raise
        elif config.pty:
            self._output, _ = await loop.connect_read_pipe(
                lambda: _StreamProtocol(self.room), os.fdopen(master, "rb", buffering=0))
            self._input, _ = await loop.connect_write_pipe(
                lambda: _StreamProtocol(self.room, output=False), os.fdopen(os.dup(master), "wb", buffering=0))
        else:
            self._input = transport.get_pipe_transport(0)
            self._output, _ = await loop.connect_read_pipe(
                lambda: _StreamProtocol(self.room), os.fdopen(output, "rb", buffering=0))
        self._input.set_write_buffer_limits(high=CHILD_HIGH_WATER)
        self._tasks.append(loop.create_task(self._watch_exit(self._output)))

    async def _watch_exit(self, output: asyncio.BaseTransport) -> None:
        """Make sure the output ends once the child has exited.

        Helpers the child left in its process group are stopped with it; if
        something outside the group still holds the output open after
        EXIT_DRAIN, the output is ended by force.
        """
        await self.exited
        for signum in (signal.SIGTERM, signal.SIGKILL):
            # Signalled only while the output is open: once the group is empty
            # its number could in time belong to another process group.
            if output.is_closing():
                return
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
            await asyncio.sleep(EXIT_DRAIN)
        output.close()  # what was read is delivered, then the end

    async def _connect_tcp(self) -> asyncio.Transport:
        """Connect to the child's port as soon as it listens (after --delay)."""
        loop = asyncio.get_running_loop()
        if self.config.delay:
            await asyncio.sleep(self.config.delay)
        deadline = loop.time() + TCP_CONNECT_TIMEOUT
        while True:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
            except OSError:
                sock.close()
            except asyncio.CancelledError:  # the room is stopped while it waits
                sock.close()
                raise
            else:
                if sock.getsockname() != sock.getpeername():
                    transport, _ = await loop.create_connection(lambda: _StreamProtocol(self.room), sock=sock)
                    return transport
                # Nothing listened yet and the kernel gave us the same port as
                # our own source port: a TCP self-connection. Not the child.
                sock.close()
            if self.exited.done():
                code = self._transport.get_returncode()
                raise ProcessSpawnError(f"child exited with code {code} before listening on port {self.port}")
            if loop.time() > deadline:
                raise ProcessSpawnError(f"child did not listen on 127.0.0.1:{self.port} within {TCP_CONNECT_TIMEOUT:g} s")
            await asyncio.sleep(0.05)

    def write(self, data: bytes) -> bool:
        """Queue bytes for the child's input; False once the input is gone."""
        transport = self._input
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def kill(self) -> None:
        """SIGKILL to the child's process group at once (its output broke the framing)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def stop(self) -> None:
        """SIGTERM to the child's process group, SIGKILL after KILL_GRACE; reap it."""
        if self.pid is not None and not self._killed:
            self._killed = True
            if self._input is not None and not self._input.is_closing():
                # End of input at once, without the bytes the child never read:
                # close() would wait for them, forever on a terminal.
                self._input.abort()
                await asyncio.sleep(0)  # abort() closes the pipe on the loop's next pass: EOF comes before the signal
            loop = asyncio.get_running_loop()
            deadline = loop.time() + KILL_GRACE
            # On a terminal, a hangup is what ends a session (shells ignore SIGTERM).
            first = signal.SIGHUP if self.config.pty else signal.SIGTERM
            for signum in (first, signal.SIGKILL):
                try:
                    os.killpg(self.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass  # the whole group is gone already
                try:
                    await asyncio.wait_for(asyncio.shield(self.exited), KILL_GRACE)
                    break
                except asyncio.TimeoutError:
                    if signum == first:
                        log.warning("room %r: child %d ignored %s, killing it", self.room.name, self.pid, first.name,
                                    extra={"room": self.room.name})
            # Helpers that outlived the child in its group (one that ignores SIGTERM) get SIGKILL when the
            # grace ends. While one of them lives, no other group can be given the group's number.
            while _group_exists(self.pid):
                if loop.time() >= deadline:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pid, signal.SIGKILL)
                    break
                await asyncio.sleep(0.05)
            # A grandchild may still hold the pipes open; nobody waits for it.
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            self._transport.close()
            if self._output is not None:
                self._output.close()
            self.room.hub.on_child_stop(self.room)
        self._release_port()

    def _release_port(self) -> None:
        if self.port is not None:
            self.room.hub.ports.give(self.port)
            self.port = None

    def log_received(self, fd: int, data: bytes) -> None:
        """Log what the child wrote on stderr (or on stdout with --tcp)."""
        name = "stderr" if fd == 2 else "stdout"
        for text in data.decode("utf-8", "replace").splitlines():
            log.warning("room %r: child %s: %s", self.room.name, name, text, extra={"room": self.room.name})


def _group_exists(pgid: int) -> bool:
    """Whether a process group still has a process in it (a zombie counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Room:
    """One room: its clients, its child and the relay between them.

    Output reaches the room as the child writes it (``output_received``) and
    goes to the clients at once; a client's message goes to the child's
    input as it is parsed. While the child is behind on its input, the
    clients that write to it are not read (backpressure).
    """

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.config = hub.config
        self.name = name
        self.clients: dict[int, Client] = {}
        self.metadata: dict | None = None
        self.cache = hub.cache_for(name)
        self.child = Child(self)
        self.ended = False  # no client may join once the child is gone or going
        self.starting: asyncio.Task | None = None
        self.failure: str | None = None  # why the server stopped the child, if it did
        self.stats = collections.Counter()  # connections, messages and bytes in and out
        self.opened = time.time()  # for /api/rooms?details
        self._held: list[bytes] | None = []  # output read before the first client is in
        self._output_done = False
        self._report: asyncio.Task | None = None  # tells the hub when the child has exited
        self._behind: asyncio.TimerHandle | None = None  # while the child is behind on its input: pings the waiting
        self._waiting: set[Client] = set()  # clients not read until it catches up
        self._out = bytearray()  # output that does not make a whole message yet

    async def start(self, env: dict[str, str]) -> None:
        """Start the room's child (see ``Child.start``)."""
        await self.child.start(env)

    async def stop(self) -> None:
        """Stop the child and reap it, after it has finished starting.

        A --tcp child still waiting for its connection (--delay, retries) is
        not waited for: that wait is cancelled.
        """
        self.ended = True
        if self.starting is not None and not self.starting.done():
            if self.config.tcp and self.child.pid is not None:
                self.starting.cancel()
            await asyncio.gather(self.starting, return_exceptions=True)
        await self.child.stop()
        if self._report is not None:
            self._report.cancel()

    def start_output(self) -> None:
        """Start relaying the child's output, once its first client is in the room.

        Not earlier: what the child writes at once (a greeting, a prompt) must
        reach that client, not an empty room. Until then output is held, not
        left unread: a terminal whose child has exited loses what is unread.
        It is held only while the room's first client waits for the start.
        """
        held, self._held = self._held, None
        if held is None:
            return
        for data in held:
            self.output_received(data)
        if self._output_done:
            self._end_output()

    # Clients to child.

    def receive(self, client: Client, message: Message) -> None:
        """Pass a client's message to the child."""
        try:
            payload = to_child(message, client.id, self.config)
        except FramingError as exc:
            log.warning("client %d: message dropped: %s", client.id, exc, extra={"room": self.name, "client": client.id})
            return
        self.stats["messages_in"] += 1
        self.stats["bytes_in"] += len(message.data)
        self.send_to_child(payload, client)

    def send_to_child(self, data: bytes, client: Client | None = None) -> None:
        """Write to the child; while it is behind, ``client`` is not read.

        So memory stays bounded (backpressure) while the child catches up.
        Without a client (leave messages) nothing waits.
        """
        if self.ended or not self.child.write(data):
            return
        if self._behind is not None and client is not None and client not in self._waiting:
            self._waiting.add(client)
            client.pause()

    def input_paused(self) -> None:
        """The child is behind on its input: its clients wait (called by the transport)."""
        if self._behind is None:
            self._behind = asyncio.get_running_loop().call_later(WAIT_PING, self._ping_waiting)

    def input_resumed(self) -> None:
        """The child has caught up, or its input is gone: read its clients again."""
        if self._behind is None:
            return
        self._behind.cancel()
        self._behind = None
        waiting, self._waiting = self._waiting, set()
        for client in waiting:
            client.resume()

    def _ping_waiting(self) -> None:
        # Not read while waiting, so a peer that left would go unseen; a ping
        # to a closed socket draws a reset, which ends the connection.
        for client in list(self._waiting):
            client.ping()
        self._behind = asyncio.get_running_loop().call_later(WAIT_PING, self._ping_waiting)

    def forget(self, client: Client) -> None:
        """Stop tracking a client that has left."""
        self._waiting.discard(client)

    # Child to clients.

    def broadcast(self, messages: list[tuple[int, bytes]]) -> None:
        """Send (opcode, payload) messages to every client of the room.

        They are encoded once per kind of client (plain, or deflate with a
        given window) and the same bytes are written to each.
        """
        encoded: dict[int | None, bytes] = {}
        sent = 0
        for client in self.clients.values():
            key = client.window_bits
            data = encoded.get(key)
            if data is None:
                data = encoded[key] = encode_messages(messages, key)
            client.send(data)
            sent += len(data)
        self.stats["messages_out"] += len(messages) * len(self.clients)
        self.stats["bytes_out"] += sent

    def send_to(self, conn_id: int, opcode: int, payload: bytes) -> None:
        """Send one message to one client of the room, if it is here."""
        client = self.clients.get(conn_id)
        if client is not None:
            data = encode_messages([(opcode, payload)], client.window_bits)
            client.send(data)
            self.stats["messages_out"] += 1
            self.stats["bytes_out"] += len(data)

    def _deliver(self, chunk: bytes) -> None:
        """Cut child output into messages and send them where they go."""
        config = self.config
        if config.serverframe == "gwsocket":
            self._deliver_gwsocket(chunk)
            return
        if config.binary and config.serverframe is None:
            message = (Opcode.BINARY, chunk)
            if self.cache is not None and not config.cache_tagged:
                self.cache.append(message)
            self.broadcast([message])
            return
        # One growing buffer: measured faster for long lines than a list of
        # chunks joined at the end (which costs the kernel fresh pages).
        buf = self._out
        clean = len(buf)  # holds no delimiter
        if self._no_delimiter(chunk) and clean + len(chunk) <= config.max_size:
            buf += chunk  # the line goes on: wait for its end
            return
        if buf:
            buf += chunk
            chunk = bytes(buf)
            buf.clear()
        lines, rest = split_output(chunk, config.delimiters, config.max_size, clean)
        buf += rest
        self._deliver_lines(lines)

    def _no_delimiter(self, chunk: bytes) -> bool:
        delimiters = self.config.delimiters
        if len(delimiters) == 1:
            return delimiters not in chunk
        return not any(d in chunk for d in delimiters)

    def _deliver_lines(self, lines: list[bytes]) -> None:
        routed = self.config.serverframe == "json"
        cache = self.cache
        cache_all = cache is not None and not self.config.cache_tagged
        pending = []  # broadcasts, encoded and written to each client in one go
        for line in lines:
            route = from_child(line) if routed else _EVERYONE
            if route.meta is not None:
                self.metadata = route.meta
                continue
            message = (Opcode.TEXT, text_payload(line))
            if route.to is None:
                pending.append(message)
                if cache_all or route.cache and cache is not None:
                    cache.append(message)
                continue
            if pending:
                self.broadcast(pending)
                pending = []
            self.send_to(route.to, *message)
        if pending:
            self.broadcast(pending)

    def _deliver_gwsocket(self, chunk: bytes) -> None:
        buf = self._out
        buf += chunk
        messages, used = parse_gwsocket(buf, self.config.max_size)
        del buf[:used]
        cache_all = self.cache is not None and not self.config.cache_tagged
        for to, kind, payload in messages:
            if kind == 1:
                message = (Opcode.TEXT, text_payload(payload))
            else:
                message = (Opcode.BINARY, payload)
            if to:
                self.send_to(to, *message)
                continue
            if cache_all:
                self.cache.append(message)
            self.broadcast([message])

    def output_received(self, data: bytes) -> None:
        """Relay output of the child (called as it is read)."""
        if self._held is not None:
            self._held.append(data)
            return
        if self.failure is not None:
            return  # the framing broke: the rest is dropped while the child is killed
        try:
            self._deliver(data)
        except FramingError as exc:
            log.error("room %r: child output: %s; stopping the child", self.name, exc, extra={"room": self.name})
            self.failure = f"child output broke the framing: {exc}"
            self.child.kill()

    def output_ended(self) -> None:
        """Note the end of the child's output (called once it is read)."""
        if self._output_done:
            return
        self._output_done = True
        if self._held is None:
            self._end_output()

    def _end_output(self) -> None:
        if self._out and self.config.serverframe != "gwsocket" and self.failure is None:
            self._deliver_lines([bytes(self._out)])  # the last line had no delimiter
            self._out.clear()
        self._report = asyncio.get_running_loop().create_task(self._report_exit())

    async def _report_exit(self) -> None:
        await self.child.exited
        self.hub.on_child_exit(self, self.child.returncode)


class Census:
    """The whole server's counts: clients and rooms (--maxclients, --maxrooms), client ids, and the counters of /metrics.

    A room lives in one process, but these belong to the whole server. With
    one process they are plain numbers. With --workers they live in memory
    that the supervisor shares with every worker (``shared_memory``): the
    last client id given, then a slot of COUNTS per worker, then (with
    --maxclientsperaddr) a table per worker of its clients by address. A
    worker writes only its own slot and table, and a lock file makes "check
    the total, then count myself in" one step across processes. The
    supervisor clears the clients, rooms and addresses of a worker that
    died; the ids and the counters go on across restarts, so the counters of
    /metrics never go back.
    """

    COUNTS = ("clients", "rooms", "connections", "children_started", "children_stopped")

    def __init__(self, config: Config, memory: mmap.mmap | None = None, index: int = 0, workers: int = 1,
                 lock_path: str | None = None) -> None:
        self.max_clients = config.max_clients
        self.max_rooms = config.max_rooms
        self.max_per_addr = config.max_clients_per_addr
        self._cells = memoryview(memory if memory is not None else bytearray(self.size(config, workers))).cast("Q")
        self._workers = workers
        self._index = index
        self._lock = os.open(lock_path, os.O_RDWR) if lock_path else None
        self._slots = self.table_slots(config, workers)  # a power of two, or 0: no table
        self._tables = 1 + len(self.COUNTS) * workers  # where the first worker's table starts, in cells
        self._by_addr: collections.Counter = collections.Counter()  # this process's clients by address
        self._slot_of: dict[int, int] = {}  # key -> its slot in this worker's table
        self._used = 0  # slots of this worker's table that are not empty

    @staticmethod
    def table_slots(config: Config, workers: int) -> int:
        """Slots of each worker's address table: none with one process or without --maxclientsperaddr.

        Twice --maxclients (a worker holds at most that many clients), up to
        TABLE_SLOTS_MAX: the table is emptied and refilled with the live
        addresses whenever half of it is used, so a search stays short and
        a free slot is always found.
        """
        if workers == 1 or config.max_clients_per_addr is None:
            return 0
        return min(1 << (2 * config.max_clients).bit_length(), TABLE_SLOTS_MAX)

    @staticmethod
    def size(config: Config, workers: int) -> int:
        return 8 * (1 + len(Census.COUNTS) * workers + 2 * Census.table_slots(config, workers) * workers)

    @staticmethod
    def shared_memory(config: Config, workers: int) -> mmap.mmap:
        """Memory for every worker's Census: made before they are started, so they inherit it.

        Anonymous memory: the address tables' pages cost nothing until used.
        """
        return mmap.mmap(-1, Census.size(config, workers))

    def _cell(self, name: str, index: int | None = None) -> int:
        return 1 + len(self.COUNTS) * (self._index if index is None else index) + self.COUNTS.index(name)

    @contextlib.contextmanager
    def _locked(self):
        if self._lock is None:
            yield
            return
        fcntl.lockf(self._lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)

    def total(self, name: str) -> int:
        """Return a count summed over every worker."""
        return sum(self._cells[self._cell(name, index)] for index in range(self._workers))

    def count(self, name: str, n: int = 1, index: int | None = None) -> None:
        """Add to one of this worker's counts (or, for the supervisor, a dead worker's)."""
        self._cells[self._cell(name, index)] += n

    def admit_client(self, address: str = "") -> int:
        """Count a new client in and return its id: 1, 2, 3... for the server's whole life.

        Raises:
            ServiceUnavailable: --maxclients clients are connected (503).
            TooManyRequests: ``address`` holds --maxclientsperaddr connections (429).
        """
        with self._locked():
            if self.total("clients") >= self.max_clients:
                raise ServiceUnavailable(f"too many clients (at most {self.max_clients})", [("Retry-After", "5")])
            if self.max_per_addr is not None:
                if self._clients_from(address) >= self.max_per_addr:
                    raise TooManyRequests(f"too many connections from {address} (at most {self.max_per_addr})",
                                          [("Retry-After", "5")])
                self._count_address(address, 1)
            self.count("clients")
            self._cells[0] += 1
            return self._cells[0]

    def release_client(self, address: str = "") -> None:
        """Count a client out (its connection has ended)."""
        self.count("clients", -1)
        if self.max_per_addr is not None:
            self._count_address(address, -1)

    # Clients by address. One process counts them in a Counter. Workers also
    # keep theirs in a table in the shared memory, for the others to read:
    # open addressing, a slot being (key, count) with the key a hash of the
    # address. A slot whose count is 0 may be taken over by another key, but
    # a used slot never becomes empty again (but when the supervisor clears
    # a dead worker's table), so a search for a key can stop at an empty slot.

    @staticmethod
    def _key(address: str) -> int:
        key = int.from_bytes(hashlib.blake2b(address.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        return key or 1  # 0 marks an empty slot

    def _table(self, index: int) -> int:
        return self._tables + 2 * self._slots * index

    def _clients_from(self, address: str) -> int:
        total = self._by_addr[address]
        if self._slots:
            key = self._key(address)
            cells, mask = self._cells, self._slots - 1
            for index in range(self._workers):
                if index == self._index:
                    continue
                base, slot = self._table(index), key & mask
                for _ in range(self._slots):  # a table full of used slots ends the search too
                    found = cells[base + 2 * slot]
                    if found == key:
                        total += cells[base + 2 * slot + 1]
                    if found == key or not found:
                        break
                    slot = (slot + 1) & mask
        return total

    def _count_address(self, address: str, n: int) -> None:
        self._by_addr[address] += n
        count = self._by_addr[address]
        if not count:
            del self._by_addr[address]
        if not self._slots:
            return
        key = self._key(address)
        if key not in self._slot_of and self._used >= self._slots // 2:
            # Addresses long gone still hold slots, and each makes every
            # search longer: start again from the live ones. Only on an
            # admission, which holds the lock, so no worker reads it half done.
            self._zero(self._index)
            self._slot_of.clear()
            self._used = 0
            for live, clients in self._by_addr.items():
                if live != address:
                    self._place(self._key(live), clients)
        self._place(key, count)

    def _place(self, key: int, count: int) -> None:
        """Set a key's count in this worker's table; a new key takes the first free slot on its way."""
        cells, base = self._cells, self._table(self._index)
        slot = self._slot_of.get(key)
        if slot is None:
            mask = self._slots - 1
            slot = key & mask
            while cells[base + 2 * slot] and cells[base + 2 * slot + 1]:
                slot = (slot + 1) & mask
            old = cells[base + 2 * slot]
            if old:
                del self._slot_of[old]
            else:
                self._used += 1
            cells[base + 2 * slot] = key
            self._slot_of[key] = slot
        cells[base + 2 * slot + 1] = count

    def _zero(self, index: int) -> None:
        """Empty a worker's address table, a block at a time."""
        base, end = self._table(index), self._table(index) + 2 * self._slots
        block = memoryview(bytes(8 * 8192)).cast("Q")
        for start in range(base, end, 8192):
            stop = min(start + 8192, end)
            self._cells[start:stop] = block[: stop - start]

    def admit_room(self) -> None:
        """Count a new room in; it counts until its child is gone.

        Raises:
            RoomUnavailable: --maxrooms rooms are open (1013).
        """
        with self._locked():
            if self.max_rooms is not None and self.total("rooms") >= self.max_rooms:
                raise RoomUnavailable(f"too many rooms (at most {self.max_rooms})", CloseCode.TRY_AGAIN_LATER)
            self.count("rooms")

    def clear(self, index: int) -> None:
        """Forget the clients, rooms and addresses of a worker that died (the supervisor's job)."""
        self._cells[self._cell("clients", index)] = self._cells[self._cell("rooms", index)] = 0
        if self._slots:
            self._zero(index)


class Hub:
    """All rooms of a server (of this worker, with --workers). Every change to a room's membership happens here."""

    def __init__(self, config: Config, census: Census | None = None, ports: PortPool | None = None) -> None:
        self.config = config
        self.census = census or Census(config)
        self.rooms: dict[str, Room] = {}
        self.ports = ports or PortPool(*config.tcp_ports)
        self.on_oneshot_end = None  # callback: --oneshot's room has ended
        self._oneshot_room: str | None = None
        self._caches: dict[str, collections.deque] = {}  # --cachepersist
        self._stopping: set[asyncio.Task] = set()
        self.closing = False  # shutdown() has begun: no room starts any more

    def cache_for(self, room_name: str) -> collections.deque | None:
        """Return the message cache of a room (kept across its lives with --cachepersist)."""
        size = self.config.cache_size
        if not size:
            return None
        if not self.config.cache_persist:
            return collections.deque(maxlen=size)
        return self._caches.setdefault(room_name, collections.deque(maxlen=size))

    async def join(self, client: Client, room_name: str, request: Request) -> Room:
        """Put a client in its room, starting the room's child if it is the first.

        When it returns, the client is in the room; the caller must write the
        101 response (and the cache) before awaiting anything, so that they
        precede every live message.

        Raises:
            RoomUnavailable: the child could not be started or has exited, or a
                limit (--maxrooms, --oneshot, --tcpports) keeps the room closed.
        """
        config = self.config
        if self.closing:
            raise RoomUnavailable("server shutting down", CloseCode.GOING_AWAY)
        room = self.rooms.get(room_name)
        if room is None:
            if config.oneshot and self._oneshot_room is not None:
                raise RoomUnavailable(f"--oneshot: this server has served room {self._oneshot_room!r}",
                                      CloseCode.TRY_AGAIN_LATER)
            self.census.admit_room()
            self._oneshot_room = room_name
            room = Room(self, room_name)
            self.rooms[room_name] = room
            room.starting = asyncio.get_running_loop().create_task(room.start(child_env(config, room_name, request)))
        try:
            await asyncio.shield(room.starting)
        except RoomUnavailable as exc:
            log.error("room %r: %s", room_name, exc.reason, extra={"room": room_name})
            self._end(room)
            raise
        except asyncio.CancelledError:
            if not room.starting.cancelled():
                raise  # this client's own task was cancelled
            # The room was stopped while it started: answered below.
        if self.closing:
            raise RoomUnavailable("server shutting down", CloseCode.GOING_AWAY)
        if room.ended:
            raise RoomUnavailable(room.failure or "the room's child has exited")
        room.clients[client.id] = client
        client.room = room
        room.stats["connections"] += 1
        self.census.count("connections")
        log.info("client %d joined room %r from %s", client.id, room_name, request.remote_addr,
                 extra={"room": room_name, "client": client.id})
        return room

    def leave(self, client: Client) -> None:
        """Take a client out of its room; the last one out stops the child."""
        room = client.room
        if room is None or room.clients.pop(client.id, None) is None:
            return
        room.forget(client)
        log.info("client %d left room %r", client.id, room.name, extra={"room": room.name, "client": client.id})
        if room.ended:
            return
        if self.config.leavemsg is not None:
            text = render_template(self.config.leavemsg, client.id, room.name, client.request)
            room.send_to_child(line_to_child(text, client.id, self.config))
        if not room.clients:
            log.info("room %r: all clients left, stopping the child", room.name, extra={"room": room.name})
            self._end(room)

    def on_child_start(self, room: Room) -> None:
        self.census.count("children_started")
        log.info("room %r: started child %d: %s", room.name, room.child.pid, self.config.cmd, extra={"room": room.name})

    def on_child_stop(self, room: Room) -> None:
        self.census.count("children_stopped")
        log.info("room %r: child %d stopped", room.name, room.child.pid, extra={"room": room.name})

    def on_child_exit(self, room: Room, returncode: int) -> None:
        """Close every client of a room whose child exited on its own."""
        if room.ended:
            return
        if room.failure:
            reason = room.failure
        elif returncode >= 0:
            reason = f"child exited with code {returncode}"
        else:
            reason = f"child killed by signal {-returncode}"
        log.info("room %r: %s", room.name, reason, extra={"room": room.name})
        code = CloseCode.NORMAL if returncode == 0 and not room.failure else CloseCode.INTERNAL_ERROR
        for client in list(room.clients.values()):
            client.close(code, reason)
        self._end(room)

    def _end(self, room: Room) -> None:
        """Take a room out of service and stop its child in the background."""
        room.ended = True
        if self.rooms.get(room.name) is not room:
            return  # ended already
        del self.rooms[room.name]
        task = asyncio.get_running_loop().create_task(room.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopped)
        if self.config.oneshot and self.on_oneshot_end is not None:
            task.add_done_callback(lambda _: self.on_oneshot_end())

    def _stopped(self, task: asyncio.Task) -> None:
        self._stopping.discard(task)
        self.census.count("rooms", -1)
        if not task.cancelled() and task.exception() is not None:
            log.error("stopping a room failed", exc_info=task.exception())

    def state(self) -> dict:
        """Return this hub's rooms and counters as plain data (JSON), for /metrics and /api."""
        rooms = [{"name": room.name, "connections": len(room.clients), "metadata": room.metadata,
                  "stats": dict(room.stats), "opened": room.opened} for room in self.rooms.values()]
        return {"rooms": rooms}

    async def shutdown(self) -> None:
        """Close every client with 1001 and stop every child, all at once."""
        self.closing = True
        for room in list(self.rooms.values()):
            for client in list(room.clients.values()):
                client.close(CloseCode.GOING_AWAY, "server shutting down")
        for room in list(self.rooms.values()):
            self._end(room)
        await asyncio.gather(*self._stopping, return_exceptions=True)


###############################################################################
# 5. Connections (asyncio I/O) ################################################
###############################################################################


def log_request(level: int, method: str, path: str, status: int, reason: str, address: str) -> None:
    """Log one line for an HTTP request: ``127.0.0.1 "GET /x" 404 no such file``.

    The path and the reason are escaped (``printable``): a client cannot
    write a line break or a terminal escape into the log. With ``--log
    json`` each part is a field of its own.
    """
    method, path, reason = printable(method), printable(path), printable(reason)
    log.log(level, '%s "%s %s" %d%s', address or "-", method, path, status, f" {reason}" if reason else "",
            extra={"method": method, "path": path, "status": status, "reason": reason, "remote_addr": address})


def request_line_parts(head: bytes) -> tuple[str, str]:
    """Return the method and path of a request head, as far as they can be read (for the log); '-' if not."""
    parts = head.partition(b"\r\n")[0].decode("latin-1").split(" ")
    return (parts[0], parts[1].partition("?")[0]) if len(parts) == 3 else ("-", "-")


class Connection(asyncio.Protocol):
    """One TCP connection: its request head, then a WebSocket client's bytes.

    Once the head is in, reading pauses and a task serves the request
    (``Server.serve``). After an upgrade, every chunk read goes straight to
    the client (``upgrade``), with no task, future or queue per message.
    ``closed`` is done when the connection is lost; ``drain()`` waits while
    the transport's write buffer is full.
    """

    def __init__(self, server: Server, preread: bytes = b"", *, handed: bool = False, internal: bool = False,
                 deadline: float | None = None, peer: str | None = None) -> None:
        self.server = server
        self.peer = peer  # the client's address; given when the socket is a TLS relay's (another worker's)
        self.relayed = False  # relayed to the room's worker: the transport is the relay's
        self.preread = preread  # accepted by a worker, which read these bytes to find the room
        self.handed = handed  # routed already (by its request line, or relayed): served here, never passed on
        self.deadline = deadline  # loop time by which the head must be in (default: --handshaketimeout from now)
        self.internal = internal  # from another worker, on the private socket: may ask for /_worker/state
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None  # after the upgrade
        self.task: asyncio.Task | None = None  # serves the request, once its head is in
        self.closed: asyncio.Future | None = None
        self._head = bytearray()  # the request head; after it, bytes for the client
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future | None = None  # while the write buffer is full
        self._discard = False  # an HTTP request is served: what the peer sends is dropped
        self._peer_eof = False
        self.lingering = False  # the response is out: waiting for the peer to close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        if self.peer is None:
            peer = transport.get_extra_info("peername")
            self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.closed = loop.create_future()
        if self.deadline is None:
            self._timer = loop.call_later(self.server.config.handshake_timeout, self._too_slow)
        else:
            self._timer = loop.call_at(self.deadline, self._too_slow)
        self.server.connections.add(self)
        self.server.accept_failing = False
        if self.preread:
            # After the transport has added its reader (later in this turn: a
            # pause before that is lost on Python 3.9) and before its first
            # read, which can come only after the next poll: the bytes stay in order.
            data, self.preread = self.preread, b""
            loop.call_soon(self.data_received, data)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.receive_data(data)
            return
        if self._discard:
            return
        head = self._head
        start = max(0, len(head) - 3)
        head += data
        if self.task is not None:
            return  # read before reading paused: kept for the client
        end = head.find(b"\r\n\r\n", start)
        max_head = self.server.config.max_head
        if end < 0 and len(head) <= max_head:
            return
        self._timer.cancel()
        self.transport.pause_reading()
        end = len(head) if end < 0 else end + 4
        self.task = asyncio.get_running_loop().create_task(self.server.serve(self, bytes(head[:end])))
        del head[:end]

    def eof_received(self) -> bool | None:
        if self.client is not None:
            self.client.receive_eof()
            return None  # the transport closes
        self._peer_eof = True
        if self.lingering:
            return None  # the response is out and the peer is done: close
        # A response may still be going out: keep the write side open (TLS cannot).
        return self._discard and self.transport.get_extra_info("sslcontext") is None

    def discard_input(self) -> None:
        """Read and drop what the peer sends while an HTTP response goes out.

        Bytes left unread when the socket is closed make the kernel send a RST
        instead of a FIN, and the peer then loses the end of the response.
        """
        self._discard = True
        self._head.clear()
        self.transport.resume_reading()

    async def linger(self) -> None:
        """After a response, half-close and wait (CLOSE_TIMEOUT at most) for the peer to close.

        Bytes the peer sends after the server has closed draw a reset, which
        can destroy the end of the response still on its way: a lingering
        close, as HTTP servers do. (TLS has no half-close: it closes at once.)
        """
        if self._peer_eof or self.server.closing or not self.half_close():
            return
        self.lingering = True
        await asyncio.wait({self.closed}, timeout=CLOSE_TIMEOUT)

    def half_close(self) -> bool:
        """Send a FIN if the connection can take one; tell whether it did.

        A peer that reset the connection is normal network weather: asyncio
        may not have noticed yet, and the socket then refuses the shutdown.
        """
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            return False
        try:
            transport.write_eof()
        except OSError as exc:
            log.debug("! connection lost before its half-close: %s", exc)
            transport.abort()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self.server.connections.discard(self)
        self.closed.set_result(None)
        self.resume_writing()
        if self.client is not None:
            self.client.receive_eof()

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None

    async def drain(self) -> None:
        """Wait until the transport's write buffer is low again.

        Raises:
            ConnectionResetError: the connection is lost.
        """
        if self._drained is not None:
            await self._drained
        if self.closed.done():
            raise ConnectionResetError("connection lost")

    def upgrade(self, client: Client) -> None:
        """Hand every byte after the request head, and every later read, to ``client``."""
        self.client = client
        rest, self._head = bytes(self._head), bytearray()
        if self.closed.done():
            client.receive_eof()
            return
        if rest:
            client.receive_data(rest)
        if not client.waiting and not client.throttled:
            self.transport.resume_reading()

    def let_go(self) -> None:
        """Give the transport to a relay: this connection is not the server's anymore."""
        self.relayed = True
        self._timer.cancel()
        self.server.connections.discard(self)
        self.closed.set_result(None)

    def _too_slow(self) -> None:
        log.debug("! request head not received in %s s, dropping the connection", self.server.config.handshake_timeout)
        self.transport.abort()


class Client:
    """One WebSocket client: its protocol state and the transport it writes to.

    Writes go straight to the transport, in order, so a broadcast frame is
    encoded once and the same bytes are written to every client. A client
    receives every message of its room in order, or, once it has left more
    than ``max_backlog`` bytes unread, a close frame (1008) saying that it fell
    behind: never a silent gap. ``done`` is done when the connection is closed.

    Unread means what the server holds for it plus what the kernel holds in
    the socket's send queue (which Linux grows up to 4 MiB for a stalled
    peer). The kernel is asked only when the bytes written since it was last
    asked could have taken the client over the limit: once every
    ``max_backlog`` bytes for a client that keeps up, and before every write
    for one that is about to be closed. So the close comes before the client
    holds more than the limit plus one write (one read of the child's output).
    """

    def __init__(self, conn_id: int, request: Request, connection: Connection,
                 protocol: WebSocketProtocol, max_backlog: int = DEFAULT_MAX_BACKLOG,
                 log_traffic: bool = False, max_rate: float | None = None, burst: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        self.id = conn_id
        self.request = request
        self.connection = connection
        self.transport = connection.transport
        self.protocol = protocol
        self.room: Room | None = None
        self.window_bits = protocol.deflate.window_bits if protocol.deflate else None  # how to encode for it
        self.max_backlog = max_backlog
        self.log_traffic = log_traffic
        self.done = loop.create_future()
        self._clock = loop.time
        self.last_seen = self._clock()  # when the peer last sent anything
        self.waiting = False  # on a child that is behind: not read, so silent through no fault
        self.throttled = False  # over --maxrate: not read until its messages are within the rate again
        self._rate = max_rate  # --maxrate: a token bucket of ``burst`` messages, refilled at this rate
        self._burst = self._tokens = burst
        self._refilled = self._clock()
        self._held: collections.deque[Message] = collections.deque()  # read, over the rate: wait their turn
        self._release: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        sock = self.transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None and _SIOCOUTQ is not None else -1
        self._unread_at_most = 0  # unread when last asked, plus what was written since

    def unread(self) -> int:
        """Return the bytes written to this client that it has not read: ours and the kernel's."""
        queued = 0
        if self._fd >= 0:
            try:
                queued = struct.unpack("i", fcntl.ioctl(self._fd, _SIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass  # the socket is gone: asyncio will tell
        return queued + self.transport.get_write_buffer_size()

    def receive_data(self, data: bytes) -> None:
        """Process bytes from the peer: answer, and pass messages to the room."""
        protocol = self.protocol
        self.last_seen = self._clock()
        protocol.receive_data(data)
        self.flush()
        room = self.room
        for message in protocol.events_received():
            if self.log_traffic:
                log.debug("client %d: < %s %r", self.id, message.opcode.name, message.data[:80],
                          extra={"client": self.id})
            if room is None:
                continue
            if self._rate is None:
                room.receive(self, message)
            elif self._held or not self._take_token():
                self._held.append(message)
                self._throttle()
            else:
                room.receive(self, message)
        if protocol.state is State.CLOSED and not self.done.done():
            self.done.set_result(None)

    # --maxrate. A client over the rate is not read: what it already sent
    # waits in ``_held`` and goes to the room one message a token, and TCP
    # holds back the rest in the client's own buffers. Nothing is dropped,
    # and the room's child never gets more from it than the rate.

    def _take_token(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _throttle(self) -> None:
        """Stop reading until the next token, and pass on what is held then."""
        if not self.throttled:
            self.throttled = True
            self.transport.pause_reading()
        if self._release is None:
            delay = (1 - self._tokens) / self._rate
            self._release = asyncio.get_running_loop().call_later(delay, self._release_held)

    def _release_held(self) -> None:
        self._release = None
        if self.done.done():
            return
        while self._held and self._take_token():
            self.room.receive(self, self._held.popleft())
        if self._held:
            self._throttle()
            return
        self.throttled = False
        if not self.waiting and self.upgraded:
            self.transport.resume_reading()

    def receive_eof(self) -> None:
        self.protocol.receive_eof()
        if not self.done.done():
            self.done.set_result(None)

    def send(self, data: bytes) -> None:
        """Write encoded frames, unless the closing handshake has begun."""
        if self.protocol.state is not State.OPEN or self.transport.is_closing():
            return  # closing, or lost: asyncio has not told the protocol yet
        if self._unread_at_most > self.max_backlog:
            unread = self.unread()  # the kernel has sent some since: ask
            if unread > self.max_backlog:
                self.close(CloseCode.POLICY_VIOLATION, f"client fell behind: over {self.max_backlog} bytes unread")
                return
            self._unread_at_most = unread
        self._unread_at_most += len(data)
        self.transport.write(data)

    def flush(self) -> None:
        """Write what the protocol has queued (pongs, close frames)."""
        data = self.protocol.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def ping(self) -> None:
        self.protocol.send_ping()
        self.flush()

    def pause(self) -> None:
        """Stop reading from the peer (its room's child is behind)."""
        self.waiting = True
        self.transport.pause_reading()

    def resume(self) -> None:
        self.waiting = False
        # Before the upgrade, the upgrade resumes reading; after the connection
        # is lost there is nothing to resume; over --maxrate, the next token does.
        if self.upgraded and not self.done.done() and not self.throttled:
            self.transport.resume_reading()

    @property
    def upgraded(self) -> bool:
        """Whether its 101 is out (and every read comes here): frames may follow."""
        return self.connection.client is self

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; drop the connection if the peer does not answer in time."""
        if self.protocol.state is not State.OPEN:
            return
        log.info("client %d: closing with %d: %s", self.id, code, reason, extra={"client": self.id})
        self.protocol.send_close(code, reason)
        self.flush()
        self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)
        if self.throttled:  # over --maxrate: read again, so that its answer to the close comes in
            self._release.cancel()
            self._release = None
            self._held.clear()
            self.throttled = False
            if not self.waiting and self.upgraded:
                self.transport.resume_reading()

    def cleanup(self) -> None:
        """Cancel what the client still has pending; call when its connection is done."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._release is not None:
            self._release.cancel()
        self._held.clear()


###############################################################################
# 6. Metrics and API ##########################################################
###############################################################################

# (family, type, help, Room.stats key or None for open connections)
_ROOM_METRICS = [
    ("scalesocket_websocket_connections", "counter", "WebSocket connections made to the room.", "connections"),
    ("scalesocket_websocket_connections_open", "gauge", "WebSocket connections open in the room.", None),
    ("scalesocket_messages_received", "counter", "Messages received from the room's clients.", "messages_in"),
    ("scalesocket_received_bytes", "counter", "Payload bytes received from the room's clients.", "bytes_in"),
    ("scalesocket_messages_sent", "counter", "Messages sent to the room's clients, one per client.", "messages_out"),
    ("scalesocket_sent_bytes", "counter", "Bytes sent to the room's clients, frame headers included.", "bytes_out"),
]
_SERVER_METRICS = [
    ("scalesocket_rooms_open", "gauge", "Rooms open, each with one child.", None),
    ("scalesocket_connections", "counter", "WebSocket connections made to any room.", "connections"),
    ("scalesocket_children_started", "counter", "Child processes started.", "children_started"),
    ("scalesocket_children_stopped", "counter", "Child processes stopped and reaped.", "children_stopped"),
]
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_openmetrics(states: list[dict], totals: dict[str, int]) -> str:
    """Return the server's metrics in the OpenMetrics text format.

    ``states`` are ``Hub.state()`` of every process (one, or each worker's):
    each open room lives in exactly one of them and has its series once,
    while it is open. ``totals`` are the server-wide counters (``Census``),
    over the server's whole life.
    """
    lines = []
    rooms = sorted((room for state in states for room in state["rooms"]), key=lambda room: room["name"])
    for family, kind, text, key in _ROOM_METRICS:
        lines += [f"# TYPE {family} {kind}", f"# HELP {family} {text}"]
        suffix = "_total" if kind == "counter" else ""
        for room in rooms:
            value = room["connections"] if key is None else room["stats"].get(key, 0)
            lines.append(f'{family}{suffix}{{room="{_label_value(room["name"])}"}} {value}')
    for family, kind, text, key in _SERVER_METRICS:
        value = len(rooms) if key is None else totals[key]
        suffix = "_total" if kind == "counter" else ""
        lines += [f"# TYPE {family} {kind}", f"# HELP {family} {text}", f"{family}{suffix} {value}"]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _room_info(room: dict, details: bool = False) -> dict:
    info = {"name": room["name"], "connections": room["connections"], "metadata": room["metadata"]}
    if details:  # for the /api/ page: since when, and the room's counters
        info["opened"] = room["opened"]
        info["open_seconds"] = round(max(0.0, time.time() - room["opened"]), 1)
    return info


def api_response(states: list[dict], path: str, details: bool = False):
    """Return the JSON value for an /api/ path (rooms, a room, its count or metadata).

    ``states`` as for ``render_openmetrics``; ``details`` (``/api/rooms?details``)
    adds to each room when it opened and for how long it has been open.

    Raises:
        NotFound: no such route, or no such room open.
    """
    rooms = {room["name"]: room for state in states for room in state["rooms"]}
    if path == "/api/rooms":
        return [_room_info(rooms[name], details) for name in sorted(rooms)]
    parts = path.split("/")
    if len(parts) in (3, 4) and parts[1] == "api" and parts[2]:
        room = rooms.get(urllib.parse.unquote(parts[2]))
        if room is None:
            raise NotFound("no such room")
        view = parts[3] if len(parts) == 4 else ""
        if view == "":
            return _room_info(room)
        if view == "connections":
            return room["connections"]
        if view == "metadata":
            return room["metadata"]
    raise NotFound("no such API route")


###############################################################################
# 7. Workers (--workers) ######################################################
###############################################################################

# A room lives in one process: its child, its clients, its cache and its
# metadata. Everything about using more cores follows from that rule. With
# --workers N, N processes share the listening socket; a connection for a
# room is served by the one worker that owns the room (``worker_of``), so a
# room has one child server-wide and a broadcast never leaves its process.
# A new connection wakes one worker (EPOLLEXCLUSIVE), which passes the
# socket on to the room's worker as soon as the request line names the room;
# with TLS, it ends TLS itself and relays the room's worker the plain bytes.
# What is the whole server's (limits, client ids) is in ``Census``; what is
# merged for a reader (/metrics, /api/rooms) is asked of every worker.

_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # a descriptor received is not inherited by children
LISTEN_BACKLOG = 1024  # connections the kernel queues for the workers to accept
HANDOVER_MAX = 128 * 1024  # bytes read before a connection is handed over (the head, and what came with it)
HANDOVER_MESSAGE_MAX = HANDOVER_MAX + 2 + 255  # and the message's header: a kind, and an address of 255 bytes at most
HANDOVER_TIMEOUT = 3.0  # seconds to get a connection to its worker (one that restarts takes about one)
ACCEPT_BATCH = 16  # connections accepted a wake-up: one worker wakes for a burst, the others for the next
FIRST_READ = 64 * 1024  # bytes read at once from a new connection, until its request line is in
RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a worker that keeps dying
STABLE_AFTER = 10.0  # seconds a worker must live for its restarts to start over from no wait


def worker_of(room: str, workers: int) -> int:
    """Return the index of the worker that owns a room: the same in every process.

    Not Python's ``hash()``, which is salted per process.
    """
    digest = hashlib.blake2b(room.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers


def api_room(path: str) -> str | None:
    """Return the room an /api/ROOM/... path names (that room's worker answers it), or None."""
    if not path.startswith("/api/") or path == "/api/rooms":
        return None
    return urllib.parse.unquote(path.split("/")[2]) or None


def room_of_request_line(line: bytes, api: bool) -> str | None:
    """Return the room whose worker serves a request, from its request line alone; None for any worker.

    A path /ROOM (a valid room name, not a reserved one) names ROOM whatever
    the method and the headers, which are not in yet: a request for
    /index.html goes to the worker of room 'index.html', which serves static
    files as well as any worker. With --api, /api/ROOM/... names ROOM. Anything
    else (/health, /metrics, /api/rooms, a file in a subdirectory, a request
    line that is not one) names none: the worker that read it answers.
    """
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    path = parts[1].decode("latin-1").partition("?")[0]
    if api and path.startswith("/api/"):
        return api_room(path)
    try:
        return room_from_path(path)
    except HTTPError:
        return None


class _ExclusiveSelector(selectors.EpollSelector):
    """An epoll selector that waits on some descriptors with EPOLLEXCLUSIVE (Linux 4.5+).

    Given the listening socket that every worker shares: a new connection
    wakes one worker waiting in epoll, not all of them (the others would
    each wake to find nothing to accept). The kernel accepts the flag only
    when a descriptor is added, never in a modification: such a descriptor
    is only ever read, so asyncio adds and removes it and never modifies it.
    """

    def __init__(self, exclusive: tuple[int, ...]) -> None:
        super().__init__()
        self.exclusive = frozenset(exclusive)

    def register(self, fileobj, events, data=None):
        key = super().register(fileobj, events, data)
        if key.fd in self.exclusive:
            if events != selectors.EVENT_READ:
                super().unregister(fileobj)
                raise ValueError("a descriptor waited on exclusively can only be read")
            self._selector.unregister(key.fd)  # added again, now with the flag
            self._selector.register(key.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        return key

    def modify(self, fileobj, events, data=None):
        key = self.get_key(fileobj)
        if key.fd in self.exclusive and events != key.events:
            raise ValueError("a descriptor waited on exclusively can only be read")
        return super().modify(fileobj, events, data)


# A connection handed over is one seqpacket message: the socket, and these
# bytes before what was read from it: the kind of socket, and the client's
# address when it is not the socket's own peer.
_PLAIN = 0  # the client's TCP socket itself
_RELAYED = 1  # one end of a socketpair: the worker that ended TLS relays the client's bytes through it


def _handover_message(kind: int, peer: str, data: bytes) -> bytes:
    address = peer.encode("utf-8", "surrogateescape")
    return bytes((kind, len(address))) + address + data


def _parse_handover_message(message: bytes) -> tuple[int, str, bytes]:
    """Return the kind, client address and bytes read of a connection handed over.

    Raises:
        ValueError: the message is not one.
    """
    if len(message) < 2 or message[0] not in (_PLAIN, _RELAYED) or len(message) < 2 + message[1]:
        raise ValueError("not a connection handed over")
    end = 2 + message[1]
    return message[0], message[2:end].decode("utf-8", "surrogateescape"), message[end:]


class _Relay(asyncio.Protocol):
    """One side of a relay: what its transport reads, the other side's writes, with flow control.

    A worker that ended TLS for another worker's room relays the decrypted
    bytes both ways between the client's TLS transport and its end of a
    socketpair, whose other end the room's worker serves. An end of input on
    one side is passed along (as a half-close where the other side has one,
    else as a close); either side lost closes the other once what it has to
    write is out, or after CLOSE_TIMEOUT if its peer does not read it (as
    ``Client.close`` does).
    """

    def __init__(self, done: asyncio.Future) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Relay | None = None
        self.done = done  # when both sides are lost
        self.lost = False
        self._abort: asyncio.TimerHandle | None = None  # a close that waits on a peer that does not read
        self._watch: asyncio.TimerHandle | None = None  # while not read: looks for its peer's hang-up

    def close(self) -> None:
        """Close this side once what it has to write is out; abort it after CLOSE_TIMEOUT."""
        if self.transport is None or self.lost or self._abort is not None:
            return  # (a TLS transport closed twice lets go of its protocol, and then cannot abort)
        self.transport.close()
        self._abort = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.other.transport.write(data)

    def eof_received(self) -> bool | None:
        other = self.other.transport
        if other.can_write_eof():
            other.write_eof()
            return True  # the other way may still carry bytes
        self.other.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for timer in (self._abort, self._watch):
            if timer is not None:
                timer.cancel()
        self.other.close()
        if self.other.lost and not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()
        self.other._watch_hang_up()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()
        if self.other._watch is not None:
            self.other._watch.cancel()
            self.other._watch = None

    def _watch_hang_up(self) -> None:
        """While this side is not read, look every WAIT_PING for its peer's hang-up, which only a read would show.

        Else a room's worker that gives up on a client that does not read
        (and closes its end) would go unseen here, and the relay would hold
        the client for good.
        """
        if self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        poller = select.poll()
        poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
        if poller.poll(0):
            self.transport.abort()  # connection_lost closes the other side, after CLOSE_TIMEOUT at most
            return
        self._watch = asyncio.get_running_loop().call_later(WAIT_PING, self._watch_hang_up)


class _Arriving:
    """A connection just accepted whose request line is not in yet."""

    __slots__ = ("sock", "data", "deadline", "timer")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = deadline  # for its whole request head, as --handshaketimeout says
        self.timer: asyncio.TimerHandle | None = None  # and a reader, while it waits for bytes


class Worker:
    """This process's place among the workers: which rooms it owns, and the way to the others.

    Every worker accepts connections on the shared listening socket itself,
    with no transport: as soon as a connection's request line is in, the
    room is known (``room_of_request_line``), and a worker that does not own
    it hands the socket itself, with the bytes already read, to the owner
    (SCM_RIGHTS over a Unix seqpacket socket); the owner serves it as if it
    had accepted it. Only the worker that serves a connection builds its
    transport and parses its head. Each worker also answers the others'
    questions about its rooms (``/_worker/state`` on a Unix stream socket),
    which /metrics and /api/rooms merge.
    """

    def __init__(self, index: int, workers: int, directory: str, listener: socket.socket, census: Census) -> None:
        self.index = index
        self.workers = workers
        self.directory = directory  # private (0700): the sockets of every worker
        self.listener = listener  # the listening socket, shared by all workers
        self.census = census
        self._peers: dict[int, socket.socket] = {}  # to hand connections to, connected on first use
        self._inbound: set[socket.socket] = set()
        self._handover: socket.socket | None = None
        self._state_server: asyncio.AbstractServer | None = None
        self._server: Server | None = None
        self._arriving: dict[int, _Arriving] = {}  # by descriptor
        self._listening = False
        self.tls: ssl.SSLContext | None = None  # with --tlscert: every worker ends TLS for what it accepts
        self.relays: dict[asyncio.Future, tuple[_Relay, _Relay]] = {}  # each done when its relay has closed both sides

    def _path(self, index: int, kind: str) -> str:
        return os.path.join(self.directory, f"w{index}.{kind}")

    def owns(self, room: str) -> bool:
        return worker_of(room, self.workers) == self.index

    async def start(self, server: Server) -> None:
        """Listen for connections handed over and for the others' questions."""
        loop = asyncio.get_running_loop()
        self._server = server
        path = self._path(self.index, "fd")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self._handover = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._handover.bind(path)
        self._handover.listen(64)
        self._handover.setblocking(False)
        loop.add_reader(self._handover.fileno(), self._accept)
        path = self._path(self.index, "http")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._state_server = await loop.create_unix_server(lambda: Connection(server, internal=True), path)
        self._listen()

    def _listen(self) -> None:
        if not self._listening and not self._server.closing:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept_clients)
            self._listening = True

    def stop_accepting(self) -> None:
        """Accept no more connections; drop those whose request line is not in (as one process does)."""
        if self._listening:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self._listening = False
        for arriving in list(self._arriving.values()):
            self._drop(arriving)

    def close(self) -> None:
        """Stop taking connections from the other workers; answer 503 to those already sent.

        Until then, a closing worker answers each connection handed to it
        with 503 (see ``_receive``), as the others do not know it is closing.
        """
        loop = asyncio.get_running_loop()
        if self._handover is not None:
            loop.remove_reader(self._handover.fileno())
            self._handover.close()
        for sock in list(self._inbound):
            self._receive(sock)  # messages still queued: each gets its 503
        for sock in list(self._inbound) + list(self._peers.values()):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._inbound.clear()
        self._peers.clear()
        if self._state_server is not None:
            self._state_server.close()

    # Accepting, and reading the request line.

    def _accept_clients(self) -> None:
        loop = asyncio.get_running_loop()
        server = self._server
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: try again in a second
                if not server.accept_failing:
                    server.accept_failing = True
                    log.warning("cannot accept connections: %s (%d open files at most: raise `ulimit -n`); retrying",
                                exc.strerror or exc, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                loop.remove_reader(self.listener.fileno())
                self._listening = False
                loop.call_later(1.0, self._listen)
                return
            server.accept_failing = False
            sock.setblocking(False)
            if self.tls is not None:  # the request line is only readable once TLS is ended here
                loop.create_task(self._connect_tls(sock))
                continue
            arriving = _Arriving(sock, loop.time() + server.config.handshake_timeout)
            self._read_request_line(arriving)  # on a busy server the request is often there already

    def _read_request_line(self, arriving: _Arriving) -> None:
        sock = arriving.sock
        try:
            data = sock.recv(FIRST_READ)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":  # the peer closed (or reset) before its request line: nothing to answer
            self._drop(arriving)
            return
        if data is not None:
            arriving.data += data
        end = arriving.data.find(b"\r\n")
        if end < 0 and len(arriving.data) <= self._server.config.max_head:
            if arriving.timer is None:  # wait for more
                loop = asyncio.get_running_loop()
                self._arriving[sock.fileno()] = arriving
                loop.add_reader(sock.fileno(), self._read_request_line, arriving)
                arriving.timer = loop.call_at(arriving.deadline, self._drop, arriving)
            return
        if arriving.timer is not None:
            self._let_go(arriving)
        room = room_of_request_line(arriving.data[:end], self._server.config.api) if end >= 0 else None
        owner = self.index if room is None else worker_of(room, self.workers)
        if owner == self.index:  # a line too long or malformed too: the Connection answers it
            self._adopt(sock, arriving.data, arriving.deadline)
        elif len(arriving.data) > HANDOVER_MAX:
            _refuse(sock, arriving.data, BadRequest(f"over {HANDOVER_MAX} bytes sent before the handshake's answer"))
        else:
            self._pass(owner, sock, arriving.data)

    def _let_go(self, arriving: _Arriving) -> None:
        """Stop waiting for an arriving connection's bytes (it is served, passed on or dropped)."""
        del self._arriving[arriving.sock.fileno()]
        asyncio.get_running_loop().remove_reader(arriving.sock.fileno())
        arriving.timer.cancel()
        arriving.timer = None

    def _drop(self, arriving: _Arriving) -> None:
        if arriving.timer is not None:
            self._let_go(arriving)
        arriving.sock.close()

    # Handing a connection over.

    def _pass(self, index: int, sock: socket.socket, data: bytes) -> None:
        """Pass a connection's socket, and the bytes read from it, to worker ``index``, then let go of it."""
        message = _handover_message(_PLAIN, "", data)
        try:
            socket.send_fds(self._peer(index), [message], [sock.fileno()])
        except OSError:  # it is busy, or restarting: keep trying for a while
            asyncio.get_running_loop().create_task(self._pass_later(index, sock, data, message))
            return
        sock.close()  # our descriptor only: the socket lives on in the message
        log.debug("> connection handed to worker %d", index)

    async def _pass_later(self, index: int, sock: socket.socket, data: bytes, message: bytes) -> None:
        try:
            await self.hand_over(index, message, sock)
        except ServiceUnavailable as exc:
            _refuse(sock, data, exc)
            return
        sock.close()
        log.debug("> connection handed to worker %d", index)

    async def hand_over(self, index: int, message: bytes, sock: socket.socket) -> None:
        """Send worker ``index`` a socket with its hand-over message, trying for HANDOVER_TIMEOUT.

        Raises:
            ServiceUnavailable: the worker did not take it in time (it is
                restarting, or stuck), or this one is closing.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOVER_TIMEOUT
        while True:
            try:
                socket.send_fds(self._peer(index), [message], [sock.fileno()])
                return
            except BlockingIOError:
                pass  # its queue is full: it is busy
            except OSError as exc:  # gone, or restarting: connect again
                log.debug("! worker %d: cannot hand over: %s", index, exc)
                peer = self._peers.pop(index, None)
                if peer is not None:
                    peer.close()
            if loop.time() > deadline or self._server.closing:
                raise ServiceUnavailable(f"worker {index} is not answering", [("Retry-After", "1")])
            await asyncio.sleep(0.01)

    # TLS: this worker ends it, and relays to the room's worker.

    async def _connect_tls(self, sock: socket.socket) -> None:
        config = self._server.config
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Connection(self._server), sock, ssl=self.tls, ssl_handshake_timeout=config.handshake_timeout)
        except Exception as exc:  # a failed or slow TLS handshake is the peer's: as with one process, no log
            log.debug("! TLS handshake failed: %r", exc)
            sock.close()

    async def relay(self, index: int, connection: Connection, data: bytes) -> None:
        """Serve a TLS connection of another worker's room through that worker, relaying its decrypted bytes.

        Worker ``index`` gets one end of a socketpair with ``data`` (the bytes
        read so far) and the client's address, and serves it as if it had
        accepted it; this worker relays between the TLS transport and the
        other end until either side closes. When it returns, the connection
        is the relay's.

        Raises:
            BadRequest: more than HANDOVER_MAX bytes arrived before the answer.
            ServiceUnavailable: that worker did not take it in time.
        """
        if len(data) > HANDOVER_MAX:
            raise BadRequest(f"over {HANDOVER_MAX} bytes sent before the handshake's answer")
        ours, theirs = socket.socketpair()
        try:
            await self.hand_over(index, _handover_message(_RELAYED, connection.peer, data), theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        outside, inside = _Relay(done), _Relay(done)
        outside.other, inside.other = inside, outside
        transport = connection.transport
        transport.set_protocol(outside)
        outside.connection_made(transport)
        connection.let_go()
        self.relays[done] = (outside, inside)
        done.add_done_callback(self.relays.pop)
        try:
            await loop.connect_accepted_socket(lambda: inside, ours)
        except OSError:
            ours.close()
            transport.abort()
            raise
        if transport.is_closing():  # the client left meanwhile
            outside.lost = True
            inside.close()
        else:
            transport.resume_reading()
        log.debug("> TLS connection relayed to worker %d", index)

    async def end_relays(self, timeout: float) -> None:
        """Wait (``timeout`` at most) for the relays to end: the rooms' workers close them; then cut the rest."""
        if self.relays:
            log.info("waiting for %d relayed connections to close", len(self.relays))
            await asyncio.wait(set(self.relays), timeout=timeout)
        for sides in list(self.relays.values()):
            for side in sides:
                if side.transport is not None and not side.lost:
                    side.transport.abort()

    def _peer(self, index: int) -> socket.socket:
        peer = self._peers.get(index)
        if peer is None:
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peer.setblocking(False)
            try:
                peer.connect(self._path(index, "fd"))
            except OSError:
                peer.close()
                raise
            self._peers[index] = peer
        return peer

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = self._handover.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("cannot accept a worker's connection: %s; retrying in 1 s", exc)
                loop.remove_reader(self._handover.fileno())
                loop.call_later(1.0, self._resume_accepting)
                return
            sock.setblocking(False)
            self._inbound.add(sock)
            loop.add_reader(sock.fileno(), self._receive, sock)

    def _resume_accepting(self) -> None:
        if not self._server.closing:
            asyncio.get_running_loop().add_reader(self._handover.fileno(), self._accept)

    def _receive(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(sock, HANDOVER_MESSAGE_MAX, 1, _CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if flags & socket.MSG_CTRUNC:  # no descriptor left to receive it in: the kernel closed it
                log.warning("a connection handed over was lost: out of file descriptors (raise `ulimit -n`)")
                continue
            if not data and not fds:  # that worker is gone
                loop.remove_reader(sock.fileno())
                self._inbound.discard(sock)
                sock.close()
                return
            try:
                kind, peer, data = _parse_handover_message(data)
            except ValueError:
                kind, peer, data = _PLAIN, "", data
            for fd in fds:
                client = socket.socket(fileno=fd)
                if flags & socket.MSG_TRUNC:  # cannot happen: what was sent fits; never serve a cut head
                    _refuse(client, data, BadRequest("request too long to hand over"), peer)
                    continue
                if self._server.closing:
                    _refuse(client, data, ServiceUnavailable("this worker is shutting down", [("Retry-After", "1")]),
                            peer)
                    continue
                client.setblocking(False)
                # Its handshake time starts again here: the deadline is the other process's.
                self._adopt(client, data, loop.time() + self._server.config.handshake_timeout, peer or None)

    def _adopt(self, sock: socket.socket, data: bytes, deadline: float, peer: str | None = None) -> None:
        """Serve a connection of this worker's: build its transport and its Connection, with the bytes read.

        Built here and now where the loop can (what ``create_server`` does for
        one process), not through ``connect_accepted_socket``: that one costs a
        task, a future and two more turns of the loop a connection.
        """
        loop = asyncio.get_running_loop()
        make = getattr(loop, "_make_socket_transport", None)  # private, but in every asyncio from 3.7 to 3.13
        if make is None:
            loop.create_task(self._connect(sock, data, deadline, peer))
            return
        try:
            make(sock, Connection(self._server, data, handed=True, deadline=deadline, peer=peer))
        except OSError as exc:
            log.debug("! a connection was lost before it was served: %s", exc)
            sock.close()

    async def _connect(self, sock: socket.socket, data: bytes, deadline: float, peer: str | None) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Connection(self._server, data, handed=True, deadline=deadline, peer=peer), sock)
        except OSError as exc:
            log.debug("! a connection was lost before it was served: %s", exc)
            sock.close()

    # The others' rooms.

    async def peer_states(self) -> list[dict]:
        """Return ``Hub.state()`` of every other worker that answers."""
        states = await asyncio.gather(*(self._state_of(index) for index in range(self.workers) if index != self.index))
        return [state for state in states if state is not None]

    async def _state_of(self, index: int) -> dict | None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self._path(index, "http")),
                                                    HANDOVER_TIMEOUT)
            writer.write(b"GET /_worker/state HTTP/1.1\r\nHost: worker\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), HANDOVER_TIMEOUT)
            head, _, body = response.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise ValueError(head[:40])
            return json.loads(body)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.debug("! worker %d did not say what its rooms are: %s", index, exc)  # restarting: it has none
            return None
        finally:
            if writer is not None:
                writer.close()


def _refuse(sock: socket.socket, data: bytes, exc: HTTPError, peer: str = "") -> None:
    """Answer an HTTP error on a raw socket whose request ``data`` was read, then close it.

    No transport is built for a connection that is only refused. A new
    socket's send buffer is empty, so the answer fits in one send.
    """
    if not peer:  # given for a relay's socketpair, whose peer is the relaying worker
        try:
            peer = sock.getpeername()[0]
        except (OSError, IndexError):
            peer = ""
    log_request(logging.WARNING if exc.status >= 500 else logging.INFO, *request_line_parts(data), exc.status,
                exc.reason, peer)
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(error_response(exc, head_only=data.startswith(b"HEAD ")))
        sock.shutdown(socket.SHUT_WR)
        # Bytes left unread at close turn the FIN into a RST, which can
        # destroy the answer before the peer reads it: read what is there.
        while sock.recv(65536):
            pass
    sock.close()


_SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


class Supervisor:
    """Start the workers on one listening socket, restart those that die, stop them all on a signal.

    It is the process the command line started: it binds, prints the
    ``listening on`` line, and then only watches. A worker that dies is
    restarted at once, then after a growing wait while it keeps dying soon
    after each start; the children it leaves (they are in sessions of their
    own) are stopped and reaped here, since the supervisor is their
    subreaper. SIGTERM or SIGINT is passed to every worker, which closes its
    clients with 1001 and stops its children; then the supervisor exits.
    """

    def __init__(self, config: Config, run_worker) -> None:
        self.config = config
        self.run_worker = run_worker  # run_worker(worker) -> exit status, in the worker's process
        self.pids: dict[int, int] = {}  # pid -> worker index
        self._started: dict[int, float] = {}  # index -> when it last started
        self._failures = collections.Counter()  # index -> deaths in a row soon after starting
        self._due: dict[int, float] = {}  # index -> when to start it again
        self._orphans: dict[int, float] = {}  # pid of a dead worker's child -> when to SIGKILL it
        self._signalled = False

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit status."""
        config = self.config
        try:
            self.listener = _listen(config.host, config.port)
        except OSError as exc:
            print(f"scalesocket.py: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        self.directory = _private_directory()
        self.lock_path = os.path.join(self.directory, "lock")
        open(self.lock_path, "w").close()
        self.memory = Census.shared_memory(config, config.workers)
        self.census = Census(config, self.memory, workers=config.workers)
        _become_subreaper()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        host, port = self.listener.getsockname()[:2]
        log.info("listening on %s:%d (%d workers%s)", f"[{host}]" if ":" in host else host, port, config.workers,
                 ", TLS" if config.tls_cert else "")
        try:
            for index in range(config.workers):
                if not self._signalled:
                    self._start(index)
            self._watch()
        finally:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            self._stop_orphans(signal.SIGKILL)
            self._reap()
            self.listener.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        return 0

    def _on_signal(self, signum: int, frame) -> None:
        if signum != signal.SIGCHLD:
            self._signalled = True  # the wakeup fd ends the wait in _watch

    def _start(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        # Blocked until the child has its own handlers: a SIGTERM sent to it
        # before then must not run the supervisor's handler there and be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # out of memory or of pids (a cgroup's pids.max): not a reason to stop serving
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("cannot start worker %d: %s; trying again in 1 s", index, exc.strerror or exc)
            self._due[index] = time.monotonic() + 1.0
            return
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.pids[pid] = index
            self._started[index] = time.monotonic()
            return
        status = 1
        try:  # the worker: this branch never returns
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            for signum in _SUPERVISOR_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != supervisor:
                os._exit(0)  # the supervisor died while we were starting
            census = Census(self.config, self.memory, index, self.config.workers, self.lock_path)
            status = self.run_worker(Worker(index, self.config.workers, self.directory, self.listener, census))
        except BaseException:
            log.error("worker %d failed", index, exc_info=True)
        finally:
            logging.shutdown()
            os._exit(status)

    def _watch(self) -> None:
        stop_by = None
        while self.pids or (not self._signalled and self._due):
            if self._signalled and stop_by is None:
                log.info("shutting down")
                self._due.clear()
                for pid in self.pids:
                    _signal(pid, signal.SIGTERM)
                stop_by = time.monotonic() + 2 * KILL_GRACE + 1  # each worker needs at most about 3 s
            now = time.monotonic()
            deadlines = [*self._due.values(), *(due for due in self._orphans.values() if due != math.inf),
                         *([stop_by] if stop_by else [])]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            try:
                select.select([self._wake[0]], [], [], timeout)
            except InterruptedError:
                pass
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake[0], 512):
                    pass
            self._reap()
            now = time.monotonic()
            for index, due in list(self._due.items()):
                if due <= now and not self._signalled:
                    del self._due[index]
                    self._start(index)
            for pid, due in list(self._orphans.items()):
                if due <= now:
                    _kill_group(pid, signal.SIGKILL)
                    self._orphans[pid] = math.inf  # reaped when it goes
            if stop_by is not None and now >= stop_by:
                for pid in self.pids:
                    _signal(pid, signal.SIGKILL)  # a worker that did not stop in time
                stop_by = now + 1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._orphans.pop(pid, None)
            index = self.pids.pop(pid, None)
            if index is not None:
                self._worker_ended(index, pid, status)

    def _worker_ended(self, index: int, pid: int, status: int) -> None:
        self.census.clear(index)  # its clients lost their connections; its rooms are gone
        self._stop_orphans(signal.SIGTERM, index)
        if self._signalled:
            return
        code = os.waitstatus_to_exitcode(status)
        how = f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"
        now = time.monotonic()
        if now - self._started[index] < STABLE_AFTER:
            self._failures[index] += 1
        else:
            self._failures[index] = 1
        delay = 0.0 if self._failures[index] < 2 else min(0.5 * 2 ** (self._failures[index] - 2), RESTART_BACKOFF_MAX)
        if delay:
            log.warning("worker %d (pid %d) %s, %d times in a row within %g s of starting: next start in %g s",
                        index, pid, how, self._failures[index], STABLE_AFTER, delay)
        else:
            log.warning("worker %d (pid %d) %s: starting it again", index, pid, how)
        self._due[index] = now + delay

    def _stop_orphans(self, signum: int, dead: int | None = None) -> None:
        """Signal the children that dead workers left; they are ours to reap (we are their subreaper).

        The room children among them (each leads its own session) count as
        stopped by worker ``dead``, so that /metrics still adds up.
        """
        processes = _processes()
        live_rooms = {pid for pid, (parent, _) in processes.items() if parent in self.pids}  # each leads its session
        for pid, (parent, session) in processes.items():
            if parent != os.getpid() or pid in self.pids or session in live_rooms:
                continue
            _kill_group(pid, signum)
            if signum == signal.SIGTERM and pid not in self._orphans:
                self._orphans[pid] = time.monotonic() + KILL_GRACE
                if dead is not None and session == pid:
                    self.census.count("children_stopped", index=dead)


def _private_directory() -> str:
    """Make the directory (0700) for the workers' Unix sockets and lock file.

    A Unix socket's path is at most 107 bytes: under a long TMPDIR, /tmp.
    """
    directory = tempfile.mkdtemp(prefix="scalesocket-")
    if len(os.path.join(directory, "w1023.http")) > 100:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="scalesocket-", dir="/tmp")
    return directory


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen as asyncio's create_server would (SO_REUSEADDR; IPv6 only on an IPv6 address)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _prctl(option: int, value: int) -> None:
    """Linux prctl(2) through libc, where there is one; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass  # a Python built without ctypes: no subreaper, no parent-death signal


def _become_subreaper() -> None:
    # PR_SET_CHILD_SUBREAPER: the children of a worker that dies become ours
    # (not init's), so the supervisor can stop and reap them.
    _prctl(36, 1)


def _set_parent_death_signal(signum: int) -> None:
    # PR_SET_PDEATHSIG: a worker whose supervisor is killed is told to stop.
    _prctl(1, signum)


def _processes() -> dict[int, tuple[int, int]]:
    """Return every process's parent and session, by pid (Linux /proc; elsewhere none)."""
    found = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            found[int(name)] = (int(fields[1]), int(fields[3]))
    return found


def _kill_group(pid: int, signum: int) -> None:
    """Signal a child's process group (it leads one), or the process alone if it does not."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        _signal(pid, signum)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


###############################################################################
# 8. Server and CLI ###########################################################
###############################################################################


DEVCONSOLE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>scalesocket.py console</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
header, footer { display: flex; gap: .5em; padding: .5em; background: #eee; align-items: center; }
#log { flex: 1; overflow-y: auto; margin: 0; padding: .5em; font: 13px/1.35 ui-monospace, monospace; white-space: pre-wrap; }
.in { color: #06c; } .out { color: #222; } .info { color: #888; font-style: italic; }
#line { flex: 1; font: inherit; }
</style>
</head>
<body>
<header>
<label>room <input id="room" size="16"></label>
<button id="connect">connect</button>
<span id="status" class="info">not connected</span>
</header>
<pre id="log"></pre>
<footer>
<input id="line" placeholder="a line to send; Enter sends it" disabled>
<label><input id="binary" type="checkbox"> binary</label>
</footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null;
function show(text, kind) {
  const row = document.createElement("div");
  row.className = kind;
  row.textContent = text;
  $("log").append(row);
  $("log").scrollTop = $("log").scrollHeight;
}
function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join(" ");
}
function connect() {
  if (ws) ws.close();
  const room = $("room").value.trim() || "lobby";
  history.replaceState(null, "", "?room=" + encodeURIComponent(room));
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(scheme + "://" + location.host + "/" + encodeURIComponent(room));
  ws.binaryType = "arraybuffer";
  $("status").textContent = "connecting to " + room + "...";
  ws.onopen = () => {
    $("status").textContent = "connected to " + room;
    $("line").disabled = false;
    $("line").focus();
  };
  ws.onmessage = (e) => show(typeof e.data === "string" ? e.data : "[binary] " + hex(e.data), "out");
  ws.onclose = (e) => {
    $("status").textContent = "closed";
    $("line").disabled = true;
    show("closed: " + e.code + (e.reason ? " " + e.reason : ""), "info");
  };
}
$("room").value = new URLSearchParams(location.search).get("room") || "lobby";
$("connect").onclick = connect;
$("room").onkeydown = (e) => { if (e.key === "Enter") connect(); };
$("line").onkeydown = (e) => {
  if (e.key !== "Enter" || !ws || ws.readyState !== WebSocket.OPEN) return;
  const text = e.target.value;
  ws.send($("binary").checked ? new TextEncoder().encode(text) : text);
  show("> " + text, "in");
  e.target.value = "";
};
connect();
</script>
</body>
</html>
"""


API_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>scalesocket.py rooms</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; min-width: 40em; }
th, td { text-align: left; padding: .3em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
td.meta { font: 12px ui-monospace, monospace; white-space: pre-wrap; max-width: 40em; }
#totals { display: flex; gap: 2em; margin: 1em 0; }
#totals div { font-size: 1.6em; } #totals span { display: block; font-size: .55em; color: #666; }
#status { color: #888; }
</style>
</head>
<body>
<h1>Rooms of this scalesocket.py</h1>
<p id="status">loading...</p>
<div id="totals" hidden>
<div><b id="clients">-</b><span>clients</span></div>
<div><b id="open">-</b><span>rooms</span></div>
<div><b id="in">-</b><span>messages in / s</span></div>
<div><b id="out">-</b><span>messages out / s</span></div>
</div>
<table>
<thead><tr><th>room</th><th class="n">connections</th><th class="n">open for</th><th>metadata</th></tr></thead>
<tbody id="rooms"></tbody>
</table>
<script>
"use strict";
const METRICS = {metrics};  // the server's /metrics is on
const $ = (id) => document.getElementById(id);
let before = null;  // the last /metrics sample: {time, in: {room: count}, out: {room: count}}
function age(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function cell(row, text, kind) {
  const td = document.createElement("td");
  td.textContent = text;  // never HTML: room names and metadata come from clients and children
  if (kind) td.className = kind;
  row.append(td);
}
function showRooms(rooms) {
  const body = $("rooms");
  body.replaceChildren();
  for (const room of rooms) {
    const row = document.createElement("tr");
    row.dataset.room = room.name;
    cell(row, room.name);
    cell(row, String(room.connections), "n");
    cell(row, age(room.open_seconds), "n");
    cell(row, room.metadata === null ? "" : JSON.stringify(room.metadata, null, 1), "meta");
    body.append(row);
  }
  if (!rooms.length) {
    const row = document.createElement("tr");
    cell(row, "no room is open");
    body.append(row);
  }
}
function rate(now, name) {  // messages a second, over the rooms open at both samples
  if (!before) return "-";
  let sum = 0;
  for (const [room, count] of Object.entries(now[name])) {
    if (room in before[name]) sum += Math.max(0, count - before[name][room]);
  }
  return (sum / ((now.time - before.time) / 1000)).toFixed(1);
}
function showMetrics(text) {
  const now = {time: Date.now(), in: {}, out: {}};
  let clients = 0, rooms = 0;
  for (const line of text.split("\\n")) {
    const m = line.match(/^(\\w+)(\\{.*\\})? (\\S+)$/);
    if (!m) continue;
    const value = Number(m[3]);
    if (m[1] === "scalesocket_websocket_connections_open") clients += value;
    else if (m[1] === "scalesocket_rooms_open") rooms = value;
    else if (m[1] === "scalesocket_messages_received_total") now.in[m[2]] = value;
    else if (m[1] === "scalesocket_messages_sent_total") now.out[m[2]] = value;
  }
  $("clients").textContent = clients;
  $("open").textContent = rooms;
  $("in").textContent = rate(now, "in");
  $("out").textContent = rate(now, "out");
  before = now;
  $("totals").hidden = false;
}
async function refresh() {
  try {
    const response = await fetch("/api/rooms?details", {cache: "no-store"});
    if (!response.ok) throw new Error("/api/rooms: " + response.status);
    showRooms(await response.json());
    if (METRICS) {
      const metrics = await fetch("/metrics", {cache: "no-store"});
      if (metrics.ok) showMetrics(await metrics.text());
    }
    $("status").textContent = "updated " + new Date().toLocaleTimeString() + "; every 2 s";
  } catch (e) {
    $("status").textContent = "cannot reach the server (" + e.message + "); trying again";
  }
  setTimeout(refresh, 2000);
}
refresh();
</script>
</body>
</html>
"""


WELCOME_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>scalesocket.py</title>
<style>body { font: 16px/1.5 system-ui, sans-serif; max-width: 42em; margin: 3em auto; padding: 0 1em; }
code { background: #eee; padding: 0 .25em; }</style>
</head>
<body>
<h1>scalesocket.py: a WebSocket server</h1>
<p>This server runs a program for each room and relays its input and output
over WebSockets: every message a client sends goes to the program, and every
line the program writes goes to every client of the room.</p>
<p>Connect a WebSocket to <code>{url}</code>, where ROOM is any room name.</p>
<p>Nothing is served at this address as a page. Start the server with
<code>--staticdir DIR</code> to serve your own page from DIR (the chat example:
<code>python3 scalesocket.py --json --staticdir . cat</code>), or with
<code>--devconsole</code> for a built-in page to try any room.</p>
<p>(404 Not Found)</p>
</body>
</html>
"""


def welcome_page(request: Request, tls: bool) -> bytes:
    """Return the 404 page a browser gets when the server serves no page: what it is, where to connect."""
    host = request.headers.get("host") or "HOST:PORT"
    url = f"{'wss' if tls else 'ws'}://{host}/ROOM"
    return WELCOME_PAGE.replace("{url}", html.escape(url)).encode("utf-8")


def tls_context(config: Config) -> ssl.SSLContext:
    """Return the TLS context for --tlscert/--tlskey.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the certificate or key is not usable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class Server:
    """The HTTP/WebSocket listener and its rooms; embeddable in a running loop.

    ``await server.start()`` binds (``server.port`` is then the bound port, so
    port 0 works); ``await server.close()`` stops accepting, closes every
    client with 1001 and stops every child.
    """

    def __init__(self, config: Config, worker: Worker | None = None) -> None:
        self.config = config
        self.worker = worker  # with --workers: this process's place among them
        if worker is None:
            self.hub = Hub(config)
        else:
            self.hub = Hub(config, worker.census, PortPool(*config.tcp_ports, worker.index, worker.workers))
        self.port: int | None = None
        self.done: asyncio.Event | None = None  # set when --oneshot's room ends
        self.clients: set[Client] = set()  # every open WebSocket client, in a room or not
        self.connections: set[Connection] = set()  # every open TCP connection
        self._tasks: set[asyncio.Task] = set()  # serving a request each
        self._server: asyncio.AbstractServer | None = None
        self._keepalive: asyncio.Task | None = None
        self.closing = False  # close() has begun
        self.accept_failing = False  # out of descriptors: warned once until a connection is accepted

    async def start(self) -> None:
        """Bind and start accepting; log the address actually bound."""
        self.done = asyncio.Event()
        self.hub.on_oneshot_end = self.done.set
        config = self.config
        loop = asyncio.get_running_loop()
        if self.worker is not None:  # the supervisor has bound, and said where; the worker accepts
            self.worker.tls = tls_context(config) if config.tls_cert else None
            await self.worker.start(self)
            self.port = self.worker.listener.getsockname()[1]
        else:
            tls = tls_context(config) if config.tls_cert else None
            self._server = await loop.create_server(
                lambda: Connection(self), config.host, config.port,
                ssl=tls, ssl_handshake_timeout=config.handshake_timeout if tls else None,
            )
            sockname = self._server.sockets[0].getsockname()
            self.port = sockname[1]
            host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
            log.info("listening on %s:%d%s", host, self.port, " (TLS)" if tls else "")
        if config.ping > 0:
            self._keepalive = asyncio.get_running_loop().create_task(self._ping_clients())

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """An event loop exception handler: out of file descriptors is one warning a burst.

        asyncio pauses accepting for a second when accept() fails for want of
        descriptors; it would log a traceback each time.
        """
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        if not self.accept_failing:
            self.accept_failing = True
            exc = context.get("exception")
            log.warning("cannot accept connections: %s (%d open files at most: raise `ulimit -n`); retrying",
                        getattr(exc, "strerror", None) or exc, resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    async def _ping_clients(self) -> None:
        """Ping clients that have been quiet; close those quiet for two intervals.

        One task for the whole server, not one timer per client. A dead TCP
        connection must not keep a room and its child alive forever.
        """
        interval = self.config.ping
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for client in list(self.clients):
                quiet = now - client.last_seen
                if not client.upgraded:
                    continue  # its room is starting: no frame may come before its 101
                if client.waiting or client.throttled:
                    # Not read while its child is behind (or it is over
                    # --maxrate), so its answers wait too. The ping still
                    # finds out if the peer is gone: a closed socket answers
                    # it with a reset.
                    client.ping()
                elif quiet >= 2 * interval:
                    client.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                elif quiet >= interval * 0.9:
                    client.ping()

    async def close(self) -> None:
        """Stop accepting, close every client with 1001, stop every child."""
        self.closing = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._server is not None:
            self._server.close()  # stop accepting
        if self.worker is not None:
            self.worker.stop_accepting()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for connection in list(self.connections):
            if connection.task is None or connection.lingering:
                connection.transport.abort()  # its request head is not in yet, or its response is out
        # Every client is sent 1001 and every child SIGTERM at once; clients
        # that answer get a clean closing handshake meanwhile, and the wait
        # for the rest is no longer than the children's grace.
        children = loop.create_task(self.hub.shutdown())
        for client in list(self.clients):  # clients outside any room (being refused)
            if client.upgraded:  # one still joining gets its 101, then 1001, from join()
                client.close(CloseCode.GOING_AWAY, "server shutting down")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=KILL_GRACE)
        for connection in list(self.connections):
            connection.transport.abort()  # a peer that never answered the close
        await children
        if self.worker is not None:
            self.worker.close()  # only now: until then, a connection handed over gets a 503
            # Relayed clients are closed by their rooms' workers (1001): relay that
            # to the end, as long as those wait for the clients' answers.
            await self.worker.end_relays(max(0.0, started + KILL_GRACE + 1.0 - loop.time()))
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
        if self._server is not None:
            # Only now: since Python 3.12 this also waits for every connection.
            await self._server.wait_closed()

    async def serve(self, connection: Connection, head: bytes) -> None:
        """Serve one request, given its head: an HTTP response or a WebSocket client.

        It guarantees that the TCP connection is closed before it returns.
        """
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve(connection, head)
        except ConnectionError:
            pass
        except Exception:
            log.error("unexpected error on a connection", exc_info=True)
        finally:
            self._tasks.discard(task)
            if not connection.relayed:
                connection.transport.close()

    async def _serve(self, connection: Connection, head: bytes) -> None:
        request = None
        transport = connection.transport
        peer = connection.peer  # the client's, also when another worker relays it (TLS)
        try:
            if len(head) > self.config.max_head:
                raise HeadersTooLarge(f"request head exceeds {self.config.max_head} bytes")
            request = parse_request(head)
            owner = self._owner(request) if self.worker is not None and not connection.handed else None
            if owner is not None:  # TLS: ended here, read here, relayed to the room's worker
                await self.worker.relay(owner, connection, head + bytes(connection._head))
                return
            request.remote_addr = client_address(peer, request.headers, self.config.trust_proxy)
            if self.config.pass_headers or self.config.proxy_headers:
                request.passed = passed_headers(request.headers, self.config.pass_headers, self.config.proxy_headers,
                                                is_trusted(peer, self.config.trust_proxy))
            if is_websocket_upgrade(request):
                await self._serve_websocket(connection, request)
                return
            status = await self._serve_http(connection, request)
            if log.isEnabledFor(logging.DEBUG):
                log_request(logging.DEBUG, request.method, request.path, status, "", request.remote_addr)
        except HTTPError as exc:
            if request is not None:
                method, path, address = request.method, request.path, request.remote_addr or peer
            else:  # what can be read of a head that does not parse
                (method, path), address = request_line_parts(head), peer
            if exc.status == 404 and not self.config.staticdir and not self.config.devconsole and request is not None \
                    and "text/html" in request.headers.get("accept", ""):
                exc = NotFound(exc.reason, html=welcome_page(request, self.config.tls_cert is not None))
            log_request(logging.WARNING if exc.status >= 500 else logging.INFO, method, path, exc.status, exc.reason,
                        address)
            connection.discard_input()
            transport.write(error_response(exc, head_only=request is not None and request.method == "HEAD"))
        await connection.linger()

    def _owner(self, request: Request) -> int | None:
        """Return the worker that must serve a TLS request for a room it owns, unless it is this one.

        A plain connection was routed by its request line before it got here
        (``Worker``); a TLS one is routed here, once TLS is ended and its head
        read. Upgrades and /api/ROOM/... go to the room's worker (relayed);
        everything else (static files, /health, /metrics, /api/rooms) is
        served here, by the worker that ended TLS.

        Raises:
            HTTPError: the upgrade path names no valid room (answered here, as anywhere).
        """
        if is_websocket_upgrade(request):
            room = room_from_path(request.path)
        elif self.config.api and api_room(request.path) is not None:
            room = api_room(request.path)
        else:
            return None
        owner = worker_of(room, self.worker.workers)
        return None if owner == self.worker.index else owner

    async def _states(self) -> list[dict]:
        """Return the state of every room of the server: this process's, and every other worker's."""
        states = [self.hub.state()]
        if self.worker is not None:
            states += await self.worker.peer_states()
        return states

    async def _serve_http(self, connection: Connection, request: Request) -> int:
        """Answer a plain HTTP request; return the status sent.

        Raises:
            HTTPError: the request is refused (404, 405, ...).
        """
        connection.discard_input()
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"method {request.method} is not allowed", [("Allow", "GET, HEAD")])
        head_only = request.method == "HEAD"
        path = request.path
        body = None
        if path == "/health":
            body, ctype = b'{"status":"ok"}', "application/json"
        elif path == "/_worker/state" and connection.internal:
            body, ctype = json.dumps(self.hub.state()).encode("utf-8"), "application/json"
        elif path == "/metrics" and self.config.metrics:
            census = self.hub.census
            totals = {name: census.total(name) for name in Census.COUNTS}
            body, ctype = render_openmetrics(await self._states(), totals).encode("utf-8"), OPENMETRICS_TYPE
        elif path == "/" and self.config.devconsole:
            body, ctype = DEVCONSOLE_PAGE.encode("utf-8"), "text/html; charset=utf-8"
        elif path in ("/api", "/api/") and self.config.api and "text/html" in request.headers.get("accept", ""):
            page = API_PAGE.replace("{metrics}", "true" if self.config.metrics else "false")
            body, ctype = page.encode("utf-8"), "text/html; charset=utf-8"
        elif (path == "/api" or path.startswith("/api/")) and self.config.api:
            states = await self._states() if path == "/api/rooms" else [self.hub.state()]  # a room: its worker
            details = path == "/api/rooms" and "details" in urllib.parse.parse_qs(request.query, keep_blank_values=True)
            value = api_response(states, path, details)
            body, ctype = json.dumps(value, ensure_ascii=False).encode("utf-8"), "application/json"
        if body is not None:
            headers = [("Content-Type", ctype), ("Cache-Control", "no-store")]
            connection.transport.write(render_response(200, headers, b"" if head_only else body, length=len(body)))
            return 200
        path = resolve_static(self.config.staticdir, request.path) if self.config.staticdir else None
        if path is None:
            raise NotFound("no such file")
        return await self._send_file(path, request, connection)

    async def _send_file(self, path: str, request: Request, connection: Connection) -> int:
        """Stream a file in chunks, so memory does not grow with its size; return the status sent."""
        try:
            f = open(path, "rb")
        except PermissionError:
            raise Forbidden("file not readable") from None
        except OSError:
            raise NotFound("no such file") from None
        transport = connection.transport
        with f:
            stat = os.fstat(f.fileno())
            size, mtime = stat.st_size, int(stat.st_mtime)
            if not_modified_since(request.headers.get("if-modified-since"), mtime):
                transport.write(render_response(304, [("Last-Modified", email.utils.formatdate(mtime, usegmt=True))]))
                return 304
            headers = [("Content-Type", guess_type(path)), ("Last-Modified", email.utils.formatdate(mtime, usegmt=True))]
            transport.write(render_response(200, headers, length=size))
            remaining = 0 if request.method == "HEAD" else size
            while remaining > 0:
                chunk = f.read(min(FILE_CHUNK, remaining))
                if not chunk:
                    break  # the file shrank; the client sees a short body
                remaining -= len(chunk)
                if transport.is_closing():
                    break  # the reader reset the connection: nothing more to read or write
                transport.write(chunk)
                await connection.drain()
        return 200

    async def _serve_websocket(self, connection: Connection, request: Request) -> None:
        room_name = room_from_path(request.path)
        if self.config.rooms is not None and room_name not in self.config.rooms:
            raise BadRequest(f"room {room_name!r} is not one of --rooms")
        check_origin(request, self.config.origins, self.config.same_origin)
        response, deflate = handshake_response(request, self.config.compression)
        conn_id = self.hub.census.admit_client(request.remote_addr)
        protocol = WebSocketProtocol(self.config.max_size, deflate=deflate)
        client = Client(conn_id, request, connection, protocol, self.config.max_backlog,
                        log_traffic=self.config.verbose >= 2, max_rate=self.config.max_rate,
                        burst=self.config.max_burst)
        self.clients.add(client)
        try:
            await self._serve_client(client, room_name, request, response)
        finally:
            self.clients.discard(client)
            self.hub.census.release_client(request.remote_addr)
            self.hub.leave(client)
            client.cleanup()

    async def _serve_client(self, client: Client, room_name: str, request: Request, response: bytes) -> None:
        connection = client.connection
        transport = connection.transport
        try:
            room = await self.hub.join(client, room_name, request)
        except RoomUnavailable as exc:
            transport.write(response)
            client.close(exc.code, exc.reason)
        else:
            # No await between joining and these writes: the 101 and the replayed
            # cache come before every live message, and none comes twice.
            transport.write(response)
            if room.cache:
                transport.write(encode_messages(list(room.cache), client.window_bits))
            room.start_output()  # for the first client: what the child wrote so far
            if self.config.joinmsg is not None:
                text = render_template(self.config.joinmsg, client.id, room_name, request)
                room.send_to_child(line_to_child(text, client.id, self.config), client)
        connection.upgrade(client)
        await client.done
        protocol = client.protocol
        log.debug("client %d: = closed %s %s", client.id, protocol.close_code, protocol.close_reason,
                  extra={"client": client.id})
        self.hub.leave(client)
        # After a failure, half-close and let the peer close its side, so that
        # bytes it sent and we never read cannot turn our FIN into a RST that
        # loses the close frame. After a closing handshake the peer sends
        # nothing more, and the server closes the TCP connection first (RFC
        # 6455 §7.1.1).
        if protocol.failed and connection.half_close():
            await asyncio.wait({connection.closed}, timeout=CLOSE_TIMEOUT)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # One line, naming the option, exit status 2: what scripts can parse.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _frame_mode(value: str) -> str:
    if value not in FRAME_MODES:
        raise argparse.ArgumentTypeError(f"expected json or gwsocket, got {value!r}")
    return value


def _cache(value: str) -> tuple[bool, int]:
    kind, sep, size = value.rpartition(":")
    if kind not in ("", "all", "tagged") or (sep and not kind) or not size.isdigit() or int(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected SIZE, all:SIZE or tagged:SIZE with SIZE > 0, got {value!r}")
    return kind == "tagged", int(size)


def _port_range(value: str) -> tuple[int, int]:
    start, sep, end = value.partition(":")
    if not (sep and start.isdigit() and end.isdigit() and 1 <= int(start) <= int(end) <= 65535):
        raise argparse.ArgumentTypeError(f"expected START:END with 1 <= START <= END <= 65535, got {value!r}")
    return int(start), int(end)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 3600, got {value!r}")
    return seconds


def _delimiters(value: str) -> bytes:
    try:
        chars = codecs.decode(value, "unicode_escape").encode("latin-1")
    except (UnicodeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected characters, or escapes such as \\n, \\t, \\0, got {value!r}") from None
    if not chars:
        raise argparse.ArgumentTypeError("expected at least one character")
    return chars


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return names


def _networks(value: str) -> tuple:
    networks = []
    for name in _names(value):
        try:
            networks.append(ipaddress.ip_network(name, strict=False))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected IP addresses or networks (CIDR), got {name!r}") from None
    return tuple(networks)


def _header_names(value: str) -> tuple[str, ...]:
    names = []
    for name in _names(value):
        if not _TOKEN.match(name):
            raise argparse.ArgumentTypeError(f"expected header names such as X-Forwarded-User, got {name!r}")
        if name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def _rate(value: str) -> tuple[float, float]:
    rate, sep, burst = value.partition(":")
    try:
        messages = float(rate)
        most = float(burst) if sep else max(messages, 1.0)
    except ValueError:
        messages = most = 0.0
    if not (0 < messages < math.inf and 1 <= most < math.inf):
        raise argparse.ArgumentTypeError(f"expected MSGS[:BURST], messages a second > 0 and a burst >= 1, got {value!r}")
    return messages, most


def _workers(value: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or not 1 <= int(value) <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of processes from 1 to 1024, or auto, got {value!r}")
    return int(value)


class _HelpFormatter(argparse.HelpFormatter):
    """--help laid out the same on every terminal and Python version (a golden test pins it)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=88)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return names
        metavar = self._metavar_formatter(action, action.dest.upper())(1)[0]
        if names in _EQUALS_ONLY:  # the value is glued on with '='
            return f"{names}[={metavar}]" if _EQUALS_ONLY[names] else f"{names}={metavar}"
        return f"{names} {metavar}"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (ScaleSocket's options, and a few more)."""
    parser = _ArgumentParser(
        prog="scalesocket.py",
        usage="%(prog)s [OPTIONS] CMD [-- ARGS...]",
        formatter_class=_HelpFormatter,
        description="Turn a program that reads stdin and writes stdout into a multi-room "
        "WebSocket server: each client of ws://HOST:PORT/ROOM joins ROOM, whose first "
        "client starts CMD.",
        epilog="--frame, --clientframe, --serverframe and --delimiters take their value "
        "only after '=': `--frame cat` is JSON framing around cat.",
    )
    parser._optionals.title = "options"  # the same title on every Python version
    add = parser.add_argument
    add("cmd", metavar="CMD", nargs="?", help="program to run for each room (never through a shell)")
    add("args", metavar="ARGS", nargs="*", help="arguments for CMD, after --")
    add("--addr", type=_addr, default=("0.0.0.0", 9000), metavar="HOST:PORT",
        help="listen address; [::]:PORT for IPv6 (default: 0.0.0.0:9000)")
    add("-b", "--binary", action="store_true",
        help="binary mode: raw bytes both ways, one binary message per read")
    add("--json", action="store_true",
        help="same as --frame=json with Join and Leave messages to the child")
    add("--frame", type=_frame_mode, metavar="MODE",
        help="framing and routing both ways: json or gwsocket (bare: json)")
    add("--clientframe", type=_frame_mode, metavar="MODE",
        help="framing of client messages to the child only")
    add("--serverframe", type=_frame_mode, metavar="MODE",
        help="framing of child output to the clients only")
    add("--joinmsg", metavar="MSG",
        help="line written to the child when a client joins; #ID, #ROOM, #REMOTE_ADDR, "
        "#QUERY_STRING, #QUERY_<NAME>, #HEADER_<NAME> and #COOKIE_<NAME> are filled in")
    add("--leavemsg", metavar="MSG", help="line written to the child when a client leaves")
    add("--delimiters", type=_delimiters, metavar="CHARS",
        help="cut child output at any of these characters; escapes like \\n work (default: \\n)")
    add("--null", action="store_true", help="cut child output at NUL bytes")
    add("--cache", type=_cache, metavar="[all|tagged:]SIZE",
        help="replay the room's last SIZE messages to each new client; tagged: only "
        'messages with "_cache": true')
    add("--cachepersist", action="store_true", help="keep a room's cache after the room empties")
    add("--rooms", type=_names, metavar="LIST", help="comma-separated list of the only rooms accepted")
    add("--maxrooms", "--maxforks", type=_positive_int, metavar="NUM",
        help="at most NUM rooms (children) at once; more are closed with 1013")
    add("--oneshot", action="store_true", help="serve a single room once, exit when it ends")
    add("--passenv", type=_names, default=list(DEFAULT_PASSENV), metavar="LIST",
        help="environment variables passed to the child (default: PATH,DYLD_LIBRARY_PATH)")
    add("--tcp", action="store_true",
        help="talk to the child over TCP: it gets PORT and listens on 127.0.0.1:PORT")
    add("--tcpports", type=_port_range, default=(9001, 9999), metavar="START:END",
        help="ports for --tcp children (default: 9001:9999)")
    add("--delay", type=_seconds, default=0.0, metavar="SECONDS",
        help="with --tcp, wait this long before the first connection attempt; attempts "
        "repeat until the child listens (default: 0)")
    add("--staticdir", metavar="DIR", help="serve files from DIR over HTTP on the same port")
    add("--metrics", action="store_true", help="serve OpenMetrics text at /metrics")
    add("--api", action="store_true", help="serve the JSON room API under /api/")
    add("--maxsize", type=_positive_int, default=DEFAULT_MAX_MESSAGE, metavar="BYTES",
        help=f"largest message from a client, in bytes (default: {DEFAULT_MAX_MESSAGE})")
    add("--maxhead", type=_positive_int, default=DEFAULT_MAX_HEAD, metavar="BYTES",
        help=f"largest HTTP request head; larger ones get 431 (default: {DEFAULT_MAX_HEAD})")
    add("--handshaketimeout", type=_seconds, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
        help=f"drop a connection that has not sent its request head (and TLS handshake) by then "
        f"(default: {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    add("--maxclients", type=_positive_int, default=DEFAULT_MAX_CLIENTS, metavar="NUM",
        help=f"at most NUM WebSocket clients at once; more get 503 (default: {DEFAULT_MAX_CLIENTS})")
    add("--maxbacklog", type=_positive_int, default=DEFAULT_MAX_BACKLOG, metavar="BYTES",
        help=f"close a client (1008) that leaves more than this unread (default: {DEFAULT_MAX_BACKLOG})")
    add("--ping", type=_seconds, default=DEFAULT_PING, metavar="SECONDS",
        help=f"ping quiet clients this often and close those silent for twice as long; 0: off "
        f"(default: {DEFAULT_PING:g})")
    add("--origins", type=_names, metavar="LIST",
        help="allowed Origin values (https://host[:port] or host[:port]); others get 403")
    add("--sameorigin", action="store_true", help="allow a browser Origin only if it matches the Host header")
    add("--trustproxy", type=_networks, default=(), metavar="LIST",
        help="comma-separated proxy addresses or networks (CIDR) whose X-Forwarded-For or "
        "Forwarded header names the client's address")
    add("--passheaders", type=_header_names, default=(), metavar="LIST",
        help="request headers the child sees: #HEADER_<NAME> and #COOKIE_<NAME> in --joinmsg "
        "and --leavemsg, HTTP_<NAME> in its environment")
    add("--proxyheaders", type=_header_names, default=(), metavar="LIST",
        help="headers passed like --passheaders, but only from a --trustproxy peer (such as "
        "X-Forwarded-User); empty from any other")
    add("--maxclientsperaddr", type=_positive_int, metavar="NUM",
        help="at most NUM WebSocket clients from one address; more get 429")
    add("--maxrate", type=_rate, metavar="MSGS[:BURST]",
        help="messages a second a client may send (BURST at once, default MSGS); a client over "
        "it is not read until it is within it again")
    add("--tlscert", metavar="FILE", help="serve wss:// and https:// with this certificate chain (PEM)")
    add("--tlskey", metavar="FILE", help="the private key for --tlscert (PEM)")
    add("--compression", choices=("on", "off"), default="on",
        help="permessage-deflate for clients that offer it (default: on)")
    add("--pty", action="store_true",
        help="run the child on a pseudo-terminal (echo off), so it flushes every line")
    add("--devconsole", action="store_true",
        help="serve a built-in page at / to try the server from a browser")
    add("--workers", type=_workers, default=1, metavar="N",
        help="serve with N processes (auto: one per CPU), each room pinned to one of them "
        "(default: 1)")
    add("--log", choices=("text", "json"), default="text", help="log format, to stderr (default: text)")
    add("-v", "--verbose", action="count", default=0, help="more log detail; -vv logs every message")
    add("-V", "--version", action="version", version=f"scalesocket.py {__version__}")
    return parser


USAGE_EXAMPLE = "for example: python3 scalesocket.py --devconsole cat    (then open http://localhost:9000/)"

# Options whose value comes only after '=', as in the original: a bare
# `--frame` means json, and the word after it is the command.
_EQUALS_ONLY = {"--frame": "json", "--clientframe": "json", "--serverframe": "json", "--delimiters": None}


def parse_args(argv: list[str]) -> Config:
    """Turn a command line into a Config; exits with status 2 on a bad one."""
    parser = build_parser()
    if "--" in argv:
        split = argv.index("--")
        argv, child_args = argv[:split], argv[split + 1 :]
    else:
        child_args = []
    words = []
    for word in argv:
        if word in _EQUALS_ONLY:
            if _EQUALS_ONLY[word] is None:
                parser.error(f"argument {word}: expected a value after '=', as in {word}=,;")
            word = f"{word}={_EQUALS_ONLY[word]}"
        words.append(word)
    ns = parser.parse_args(words)
    if ns.cmd is None:  # argparse would name ARGS too, which may be left out
        parser.exit(2, f"{parser.prog}: error: the following arguments are required: CMD\n{USAGE_EXAMPLE}\n")

    def conflict(first: str, second: str) -> None:
        parser.error(f"argument {second}: not allowed with argument {first}")

    if ns.json and ns.frame:
        conflict("--json", "--frame")
    for one_way in ("clientframe", "serverframe"):
        if getattr(ns, one_way) and (ns.json or ns.frame):
            conflict("--json" if ns.json else "--frame", f"--{one_way}")
    if ns.null and ns.delimiters:
        conflict("--delimiters", "--null")
    if ns.cachepersist and not ns.cache:
        parser.error("argument --cachepersist: needs --cache")
    if ns.staticdir is not None and not os.path.isdir(ns.staticdir):
        parser.error(f"argument --staticdir: {ns.staticdir!r} is not a directory")
    if ns.pty and ns.tcp:
        conflict("--tcp", "--pty")
    if ns.devconsole and ns.staticdir:
        conflict("--staticdir", "--devconsole")
    if ns.workers > 1 and ns.oneshot:
        conflict("--oneshot", "--workers")
    if ns.proxyheaders and not ns.trustproxy:
        parser.error("argument --proxyheaders: needs --trustproxy, the proxies these headers may come from")
    both = set(ns.passheaders) & set(ns.proxyheaders)
    if both:
        parser.error(f"argument --proxyheaders: {sorted(both)[0]} is in --passheaders too: a header that only "
                     "the proxy may set goes in --proxyheaders alone")
    if "proxy" in ns.passheaders + ns.proxyheaders:
        # httpoxy: HTTP_PROXY is the variable HTTP libraries take their proxy from.
        option = "--passheaders" if "proxy" in ns.passheaders else "--proxyheaders"
        parser.error(f"argument {option}: Proxy would be HTTP_PROXY to the child, the proxy its HTTP "
                     "libraries use: any client could choose it")
    spelled: dict[str, str] = {}
    for name in ns.passheaders + ns.proxyheaders:
        other = spelled.setdefault(cgi_name(name), name)
        if other != name:
            parser.error(f"argument --passheaders: {other} and {name} are both HTTP_{cgi_name(name)} to the child")
    for option, template in (("--joinmsg", ns.joinmsg), ("--leavemsg", ns.leavemsg)):
        for kind, name in re.findall(r"#(HEADER|COOKIE)_([A-Za-z0-9_]+)", template or ""):
            header = "COOKIE" if kind == "COOKIE" else name.upper()
            if header not in spelled:
                parser.error(f"argument {option}: #{kind}_{name} needs "
                             f"{'Cookie' if kind == 'COOKIE' else header.replace('_', '-').title()} "
                             "in --passheaders or --proxyheaders")
    if bool(ns.tlscert) != bool(ns.tlskey):
        parser.error("argument --tlscert: --tlscert and --tlskey go together")
    frame = "json" if ns.json else ns.frame
    host, port = ns.addr
    cache_tagged, cache_size = ns.cache or (False, 0)
    config = Config(
        cmd=ns.cmd,
        args=ns.args + child_args,
        host=host,
        port=port,
        binary=ns.binary,
        clientframe=ns.clientframe or frame,
        serverframe=ns.serverframe or frame,
        joinmsg=ns.joinmsg if ns.joinmsg is not None else '{"t":"Join","_from":#ID}' if ns.json else None,
        leavemsg=ns.leavemsg if ns.leavemsg is not None else '{"t":"Leave","_from":#ID}' if ns.json else None,
        staticdir=ns.staticdir,
        max_size=ns.maxsize,
        delimiters=b"\0" if ns.null else ns.delimiters or b"\n",
        passenv=tuple(ns.passenv),
        cache_size=cache_size,
        cache_tagged=cache_tagged,
        cache_persist=ns.cachepersist,
        rooms=frozenset(ns.rooms) if ns.rooms else None,
        max_rooms=ns.maxrooms,
        oneshot=ns.oneshot,
        tcp=ns.tcp,
        tcp_ports=ns.tcpports,
        delay=ns.delay,
        metrics=ns.metrics,
        api=ns.api,
        log_format=ns.log,
        verbose=ns.verbose,
        max_head=ns.maxhead,
        handshake_timeout=ns.handshaketimeout,
        max_clients=ns.maxclients,
        max_backlog=ns.maxbacklog,
        ping=ns.ping,
        origins=frozenset(origin.lower() for origin in ns.origins) if ns.origins else None,
        same_origin=ns.sameorigin,
        trust_proxy=ns.trustproxy,
        pass_headers=ns.passheaders,
        proxy_headers=ns.proxyheaders,
        max_clients_per_addr=ns.maxclientsperaddr,
        max_rate=ns.maxrate[0] if ns.maxrate else None,
        max_burst=ns.maxrate[1] if ns.maxrate else 1.0,
        tls_cert=ns.tlscert,
        tls_key=ns.tlskey,
        compression=ns.compression == "on",
        pty=ns.pty,
        devconsole=ns.devconsole,
        workers=ns.workers,
    )
    if config.tls_cert:
        try:
            tls_context(config)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"argument --tlscert: cannot use {config.tls_cert} and {config.tls_key}: {exc}")
    return config


class _WorkerField(logging.Filter):
    """Stamp each log record with the worker that wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and worker, room and client when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        for key in ("worker", "room", "client", "method", "path", "status", "reason", "remote_addr"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(config: Config) -> None:
    """Send the 'scalesocket' log to stderr in the configured format and level.

    Process-wide, so only for the command line: records skip what no line
    shows (the caller's frame, thread, process and task names), which is a
    third of what two log lines cost a handshake (the logging HOWTO's
    "Optimization").
    """
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if config.verbose else logging.INFO)


async def serve(config: Config, worker: Worker | None = None) -> None:
    """Run a server (or one worker) until SIGINT or SIGTERM (or --oneshot's room ends), then close it."""
    server = Server(config, worker)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(server.loop_error)
    signalled = asyncio.Event()  # from before the "listening on" line: a script may signal at once
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled.set)
    try:
        await server.start()
        waits = {loop.create_task(server.done.wait()), loop.create_task(signalled.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.close()


def _watch_children_with_pidfds() -> asyncio.AbstractChildWatcher | None:
    """Before Python 3.12, make asyncio wait for children with pidfds, if the kernel has them.

    Its default there starts a thread per child to wait for it, which costs
    more than starting the child; Python 3.12 and newer use pidfds already.
    Process-wide, so only for the command line's own loop.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return None
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return None  # an old kernel, or a sandbox that forbids the call
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    return watcher


async def _serve_command_line(config: Config, worker: Worker | None = None) -> None:
    watcher = _watch_children_with_pidfds()
    try:
        await serve(config, worker)
    finally:
        if watcher is not None:
            watcher.close()


def _run_worker(config: Config, worker: Worker) -> int:
    """Serve as one of --workers, in the worker's own process; return its exit status."""
    for handler in log.handlers:
        handler.addFilter(_WorkerField(worker.index))
        if not isinstance(handler.formatter, JSONFormatter):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker %(worker)d] %(message)s"))
    if not hasattr(select, "EPOLLEXCLUSIVE"):  # not Linux: every worker wakes for each new connection
        asyncio.run(_serve_command_line(config, worker))
        return 0
    # asyncio.run, with a loop on the selector of our own (Python 3.9 has no loop_factory).
    loop = asyncio.SelectorEventLoop(_ExclusiveSelector((worker.listener.fileno(),)))
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve_command_line(config, worker))
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            if hasattr(loop, "shutdown_default_executor"):
                loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    return 0


def open_files_needed(config: Config) -> int:
    """Return how many descriptors one process needs to hold what the options admit.

    One a client that --maxclients admits, and FDS_PER_ROOM a room when
    --maxrooms bounds them (without it, rooms are not counted: how many
    clients share a room is the application's to know); with --workers each
    process holds its share (each has a descriptor table of its own).
    """
    rooms = min(config.max_rooms, config.max_clients) if config.max_rooms else 0
    share = -(-(config.max_clients + FDS_PER_ROOM * rooms) // config.workers)
    return share + RESERVED_FDS


def raise_open_file_limit(config: Config) -> None:
    """Raise the soft limit on open files to the hard one, as Go's runtime and nginx do.

    Shells often start programs with a soft limit of 1,024 while the hard
    limit is far higher. If even the hard limit cannot hold what the options
    admit (``open_files_needed``), one warning line says so at start.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_files_needed(config)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        rooms = f" and --maxrooms {config.max_rooms}" if config.max_rooms else ""
        per = " per worker" if config.workers > 1 else ""
        log.warning("open file limit is %d, but --maxclients %d%s %s about %d%s: raise it (ulimit -n %d) "
                    "or lower --maxclients", soft, config.max_clients, rooms, "need" if rooms else "needs", need, per,
                    need)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(config)
    raise_open_file_limit(config)
    if config.workers > 1:
        return Supervisor(config, lambda worker: _run_worker(config, worker)).run()
    try:
        asyncio.run(_serve_command_line(config))
    except OSError as exc:
        print(f"scalesocket.py: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
