"""Training-time JPEG decoding with OpenCV (the ``opencv`` extra), when it is installed.

JPEGs are decoded by libjpeg-turbo with DCT scaling at the scale PIL's ``draft`` would pick:
through ``simplejpeg`` when it is installed (the extra installs it: straight to RGB, 8% less CPU
than OpenCV's own decoder on the benchmark's photos), else OpenCV's ``imdecode``
(``IMREAD_REDUCED_COLOR_2/4/8``). OpenCV's vectorised ``resize`` makes the crop. On the
benchmark's 640x480 photos this costs about a third less CPU than PIL's ``draft`` decode plus its
bicubic resize (docs/benchmarks.md). Only training uses it: evaluation keeps PIL, whose resize is
the one ``CLIPImageProcessor`` uses, so exported models see at test time exactly what they saw here.

Anything this path is unsure of goes back to PIL, which also decides what is corrupt: payloads that
are not baseline/progressive JPEGs in 8-bit RGB or greyscale, data that does not end with the
end-of-image marker (a truncated file, which libjpeg would fill with grey instead of failing), and
whatever the decoder refuses or warns about. EXIF orientation is ignored, as the PIL path and the HF
image processor ignore it.
"""

from __future__ import annotations

import numpy as np

_UNSET = object()
cv2 = _UNSET  # imported on first use (a tenth of a second that `import superclip_pl` need not pay)
simplejpeg = _UNSET

# start-of-frame markers that carry the image size (not DHT 0xC4, JPG 0xC8, DAC 0xCC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_REDUCED = {
    1: "IMREAD_COLOR",
    2: "IMREAD_REDUCED_COLOR_2",
    4: "IMREAD_REDUCED_COLOR_4",
    8: "IMREAD_REDUCED_COLOR_8",
}
_threads_set = False


def available() -> bool:
    """Whether OpenCV is installed (``pip install 'superclip-pl[opencv]'``); imports it, and
    ``simplejpeg`` where that is installed too."""
    global cv2, simplejpeg
    if cv2 is _UNSET:
        try:
            import cv2 as module
        except ImportError:  # the extra is not installed: PIL decodes everything
            module = None
        cv2 = module
    if simplejpeg is _UNSET:
        try:
            import simplejpeg as module
        except ImportError:  # OpenCV decodes
            module = None
        simplejpeg = module
    return cv2 is not None


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, bits per sample) from a JPEG's start-of-frame segment, or None
    when ``data`` is not a JPEG whose header can be read."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 10 > n:
                return None
            bits, height, width, components = (
                data[i + 4],
                *(int.from_bytes(data[j : j + 2], "big") for j in (i + 5, i + 7)),
                data[i + 9],
            )
            return width, height, components, bits
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we read
            return None
        i += 2 + length
    return None


def reduction(width: int, height: int, min_side: int) -> int:
    """The largest DCT scaling (1, 2, 4 or 8) that keeps both sides at least ``min_side`` pixels, as
    PIL's ``draft`` picks it (libjpeg rounds the reduced sides up)."""
    for scale in (8, 4, 2):
        if -(-width // scale) >= min_side and -(-height // scale) >= min_side:
            return scale
    return 1


def _one_thread() -> None:
    """OpenCV on one thread per DataLoader worker: the workers are the parallelism."""
    global _threads_set
    if not _threads_set:
        cv2.setNumThreads(1)
        _threads_set = True


def decode_reduced(data: bytes, min_side: int, max_pixels: int) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB at the reduced scale (``reduction``), or None to let PIL decode ``data``
    (no OpenCV, not a JPEG this path takes, too large, truncated, or refused by the decoder)."""
    if not available():
        return None
    header = jpeg_header(data)
    if header is None:
        return None
    width, height, components, bits = header
    if components not in (1, 3) or bits != 8 or width * height > max_pixels or width == 0 or height == 0:
        return None  # CMYK / 12-bit / too large / size in a later DNL segment: PIL decides
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    scale = reduction(width, height, min_side)
    if simplejpeg is not None:
        try:
            # libjpeg-turbo also scales by 3/8, 5/8...: asking for exactly the 1/scale size picks 1/scale
            # strict (the default): corrupt data raises instead of decoding to grey
            return simplejpeg.decode_jpeg(
                data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale)
            )
        except ValueError:
            return None
    _one_thread()
    flag = getattr(cv2, _REDUCED[scale]) | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def crop_resize(rgb: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The ``box`` (left, top, right, bottom) of a ``decode_reduced`` array resized to ``size`` x
    ``size``: (size, size, 3) uint8. Bicubic, as open_clip's crop; area averaging when a side
    shrinks more than twice (bicubic would alias there; after DCT scaling that is rare, and OpenCV's
    area filter costs 4x its bicubic at the fractional ratios of random crops). The crop is a view;
    only the resize writes pixels."""
    _one_thread()
    left, top, right, bottom = box
    crop = rgb[top:bottom, left:right]
    far = max(crop.shape[0], crop.shape[1]) > 2 * size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if far else cv2.INTER_CUBIC)
