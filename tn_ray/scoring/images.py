"""Input images checked before any model loads: every file must exist and decode.

A text file named ``.jpg`` or a truncated JPEG would otherwise fail inside a reward actor,
after the model loaded, as a long Ray traceback that may not name the file.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tn_ray.errors import InputError


def image_problem(path: str) -> str | None:
    """Why the image at ``path`` (local path or URI) cannot be scored, or None if it decodes."""
    from PIL import Image

    from tn_ray.storage import read_any

    try:
        with Image.open(io.BytesIO(read_any(path))) as im:
            im.load()  # decodes every pixel: a truncated file fails here (verify() alone misses some)
        return None
    except FileNotFoundError:
        return "missing"
    except Image.UnidentifiedImageError:
        return "not an image file (no known image format)"
    except Exception as err:  # any decoder error means the file cannot be scored
        return f"{type(err).__name__}: {str(err)[:80]}" if str(err) else type(err).__name__


def check_images(paths: Sequence[str], where: str, threads: int = 8) -> None:
    """:class:`InputError` naming each bad image (up to five) and how many of ``paths`` are bad."""
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(image_problem, paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why]
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        raise InputError(f"{len(bad)} of {len(paths)} images in {where} cannot be read: {shown}"
                         + (" ..." if len(bad) > 5 else ""))
