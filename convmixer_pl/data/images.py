"""Image files: which files are images (PIL's own registry of formats), reading any of them as 8-bit RGB or grey,
leaving out the unreadable ones (`data.bad_images: skip`), and decoding a whole folder into memory once
(`data.device_pipeline`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from ..console import say
from ..preprocessing import DataError


def _image_extensions() -> frozenset[str]:
    """The extensions of the formats PIL can open (GIF, JFIF, TIFF, WebP, ...), less stubs (needing a user handler)."""
    Image.init()
    opened = {fmt for fmt, (factory, _) in Image.OPEN.items()
              if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in opened)


IMAGE_EXTENSIONS = _image_extensions()


def is_image_name(path: str | os.PathLike) -> bool:
    """Named like an image, and not hidden (macOS `._name.jpg`, `.DS_Store`)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_files(folder: str | os.PathLike, within: str | os.PathLike | None = None,
               avoid: Iterable[str | os.PathLike] = ()) -> list[str]:
    """The regular files under `folder` (sub-folders included, sorted as torchvision's ImageFolder lists them).

    Symlinked folders are followed where they lead out of `within` (data kept elsewhere), but a folder is never
    entered twice, nor one of `avoid` (the other classes' folders), and a link back into `within` is not followed,
    so a symlink loop neither hangs nor relabels another class's images; sockets, pipes and devices are passed over
    (reading a pipe would block)."""
    inside = os.path.realpath(within if within is not None else folder) + os.sep
    seen = {os.path.realpath(path) for path in avoid} - {os.path.realpath(folder)}
    folders: list[tuple[str, list[str]]] = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(top))
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(top, name))
            linked_back = os.path.islink(os.path.join(top, name)) and (real + os.sep).startswith(inside)
            if real not in seen and not linked_back:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        folders.append((top, names))
    return [path for top, names in sorted(folders) for path in (os.path.join(top, name) for name in sorted(names))
            if os.path.isfile(path)]  # through a link to its target; a dangling link is not


def find_images(root: Path) -> list[Path]:
    """Image files anywhere under `root`, sorted."""
    return [Path(path) for path in walk_files(root) if is_image_name(path)]


def read_image(path: str, mode: str = "RGB") -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation) and as 8-bit `mode` ("RGB" or "L"); a file it cannot read
    raises a DataError naming it.

    Grey, grey+alpha, palette, RGBA and CMYK convert with PIL (alpha is dropped, as torchvision does); 16- and
    32-bit grey ("I;16", "I") scale to 8 bits instead of saturating at 255. An animated GIF or WebP gives its first
    frame.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decoded while the file is open: the image outlives the `with`
            ImageOps.exif_transpose(image, in_place=True)  # camera JPEGs: upright as displayed; no copy
            if image.mode.startswith("I"):
                values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
                return Image.fromarray(values.astype(np.uint8)).convert(mode)
            if image.mode == "F":
                return Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8)).convert(mode)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
            return image if image.mode == mode else image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}); replace or delete it (in an image folder, "
                        "data.bad_images: skip leaves unreadable files out)") from err


def _threads() -> int:
    return min(32, os.cpu_count() or 1)  # PIL decodes and torch resizes without holding the GIL


def readable(paths: Iterable[str]) -> list[str | None]:
    """For each file, None if it decodes, else the reason it does not (every file decoded once, in threads)."""
    def problem(path: str) -> str | None:
        try:
            read_image(path)
            return None
        except DataError as err:
            return str(err).split(";")[0]

    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        return list(pool.map(problem, paths))


def decode_all(paths: list[str], mode: str, transform, where: str) -> torch.Tensor:
    """Every image read once (in threads) and `transform`ed to one shape: a uint8 (N, C, H, W) tensor in the order
    of `paths`, said in one line. An unreadable file raises its DataError, naming it."""
    first_image = read_image(paths[0], mode)
    first = transform(pil_to_tensor(first_image))
    images = torch.empty((len(paths), *first.shape), dtype=torch.uint8)
    images[0] = first
    say(f"decoding the {len(paths)} images of {where} into memory at {first.shape[-1]} px "
        f"({images.numel() / 2**20:.0f} MiB)")

    def put(index: int) -> None:
        images[index] = transform(pil_to_tensor(read_image(paths[index], mode)))

    # small images (below 96 x 96): PIL's header parsing in Python, which holds the GIL, outweighs the decoding, so
    # threads only contend (5,000 CIFAR JPEGs: 2.1 s on one thread, 3.1 s on two); larger ones decode outside it
    threads = 1 if first_image.width * first_image.height < 96 * 96 else _threads()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(put, range(1, len(paths))))  # list(): re-raises the first error
    return images
