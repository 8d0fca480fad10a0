"""A minimal PNG writer, so that the command-line demo needs no plotting library."""
import struct
import zlib

import numpy as np


def _chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png(path, image):
    """Write a grey-level image to a PNG file.

    Parameters
    ----------
    path : str or path-like
    image : array-like of shape (height, width)
        Values in [0, 1]; clipped, then stored as 8-bit grey levels.
    """
    pixels = (np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if pixels.ndim != 2:
        raise ValueError(f"image must be 2-D; got shape {pixels.shape}")
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def tile_images(images, image_shape, n_cols, pad=1):
    """Arrange flattened images (n, h*w) in a grid; returns a 2-D array."""
    images = np.asarray(images)
    h, w = image_shape
    n = images.shape[0]
    n_rows = -(-n // n_cols)
    grid = np.ones((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad))
    for k in range(n):
        r, c = divmod(k, n_cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = images[k].reshape(h, w)
    return grid
