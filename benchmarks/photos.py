"""The photo mix every benchmark uploads: real photos of varied sizes, JPEG-encoded in memory."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"

# skimage.data photos that ship with the wheel (no download), at their native sizes.
SKIMAGE_PHOTOS = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "stereo_motorcycle",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
FILE_PHOTOS = ("kitten.jpg", "kitten_small.jpg")


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.width}x{self.height} {len(self.data) // 1024} KiB"


def load_photos(images_dir: Path | None = None, quality: int = 90) -> list[Photo]:
    """kitten.jpg and kitten_small.jpg as they are on disk, then the skimage photos as JPEG."""
    from PIL import Image

    directory = images_dir or SHARED_IMAGES
    photos: list[Photo] = []
    for name in FILE_PHOTOS:
        path = directory / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            photos.append(Photo(name.removesuffix(".jpg"), data, image.width, image.height))
    import skimage.data

    for name in SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        image = Image.fromarray(array).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        photos.append(Photo(name, buffer.getvalue(), image.width, image.height))
    if not photos:
        raise RuntimeError("no photos found for the benchmark mix")
    return photos
