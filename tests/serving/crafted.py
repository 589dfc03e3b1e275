"""Hand-made image files whose headers say anything: tiny on disk, any size they claim.

What an attacker sends to make a decoder allocate: a header that announces a
huge (or zero, or absurdly thin) image, followed by a few bytes of data.
"""

from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, data: bytes = b"\x00" * 16) -> bytes:
    """An RGB PNG claiming ``width x height`` (each up to 2**31 - 1), with ``data`` as pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(data))
        + _png_chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame claim ``width x height`` (each up to 65535)."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6  # 2-color table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP claiming ``width x height`` (signed 32-bit; negative is top-down)."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 0, 0, 0, 0)
    head = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return head + info + pixels


def jpeg(width: int, height: int) -> bytes:
    """A baseline JPEG start-of-frame claiming ``width x height`` (each up to 65535), no data."""
    sof = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xd9"


def tiff(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first directory claims ``width x height`` (unsigned 32-bit)."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength, LONG
        (258, 3, 1, 8),  # BitsPerSample
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 1, 8),  # StripOffsets: the header
        (279, 4, 1, 8),  # StripByteCounts
    ]
    directory = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        directory += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + directory + b"\x00\x00\x00\x00"


MAKERS = {"png": png, "gif": gif, "bmp": bmp, "jpeg": jpeg, "tiff": tiff}
LARGEST = {"png": 2**31 - 1, "gif": 65535, "bmp": 2**31 - 1, "jpeg": 65535, "tiff": 2**32 - 1}
"""The largest dimension each format's header can claim."""
