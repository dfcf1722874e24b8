"""Images of any size to the training size: a centre square cut out and resized with PIL's
bicubic filter (antialiased: PIL's resize widens the filter when it shrinks). `shards pack` writes
its shards through preprocess(), and the reader of indexed shards (`shards index`: images at
their original size) decodes each image with PIL and passes it through the same function, so a
packed and an indexed copy of one data set train on the same pixels, up to the packer's JPEG
re-encoding. `--decode gpu` decodes on the device and resizes there with torch's antialiased
bicubic (crop_resize), which follows PIL's filter to within a level or two of 255.
"""

from __future__ import annotations

import io

from PIL import Image


def preprocess(image: Image.Image, image_size: int) -> Image.Image:
    """Centre-crop to a square, resize to image_size (antialiased); grey stays grey."""
    image = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def decode_resized(data: bytes, image_size: int):
    """Encoded image bytes of any size -> 3 x image_size x image_size uint8 tensor, by preprocess()."""
    import numpy as np
    import torch

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(preprocess(image, image_size).convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # H x W x 3 as a 3 x H x W view, as torchvision's decoders give


def crop_resize(image, image_size: int):
    """--decode gpu: a decoded 3 x H x W uint8 image (on any device) centre-cropped and resized as
    preprocess() does, with torch's antialiased bicubic, as uint8 on the same device."""
    import torch

    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side == image_size:
        return square
    resized = torch.nn.functional.interpolate(square[None].float(), size=(image_size, image_size), mode="bicubic",
                                              antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)
