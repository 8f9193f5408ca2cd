"""The fast path of training images: JPEG decoding with OpenCV (`data/jpeg.py`) against PIL and its
fallbacks to PIL, and the batch stacked as the images lie in memory (`decode.stack_images`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from superclip_pl.data import jpeg
from superclip_pl.data.checks import check_numbers
from superclip_pl.data.columns import Columns
from superclip_pl.data.decode import SampleDecoder, stack_images
from superclip_pl.errors import UserError
from superclip_pl.transforms import normalize, train_transform

needs_opencv = pytest.mark.skipif(not jpeg.available(), reason="the opencv extra is not installed")


def photo(size=(640, 480), mode="RGB", seed=0) -> Image.Image:
    """Smooth colour gradients with a little noise: what photos look like to a JPEG coder."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    waves = [np.sin(xx / (25 + 9 * c) + yy / (33 - 6 * c) + c) for c in range(3)]
    pixels = (np.stack(waves, -1) * 90 + 128 + rng.normal(0, 4, (*xx.shape, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def oriented(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def encoded(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    "image, options",
    [
        (photo(), {}),
        (photo((333, 251)), {"progressive": True}),
        (photo(mode="L"), {}),
        (photo((300, 200), mode="CMYK"), {}),
        (photo(), {"exif": oriented()}),  # an APP1 segment before the frame
    ],
)
def test_the_header_gives_what_pil_reads(image, options):
    data = encoded(image, **options)
    width, height, components, bits = jpeg.jpeg_header(data)
    read = Image.open(io.BytesIO(data))
    assert (width, height) == read.size and components == len(read.getbands()) and bits == 8


def test_the_header_of_what_is_not_a_jpeg_is_none():
    png = io.BytesIO()
    photo((40, 30)).save(png, format="PNG")
    assert jpeg.jpeg_header(png.getvalue()) is None
    assert jpeg.jpeg_header(b"") is None and jpeg.jpeg_header(b"\xff\xd8\xff") is None
    assert jpeg.jpeg_header(encoded(photo())[:20]) is None  # cut before the frame header


@pytest.mark.parametrize("size", [(640, 480), (1600, 1200), (300, 230), (2000, 230), (224, 224), (100, 80)])
def test_the_reduction_is_the_one_pil_draft_picks(size):
    image = Image.open(io.BytesIO(encoded(photo(size))))
    image.draft("RGB", (224, 224))
    scale = jpeg.reduction(*size, 224)
    assert image.size == (-(-size[0] // scale), -(-size[1] // scale))


@pytest.fixture(params=["simplejpeg", "opencv"])
def jpeg_library(request, monkeypatch):
    """Each of the fast path's decoders: simplejpeg where installed, and OpenCV's own without it."""
    jpeg.available()
    if request.param == "simplejpeg" and jpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    if request.param == "opencv":
        monkeypatch.setattr(jpeg, "simplejpeg", None)
    return request.param


@needs_opencv
@pytest.mark.parametrize(
    "size, mode",
    [
        ((640, 480), "RGB"),
        ((1600, 1200), "RGB"),
        ((500, 400), "L"),
        ((333, 251), "RGB"),
        ((2000, 230), "RGB"),
    ],
)
def test_the_fast_path_decodes_what_pil_draft_decodes(jpeg_library, size, mode):
    data = encoded(photo(size, mode))
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (224, 224))
    want = np.asarray(image.convert("RGB"), dtype=np.float64)
    rgb = jpeg.decode_reduced(data, 224, 2**25)
    assert rgb.shape == want.shape and rgb.dtype == np.uint8  # the scale PIL picks, never 3/8 or 5/8
    # the same libjpeg-turbo algorithm (PIL's build and the decoder's own): equal up to rounding
    assert np.abs(rgb - want).mean() < 1.0


@needs_opencv
def test_what_the_fast_path_is_unsure_of_goes_to_pil(jpeg_library, monkeypatch):
    data = encoded(photo())
    assert jpeg.decode_reduced(data[: len(data) // 2], 224, 2**25) is None  # truncated: no end marker
    assert jpeg.decode_reduced(encoded(photo((300, 200), "CMYK")), 224, 2**25) is None
    assert jpeg.decode_reduced(data, 224, 640 * 480 - 1) is None  # too large: PIL says so
    png = io.BytesIO()
    photo((40, 30)).save(png, format="PNG")
    assert jpeg.decode_reduced(png.getvalue(), 224, 2**25) is None
    monkeypatch.setattr(jpeg, "cv2", None)
    assert not jpeg.available() and jpeg.decode_reduced(data, 224, 2**25) is None


@needs_opencv
def test_crop_resize_is_close_to_pils_bicubic():
    image = photo()
    rgb = np.asarray(image)
    box = (40, 20, 600, 460)
    ours = jpeg.crop_resize(rgb, box, 224).astype(np.float64)
    pil = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC, box=box), dtype=np.float64)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - pil).mean() < 2.0  # area averaging (shrunk 2.5x) vs bicubic: a level or two
    near = jpeg.crop_resize(rgb, (100, 100, 400, 380), 224).astype(np.float64)  # 1.3x: bicubic
    pil = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC, box=(100, 100, 400, 380)))
    assert np.abs(near - pil).mean() < 2.0
    red = np.zeros((100, 100, 3), np.uint8)
    red[..., 0] = 200
    assert (jpeg.crop_resize(red, (0, 0, 100, 100), 32)[..., 0] == 200).all()  # channels kept, grown bicubic


def decoder(opencv: bool, size: int = 224) -> SampleDecoder:
    columns = Columns(images=("jpg",), texts=(("txt", 1.0),), keys=())
    transform = train_transform(size, normalized=False)
    return SampleDecoder(columns, transform, 2**25, random_caption=False, draft=size, opencv=opencv)


@needs_opencv
@pytest.mark.parametrize(
    "size, options",
    [((640, 480), {}), ((1600, 1200), {}), ((180, 150), {}), ((640, 480), {"exif": oriented()})],
)  # orientation ignored
def test_the_training_crop_is_the_same_crop_either_way(size, options):
    example = {"jpg": encoded(photo(size), **options), "txt": "a photo", "__key__": "k"}
    torch.manual_seed(3)
    ours = decoder(opencv=True)(example)["pixel_values"]
    torch.manual_seed(3)
    pil = decoder(opencv=False)(example)["pixel_values"]
    assert ours.dtype == torch.uint8 and ours.shape == pil.shape == (3, 224, 224)
    assert (ours.double() - pil.double()).abs().mean() < 2.5  # same box, two resize filters


@pytest.mark.parametrize("opencv", [True, False])
def test_bad_jpegs_are_skipped_the_same_either_way(opencv):
    data = encoded(photo())
    for bad in (data[: len(data) // 3], b"\xff\xd8\xff\xe0 not a jpeg \xff\xd9"):
        assert decoder(opencv)({"jpg": bad, "txt": "a photo"}) == "corrupt_image"
    transform = train_transform(224, normalized=False)
    big = SampleDecoder(decoder(opencv).columns, transform, 1000, False, draft=224, opencv=opencv)
    assert big({"jpg": data, "txt": "a photo"}) == "too_large"


def test_the_decoder_choice_is_checked(monkeypatch):
    check_numbers({"jpeg_decoder": "pil"})
    with pytest.raises(UserError, match=r"data.jpeg_decoder='turbo': choose one of auto, pil, opencv"):
        check_numbers({"jpeg_decoder": "turbo"})
    monkeypatch.setattr(jpeg, "cv2", None)
    with pytest.raises(UserError, match=r"OpenCV is not installed; pip install 'superclip-pl\[opencv\]'"):
        check_numbers({"jpeg_decoder": "opencv"})
    check_numbers({"jpeg_decoder": "auto"})  # falls back to PIL without a word


def test_the_batch_is_stacked_as_the_images_lie_in_memory():
    rng = np.random.default_rng(0)
    views = [
        torch.from_numpy(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(5)
    ]
    batch = stack_images(views)
    assert batch.shape == (5, 3, 20, 24) and torch.equal(batch, torch.stack(views))
    assert not batch.is_contiguous()  # the channels-first view of a (B, H, W, 3) copy
    pixels = normalize(batch)
    assert pixels.is_contiguous() and torch.equal(pixels, normalize(torch.stack(views).contiguous()))
    plain = [v.contiguous() for v in views]  # images that are not such views: stacked as they are
    assert torch.equal(stack_images(plain), torch.stack(plain)) and stack_images(plain).is_contiguous()


def test_a_batch_from_a_worker_arrives_intact():
    rng = np.random.default_rng(1)
    views = [
        torch.from_numpy(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(4)
    ]
    loader = torch.utils.data.DataLoader(views, batch_size=4, num_workers=1, collate_fn=stack_images)
    (batch,) = list(loader)  # through shared memory, strides and all
    assert torch.equal(batch, torch.stack(views))


@pytest.mark.parametrize("choice", ["auto", "pil"] + (["opencv"] if jpeg.available() else []))
def test_the_data_module_trains_with_the_chosen_decoder(tmp_path, tokenizer_dir, choice):
    from shards import wds, write_mixed_shards
    from superclip_pl.data import ImageTextDataModule

    write_mixed_shards(tmp_path)  # .jpg/.jpeg among .png/.webp, bad samples, a truncated shard
    dm = ImageTextDataModule(
        tokenizer_dir, train=wds(str(tmp_path / "*.tar")), image_size=16, num_workers=0, jpeg_decoder=choice
    )
    dm.setup("fit")
    assert dm.streams["train"].decoder.opencv == (choice != "pil" and jpeg.available())
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[1:] == (3, 16, 16) and batch["pixel_values"].dtype == torch.uint8
