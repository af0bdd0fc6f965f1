"""Image files with lying headers, for the tests of readers that must not trust them."""

from __future__ import annotations

import struct

START_OF_FRAME = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG ``data`` with its frame header (SOF) claiming ``width`` x ``height``; the scan is unchanged.

    PIL reads the claimed size from the header (`Image.open`); decoding fills what the scan
    lacks with grey, and a claim over PIL's limit raises `PIL.Image.DecompressionBombError`.
    """
    i = 2  # after SOI
    while data[i + 1] not in START_OF_FRAME:  # each segment: FF, marker, 2-byte length
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]
