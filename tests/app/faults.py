"""Damage done to checkpoint files by the tests: a flipped byte, an unsafe pickle."""

import os
import struct
import zipfile
from pathlib import Path

import torch


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (a stored zip entry)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    head = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[head + 26 : head + 30])  # local file header
    raw[head + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def write_unsafe_checkpoint(path: Path) -> None:
    """A file that claims the svdgrow format but pickles a call to os.system."""
    torch.save({"format": "svdgrow-checkpoint-v1", "x": _Payload()}, path)
