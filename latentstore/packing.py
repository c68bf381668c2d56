"""A compact byte packing for tokens: length-prefixed text, hex digests as bytes, size boxes
as two 16-bit numbers, picture formats as one byte; and its reader, which refuses an overrun
or a bad byte with ``BadSignature`` (what a token that packs wrong is).

Picture-set tokens (:mod:`latentstore.signing`) are packed with it: a row's links repeat its
token a dozen times, so every byte counts.
"""

from __future__ import annotations

import struct

from django.core import signing

__all__ = ["FORMAT_CODES", "Reader", "pack_box", "pack_hex_or_text", "pack_text"]

FORMAT_CODES = {"AVIF": 1, "WEBP": 2, "JPEG": 3, "PNG": 4}
_FORMATS_BY_CODE = {code: fmt for fmt, code in FORMAT_CODES.items()}
_NO_BOX = (0, 0)


def pack_text(value: str) -> bytes:
    """``value`` as UTF-8 after its length (one byte below 128, else two; up to 32767)."""
    raw = value.encode("utf-8")
    n = len(raw)
    if n < 0x80:
        return bytes((n,)) + raw
    if n < 0x8000:
        return bytes((0x80 | n >> 8, n & 0xFF)) + raw
    raise ValueError(f"{value[:40]!r}... is too long for a picture URL")


def pack_hex_or_text(value: str) -> bytes:
    """A digest or fingerprint: its bytes when it is lower-case hex (half the length), else the
    text, after a kind byte."""
    if len(value) % 2 == 0 and value == value.lower():
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            pass
        else:
            return (
                b"\x01" + bytes((len(raw),)) + raw
                if len(raw) < 0x80
                else b"\x00" + pack_text(value)
            )
    return b"\x00" + pack_text(value)


def pack_box(box: tuple[int, int] | None) -> bytes:
    """A size box (None: the original size) as two 16-bit numbers."""
    width, height = box or _NO_BOX
    if width > 0xFFFF or height > 0xFFFF:  # no format we serve holds a picture that large
        raise ValueError(f"size {box!r} is too large for a picture URL (at most 65535)")
    return struct.pack(">HH", width, height)


class Reader:
    """Reads what the ``pack_*`` functions wrote, in order; any overrun or bad byte raises
    ``BadSignature``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        end = self.at + n
        if end > len(self.data):
            raise signing.BadSignature("Malformed latentstore token")
        chunk, self.at = self.data[self.at : end], end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def text(self) -> str:
        n = self.byte()
        if n & 0x80:
            n = (n & 0x7F) << 8 | self.byte()
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise signing.BadSignature("Malformed latentstore token") from None

    def hex_or_text(self) -> str:
        kind = self.byte()
        if kind == 1:
            return self.take(self.byte()).hex()
        if kind == 0:
            return self.text()
        raise signing.BadSignature("Malformed latentstore token")

    def box(self) -> tuple[int, int] | None:
        width, height = struct.unpack(">HH", self.take(4))
        if (width, height) == _NO_BOX:
            return None
        if not width:  # (width, 0) is a width alone (signing.WIDTH_ONLY)
            raise signing.BadSignature("Malformed latentstore token")
        return width, height

    def format(self) -> str:
        fmt = _FORMATS_BY_CODE.get(self.byte())
        if fmt is None:
            raise signing.BadSignature("Malformed latentstore token")
        return fmt
