"""The raw format's reader: a tar member pair KEY.u8.npy (N x 3 x H x W uint8 pixels) and
KEY.keys.npy (their N keys, a unicode array), as pack.py writes it, read as one RawGroup without
an image decoder or a copy. Both arrays are .npy files whose headers numpy's own parser reads
(no pickle); a shard's groups share a few headers, so each is parsed once."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator

import numpy as np
import torch

from dcgan_dist.data.decode import PIXELS
from dcgan_dist.data.manifest import RAW_KEYS, RAW_PIXELS


class RawGroup:
    """The images of one raw tar member: `pixels`, N x 3 x H x W uint8 (a view of the member's
    bytes, no copy), and their N sample keys."""

    def __init__(self, url: str, keys: list[str], pixels: torch.Tensor):
        self.url, self.keys, self.pixels = url, keys, pixels

    def __len__(self) -> int:
        return len(self.keys)

    def part(self, start: int, stop: int) -> RawGroup:
        return RawGroup(self.url, self.keys[start:stop], self.pixels[start:stop])

    def images(self) -> Iterator[dict]:
        """One sample ({"__key__", "__url__", "pixels"}) per image."""
        for key, image in zip(self.keys, self.pixels):
            yield {"__key__": key, "__url__": self.url, PIXELS: image}


def read_group(member: dict) -> RawGroup:
    """A raw member's images. One that does not parse ends its shard's read, as a truncated tar
    does (its images cannot be counted, so none after it could be placed)."""
    data = member[RAW_PIXELS]
    shape, fortran_order, dtype, offset = npy_header(data)
    key_shape, key_fortran, key_dtype, key_offset = npy_header(member[RAW_KEYS]) if RAW_KEYS in member else ((), False, None, 0)
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1] != 3 or key_shape != shape[:1] or key_fortran \
            or key_dtype.kind != "U" or len(data) != offset + math.prod(shape):
        raise ValueError(f"raw group {member['__key__']}: {dtype} pixels {shape} ({len(data)} bytes) and {key_dtype} keys "
                         f"{key_shape} are not N x 3 x H x W uint8 with N keys")
    keys = np.frombuffer(member[RAW_KEYS], key_dtype, count=shape[0], offset=key_offset).tolist()
    if isinstance(data, bytes):
        data = bytearray(data)  # torch wraps only writable buffers
    return RawGroup(member["__url__"], keys, torch.frombuffer(data, dtype=torch.uint8, offset=offset).view(shape))  # no copy


def npy_header(data: bytes | bytearray) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, where the array starts) of a .npy file's bytes. A raw shard's
    groups share a few headers: each is parsed once (numpy's parser evaluates it as a literal)."""
    length_size = 2 if data[6:7] == b"\x01" else 4  # version 1: a 2-byte header length, later ones 4
    header_end = 8 + length_size + int.from_bytes(data[8:8 + length_size], "little")
    return parse_npy_header(bytes(data[:header_end]))


@functools.lru_cache(maxsize=64)
def parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(header)  # numpy's own parser: no pickle
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()
