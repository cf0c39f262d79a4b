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
import enum
import hashlib
import http
import json
import logging
import mimetypes
import os
import re
import signal
import struct
import sys
import urllib.parse
from dataclasses import dataclass, field

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CloseCode",
    "Config",
    "Frame",
    "FrameParser",
    "HTTPError",
    "Message",
    "Opcode",
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
MAX_HEAD_BYTES = 16 * 1024  # request line plus headers
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0  # seconds for a client to send its whole request head
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's side of a closing handshake
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a child
READ_CHUNK = 256 * 1024
FILE_CHUNK = 64 * 1024
DEFAULT_PASSENV = ("PATH", "DYLD_LIBRARY_PATH")
FRAME_MODES = ("json", "gwsocket")
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

    def __init__(self, reason: str = "", headers: list[tuple[str, str]] | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers or []
        if status is not None:
            self.status = status


class BadRequest(HTTPError):
    status = 400


class NotFound(HTTPError):
    status = 404


class MethodNotAllowed(HTTPError):
    status = 405


class UpgradeRequired(HTTPError):
    status = 426


class HeadersTooLarge(HTTPError):
    status = 431


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


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3).

    One big-integer XOR over the whole payload runs in C, which is far faster
    than any per-byte loop in Python.
    """
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


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

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer ``data`` and return the frames it completes.

        Raises:
            ProtocolError: the stream breaks RFC 6455 (code 1002).
            MessageTooBig: a frame is longer than ``max_size`` (code 1009).
        """
        buf = self._buf
        buf += data
        frames = []
        self._partial = None
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
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
                self._partial = (opcode, head, mask)
                break
            payload = bytes(buf[pos + head : pos + head + length])
            if self.masked:
                payload = apply_mask(payload, bytes(buf[pos + head - 4 : pos + head]))
            frames.append(Frame(Opcode(opcode), payload, bool(b0 & 0x80), False))
            pos += head + length
        if pos:
            del buf[:pos]
        return frames

    def partial_payload(self, start: int) -> tuple[int, bytes] | None:
        """Return the opcode and the payload bytes from ``start`` on of a frame
        that is still arriving (unmasked), or None if no frame is half-received.
        """
        if self._partial is None:
            return None
        opcode, head, mask = self._partial
        data = bytes(self._buf[head + start :])
        if mask:
            shift = start % 4
            data = apply_mask(data, mask[shift:] + mask[:shift])
        return opcode, data


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

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE, *, client: bool = False) -> None:
        self.max_size = max_size
        self.state = State.OPEN
        self.parser = FrameParser(max_size, masked=not client)
        self.client = client
        self.close_code: int | None = None  # from the peer's close frame
        self.close_reason = ""
        self._events: list[Message] = []
        self._out: list[bytes] = []
        self._frag_opcode: Opcode | None = None
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
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
            if self.state is State.OPEN:
                self._check_partial_text()
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)

    def _check_partial_text(self) -> None:
        """Fail fast on bad UTF-8 in a text frame before all of it has arrived."""
        partial = self.parser.partial_payload(self._partial_checked)
        if partial is None:
            return
        opcode, data = partial
        if opcode == Opcode.CONT:
            opcode = self._frag_opcode
        if opcode != Opcode.TEXT or not data:
            return
        if self._partial_decoder is None:
            self._partial_decoder = codecs.getincrementaldecoder("utf-8")()
            if self._decoder is not None:  # continue where the earlier fragments ended
                self._partial_decoder.setstate(self._decoder.getstate())
        try:
            self._partial_decoder.decode(data, False)
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
        size = self._frag_size + len(payload)
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
            if self._frag_parts:
                self._frag_parts.append(payload)
                payload = b"".join(self._frag_parts)
            self._events.append(Message(opcode, payload))
            self._frag_opcode = None
            self._frag_parts = []
            self._frag_size = 0
            self._decoder = None
        else:
            self._frag_opcode = opcode
            self._frag_parts.append(payload)
            self._frag_size = size

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


@dataclass
class Request:
    """An HTTP request head; header names are lower-case."""

    method: str
    target: str
    path: str
    query: str
    headers: dict[str, str]
    version: str = "HTTP/1.1"
    remote_addr: str = ""

    def header_tokens(self, name: str) -> set[str]:
        """Return the comma-separated tokens of a header, lower-cased."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, CRLF-terminated).

    Raises:
        BadRequest: the head is not a well-formed HTTP/1.x request.
        HTTPError: 505 for an HTTP version other than 1.0 or 1.1.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request head is not ASCII") from None
    lines = text.split("\r\n")
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
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest("request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest("malformed header line")
        value = value.strip(" \t")
        if any(c < " " and c != "\t" or c == "\x7f" for c in value):
            raise BadRequest("control character in a header value")
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = target.partition("?")
    query = query.partition("#")[0]
    return Request(method, target, path, query, headers, version)


def render_response(status: int, headers: list[tuple[str, str]] = (), body: bytes = b"", *, length: int | None = None) -> bytes:
    """Return a response head (and body); every response but 101 closes the connection."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if status != 101:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(exc: HTTPError, *, head_only: bool = False) -> bytes:
    """Return the response for an HTTPError: its status, headers and reason."""
    body = f"{exc.status} {http.HTTPStatus(exc.status).phrase}: {exc.reason}\n".encode("utf-8")
    headers = exc.headers + [("Content-Type", "text/plain; charset=utf-8")]
    return render_response(exc.status, headers, b"" if head_only else body, length=len(body))


def is_websocket_upgrade(request: Request) -> bool:
    """Tell whether a request asks to become a WebSocket (its Upgrade names websocket)."""
    return "websocket" in request.header_tokens("upgrade")


def handshake_response(request: Request) -> bytes:
    """Validate an opening handshake (RFC 6455 §4.2.1) and return the 101 response.

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
        raw = b""
    if len(raw) != 16:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64")
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    return render_response(101, headers)


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
    verbose: int = 0


def child_env(config: Config, room: str, request: Request) -> dict[str, str]:
    """Return the child's environment: --passenv variables plus CGI-like ones."""
    env = {name: os.environ[name] for name in config.passenv if name in os.environ}
    env["ROOM"] = room
    env["QUERY_STRING"] = request.query
    env["REMOTE_ADDR"] = request.remote_addr
    return env


_TEMPLATE_VAR = re.compile(r"#(ID|ROOM|REMOTE_ADDR|QUERY_STRING|QUERY_[A-Za-z0-9_]+)")


def render_template(template: str, conn_id: int, room: str, request: Request) -> str:
    """Fill #ID, #ROOM, #REMOTE_ADDR, #QUERY_STRING and #QUERY_<NAME> in a template.

    One pass, so a value can never bring in another variable; room names and
    query values are percent-encoded, so they cannot break a JSON template.
    """
    query = urllib.parse.parse_qs(request.query, keep_blank_values=True)

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "ID":
            return str(conn_id)
        if name == "ROOM":
            return urllib.parse.quote(room, safe="")
        if name == "REMOTE_ADDR":
            return request.remote_addr
        if name == "QUERY_STRING":
            return request.query
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


def split_output(buf: bytes, delimiters: bytes, max_size: int) -> tuple[list[bytes], bytes]:
    """Cut child output at any delimiter byte; return (messages, unfinished rest).

    With the default newline delimiter a trailing CR is dropped. A line
    longer than ``max_size`` is cut into ``max_size`` pieces, so a child that
    never ends its line cannot grow memory without bound.
    """
    if len(delimiters) == 1:
        pieces = buf.split(delimiters)
    else:
        pieces = re.split(b"[" + re.escape(delimiters) + b"]", buf)
    rest = pieces.pop()
    if delimiters == b"\n":
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


def route_json(line: bytes) -> int | None:
    """Return the client id of a JSON line's integer ``_to``, or None (broadcast)."""
    if not line.startswith(b"{") or b'"_to"' not in line:
        return None  # cheap test first: most lines are broadcasts
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    to = obj.get("_to") if isinstance(obj, dict) else None
    return to if type(to) is int else None


def text_payload(data: bytes) -> bytes:
    """Return ``data`` as valid UTF-8, with bad bytes replaced by U+FFFD."""
    if _is_utf8(data):
        return data
    return data.decode("utf-8", "replace").encode("utf-8")


class Room:
    """One room: its clients and its child process, with the stdout and stderr pumps."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.config = hub.config
        self.name = name
        self.clients: dict[int, Client] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.ended = False  # no client may join once the child is gone or going
        self.starting: asyncio.Task | None = None
        self.failure: str | None = None  # why the server stopped the child, if it did
        self._tasks: list[asyncio.Task] = []
        self._stdin_lock = asyncio.Lock()
        self._out = bytearray()  # output that does not make a whole message yet

    async def start(self, env: dict[str, str]) -> None:
        """Start the child and its pumps.

        Raises:
            ProcessSpawnError: the command could not be started.
        """
        config = self.config
        try:
            self.proc = await asyncio.create_subprocess_exec(
                config.cmd,
                *config.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                # Own session: a Ctrl-C on the server's terminal reaches the
                # server, which then stops every child in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessSpawnError(f"cannot start {config.cmd}: {exc.strerror or exc}") from None
        log.info("room %r: started child %d: %s", self.name, self.proc.pid, config.cmd)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump_stdout()), loop.create_task(self._pump_stderr())]

    async def send_to_child(self, data: bytes) -> None:
        """Write to the child's stdin, waiting while its pipe is full (backpressure)."""
        stdin = self.proc.stdin if self.proc else None
        if stdin is None or self.ended or stdin.is_closing():
            return
        stdin.write(data)
        async with self._stdin_lock:  # Python 3.9 allows one drain() waiter at a time
            try:
                await stdin.drain()
            except (ConnectionError, BrokenPipeError):
                pass  # the child is gone; its exit is handled by the stdout pump

    def write_to_child_nowait(self, data: bytes) -> None:
        """Write to the child's stdin without waiting (for leave messages)."""
        stdin = self.proc.stdin if self.proc else None
        if stdin is not None and not stdin.is_closing():
            stdin.write(data)

    def broadcast(self, data: bytes) -> None:
        """Write encoded frames to every client of the room."""
        for client in self.clients.values():
            client.send(data)

    def _deliver(self, chunk: bytes) -> None:
        """Cut child output into messages and send them where they go."""
        config = self.config
        if config.serverframe == "gwsocket":
            self._deliver_gwsocket(chunk)
            return
        if config.binary and config.serverframe is None:
            self.broadcast(encode_frame(Opcode.BINARY, chunk))
            return
        buf = self._out
        if self._no_delimiter(chunk) and len(buf) + len(chunk) <= config.max_size:
            buf += chunk  # the line goes on: wait for its end without copying it again
            return
        if buf:
            buf += chunk
            chunk = bytes(buf)
            buf.clear()
        lines, rest = split_output(chunk, config.delimiters, config.max_size)
        buf += rest
        self._deliver_lines(lines)

    def _no_delimiter(self, chunk: bytes) -> bool:
        delimiters = self.config.delimiters
        if len(delimiters) == 1:
            return delimiters not in chunk
        return not any(d in chunk for d in delimiters)

    def _deliver_lines(self, lines: list[bytes]) -> None:
        routed = self.config.serverframe == "json"
        pending = []  # broadcast frames, written to each client in one go
        for line in lines:
            frame = encode_frame(Opcode.TEXT, text_payload(line))
            to = route_json(line) if routed else None
            if to is None:
                pending.append(frame)
                continue
            if pending:
                self.broadcast(b"".join(pending))
                pending = []
            client = self.clients.get(to)
            if client is not None:
                client.send(frame)
        if pending:
            self.broadcast(b"".join(pending))

    def _deliver_gwsocket(self, chunk: bytes) -> None:
        buf = self._out
        buf += chunk
        messages, used = parse_gwsocket(buf, self.config.max_size)
        del buf[:used]
        for to, kind, payload in messages:
            if kind == 1:
                frame = encode_frame(Opcode.TEXT, text_payload(payload))
            else:
                frame = encode_frame(Opcode.BINARY, payload)
            if to == 0:
                self.broadcast(frame)
            elif to in self.clients:
                self.clients[to].send(frame)

    async def _pump_stdout(self) -> None:
        reader = self.proc.stdout
        try:
            while True:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                self._deliver(chunk)
            if self._out and self.config.serverframe != "gwsocket":
                self._deliver_lines([bytes(self._out)])  # last line without a delimiter
        except FramingError as exc:
            log.error("room %r: child output: %s; stopping the child", self.name, exc)
            self.failure = f"child output broke the framing: {exc}"
            os.killpg(self.proc.pid, signal.SIGKILL)
        returncode = await self.proc.wait()
        self.hub.on_child_exit(self, returncode)

    async def _pump_stderr(self) -> None:
        reader = self.proc.stderr
        while True:
            line = await reader.read(READ_CHUNK)
            if not line:
                break
            for text in line.decode("utf-8", "replace").splitlines():
                log.warning("room %r: child stderr: %s", self.name, text)

    async def stop(self) -> None:
        """Stop the child and reap it: SIGTERM, then SIGKILL after KILL_GRACE.

        The signals go to the child's process group, so whatever it started
        goes too and no grandchild keeps the pipes (or the room) alive.
        """
        self.ended = True
        if self.starting is not None and not self.starting.done():
            await asyncio.gather(self.starting, return_exceptions=True)
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # the whole group is gone already
            try:
                await asyncio.wait_for(proc.wait(), KILL_GRACE)
                break
            except asyncio.TimeoutError:
                if signum == signal.SIGTERM:
                    log.warning("room %r: child %d ignored SIGTERM, killing it", self.name, proc.pid)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        log.info("room %r: child %d stopped", self.name, proc.pid)


class Hub:
    """All rooms of a server. Every change to a room's membership happens here."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rooms: dict[str, Room] = {}
        self._last_id = 0
        self._stopping: set[asyncio.Task] = set()

    def new_client_id(self) -> int:
        """Return the next client id: 1, 2, 3... for the server's lifetime."""
        self._last_id += 1
        return self._last_id

    async def join(self, client: Client, room_name: str, request: Request) -> Room:
        """Put a client in its room, starting the room's child if it is the first.

        When it returns, the client is in the room; the caller must write the
        101 response before awaiting anything, so it precedes every broadcast.

        Raises:
            RoomUnavailable: the child could not be started, or has exited.
        """
        room = self.rooms.get(room_name)
        if room is None:
            room = Room(self, room_name)
            self.rooms[room_name] = room
            env = child_env(self.config, room_name, request)
            room.starting = asyncio.get_running_loop().create_task(room.start(env))
        try:
            await asyncio.shield(room.starting)
        except ProcessSpawnError as exc:
            room.ended = True
            if self.rooms.get(room_name) is room:
                del self.rooms[room_name]
            log.error("room %r: %s", room_name, exc.reason)
            raise
        if room.ended:
            raise RoomUnavailable("the room's child has exited")
        room.clients[client.id] = client
        client.room = room
        log.info("client %d joined room %r (%s)", client.id, room_name, request.remote_addr)
        return room

    def leave(self, client: Client) -> None:
        """Take a client out of its room; the last one out stops the child."""
        room = client.room
        if room is None or room.clients.pop(client.id, None) is None:
            return
        log.info("client %d left room %r", client.id, room.name)
        if room.ended:
            return
        if self.config.leavemsg is not None:
            text = render_template(self.config.leavemsg, client.id, room.name, client.request)
            room.write_to_child_nowait(line_to_child(text, client.id, self.config))
        if not room.clients:
            log.info("room %r: all clients left, stopping the child", room.name)
            self._end(room)

    def on_child_exit(self, room: Room, returncode: int) -> None:
        """Close every client of a room whose child exited on its own."""
        if room.ended:
            return
        self._end(room)
        if room.failure:
            reason = room.failure
        elif returncode >= 0:
            reason = f"child exited with code {returncode}"
        else:
            reason = f"child killed by signal {-returncode}"
        log.info("room %r: %s", room.name, reason)
        code = CloseCode.NORMAL if returncode == 0 and not room.failure else CloseCode.INTERNAL_ERROR
        for client in list(room.clients.values()):
            client.close(code, reason)

    def _end(self, room: Room) -> None:
        """Take a room out of service and stop its child in the background."""
        room.ended = True
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
        task = asyncio.get_running_loop().create_task(room.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def shutdown(self) -> None:
        """Close every client with 1001 and stop every child."""
        for room in list(self.rooms.values()):
            self._end(room)
            for client in list(room.clients.values()):
                client.close(CloseCode.GOING_AWAY, "server shutting down")
        await asyncio.gather(*self._stopping, return_exceptions=True)


###############################################################################
# 5. Connections (asyncio I/O) ################################################
###############################################################################


class Client:
    """One WebSocket client: its protocol state and the transport it writes to.

    Writes go straight to the transport, in order, so a broadcast frame is
    encoded once and the same bytes are written to every client.
    """

    def __init__(self, conn_id: int, request: Request, writer: asyncio.StreamWriter, protocol: WebSocketProtocol) -> None:
        self.id = conn_id
        self.request = request
        self.writer = writer
        self.protocol = protocol
        self.room: Room | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    def send(self, data: bytes) -> None:
        """Write encoded frames, unless the closing handshake has begun."""
        if self.protocol.state is State.OPEN:
            self.writer.write(data)

    def flush(self) -> None:
        """Write what the protocol has queued (pongs, close frames)."""
        data = self.protocol.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; drop the connection if the peer does not answer in time."""
        if self.protocol.state is not State.OPEN:
            return
        log.debug("client %d: > close %d %s", self.id, code, reason)
        self.protocol.send_close(code, reason)
        self.flush()
        transport = self.writer.transport
        self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def cancel_timer(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()


###############################################################################
# 6. Server and CLI ###########################################################
###############################################################################


class Server:
    """The HTTP/WebSocket listener and its rooms; embeddable in a running loop.

    ``await server.start()`` binds (``server.port`` is then the bound port, so
    port 0 works); ``await server.close()`` stops accepting, closes every
    client with 1001 and stops every child.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hub = Hub(config)
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self.handle_connection, self.config.host, self.config.port, limit=MAX_HEAD_BYTES
        )
        sockname = self._server.sockets[0].getsockname()
        self.port = sockname[1]
        host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        log.info("listening on %s:%d", host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.hub.shutdown()
        if self._connections:
            done, pending = await asyncio.wait(set(self._connections), timeout=CLOSE_TIMEOUT + 1)
            for task in pending:
                task.cancel()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one TCP connection: an HTTP request or a WebSocket client.

        It guarantees that the TCP connection is closed before it returns.
        """
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.error("unexpected error on a connection", exc_info=True)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDSHAKE_TIMEOUT)
            except asyncio.LimitOverrunError:
                raise HeadersTooLarge(f"request head exceeds {MAX_HEAD_BYTES} bytes") from None
            except asyncio.TimeoutError:
                log.debug("! request head not received in %s s", HANDSHAKE_TIMEOUT)
                return
            request = parse_request(head)
            peer = writer.get_extra_info("peername")
            request.remote_addr = peer[0] if isinstance(peer, tuple) else ""
            if is_websocket_upgrade(request):
                await self._serve_websocket(request, reader, writer)
            else:
                await self._serve_http(request, writer)
        except HTTPError as exc:
            log.info("! %d %s", exc.status, exc.reason)
            writer.write(error_response(exc))
            await writer.drain()

    async def _serve_http(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"method {request.method} is not allowed", [("Allow", "GET, HEAD")])
        head_only = request.method == "HEAD"
        if request.path == "/health":
            body = b'{"status":"ok"}'
            headers = [("Content-Type", "application/json")]
            writer.write(render_response(200, headers, b"" if head_only else body, length=len(body)))
            await writer.drain()
            return
        path = resolve_static(self.config.staticdir, request.path) if self.config.staticdir else None
        if path is None:
            raise NotFound("no such file")
        await self._send_file(path, head_only, writer)

    async def _send_file(self, path: str, head_only: bool, writer: asyncio.StreamWriter) -> None:
        """Stream a file in chunks, so memory does not grow with its size."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            headers = [("Content-Type", guess_type(path))]
            writer.write(render_response(200, headers, length=size))
            remaining = 0 if head_only else size
            while remaining > 0:
                chunk = f.read(min(FILE_CHUNK, remaining))
                if not chunk:
                    break  # the file shrank; the client sees a short body
                remaining -= len(chunk)
                writer.write(chunk)
                await writer.drain()
        await writer.drain()

    async def _serve_websocket(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        room_name = room_from_path(request.path)
        response = handshake_response(request)
        protocol = WebSocketProtocol(self.config.max_size)
        client = Client(self.hub.new_client_id(), request, writer, protocol)
        try:
            room = await self.hub.join(client, room_name, request)
        except RoomUnavailable as exc:
            writer.write(response)
            client.close(exc.code, exc.reason)
            await self._read_frames(client, reader, None)
            return
        writer.write(response)  # before any await: no broadcast can come first
        try:
            if self.config.joinmsg is not None:
                text = render_template(self.config.joinmsg, client.id, room_name, request)
                await room.send_to_child(line_to_child(text, client.id, self.config))
            await self._read_frames(client, reader, room)
        finally:
            self.hub.leave(client)
            client.cancel_timer()

    async def _read_frames(self, client: Client, reader: asyncio.StreamReader, room: Room | None) -> None:
        """Relay a client's messages to its room's child until the connection closes."""
        protocol = client.protocol
        config = self.config
        while protocol.state is not State.CLOSED:
            data = await reader.read(READ_CHUNK)
            if not data:
                protocol.receive_eof()
                break
            protocol.receive_data(data)
            client.flush()
            for message in protocol.events_received():
                if room is None:
                    continue
                try:
                    payload = to_child(message, client.id, config)
                except FramingError as exc:
                    log.warning("client %d: message dropped: %s", client.id, exc)
                    continue
                await room.send_to_child(payload)
        if protocol.close_code != CloseCode.ABNORMAL:
            log.debug("client %d: = closed %s %s", client.id, protocol.close_code, protocol.close_reason)
        if room is not None:
            self.hub.leave(client)
        # Half-close and let the peer close its side, so that unread bytes in
        # our buffer cannot turn our FIN into a RST that loses the close frame.
        writer = client.writer
        if not writer.is_closing() and writer.can_write_eof():
            writer.write_eof()
            try:
                await asyncio.wait_for(_read_until_eof(reader), CLOSE_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError):
                pass


async def _read_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_CHUNK):
        pass


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


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (ScaleSocket's options)."""
    parser = _ArgumentParser(
        prog="scalesocket.py",
        usage="%(prog)s [OPTIONS] CMD [-- ARGS...]",
        description="Turn a program that reads stdin and writes stdout into a multi-room "
        "WebSocket server: each client of ws://HOST:PORT/ROOM joins ROOM, whose first "
        "client starts CMD.",
    )
    parser.add_argument("cmd", metavar="CMD", help="program to run for each room (never through a shell)")
    parser.add_argument("args", metavar="ARGS", nargs="*", help="arguments for CMD, after --")
    parser.add_argument("--addr", type=_addr, default=("0.0.0.0", 9000), metavar="HOST:PORT",
                        help="listen address; [::]:PORT for IPv6 (default: 0.0.0.0:9000)")
    parser.add_argument("-b", "--binary", action="store_true",
                        help="binary mode: pass raw bytes both ways, one binary message per read")
    parser.add_argument("--json", action="store_true",
                        help="same as --frame=json with Join and Leave messages to the child")
    parser.add_argument("--frame", type=_frame_mode, metavar="[=MODE]",
                        help="framing both ways: json or gwsocket (a bare --frame means json)")
    parser.add_argument("--staticdir", metavar="DIR", help="serve files from DIR over HTTP on the same port")
    parser.add_argument("--maxsize", type=_positive_int, default=DEFAULT_MAX_MESSAGE, metavar="BYTES",
                        help=f"largest message from a client, in bytes (default: {DEFAULT_MAX_MESSAGE})")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv: traffic)")
    parser.add_argument("-V", "--version", action="version", version=f"scalesocket.py {__version__}")
    return parser


# Options whose value is taken only with '=', as in the original: a bare
# `--frame` means json and the next word is the command.
_EQUALS_ONLY = {"--frame": "json"}


def parse_args(argv: list[str]) -> Config:
    """Turn a command line into a Config; exits with status 2 on a bad one."""
    if "--" in argv:
        split = argv.index("--")
        argv, child_args = argv[:split], argv[split + 1 :]
    else:
        child_args = []
    argv = [f"{arg}={_EQUALS_ONLY[arg]}" if arg in _EQUALS_ONLY else arg for arg in argv]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.json and ns.frame:
        parser.error("argument --frame: not allowed with argument --json")
    frame = "json" if ns.json else ns.frame
    if ns.staticdir is not None and not os.path.isdir(ns.staticdir):
        parser.error(f"argument --staticdir: {ns.staticdir!r} is not a directory")
    host, port = ns.addr
    return Config(
        cmd=ns.cmd,
        args=ns.args + child_args,
        host=host,
        port=port,
        binary=ns.binary,
        clientframe=frame,
        serverframe=frame,
        joinmsg='{"t":"Join","_from":#ID}' if ns.json else None,
        leavemsg='{"t":"Leave","_from":#ID}' if ns.json else None,
        staticdir=ns.staticdir,
        max_size=ns.maxsize,
        verbose=ns.verbose,
    )


async def serve(config: Config) -> None:
    """Run a server until SIGINT or SIGTERM, then close it cleanly."""
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if config.verbose else logging.INFO)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"scalesocket.py: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
