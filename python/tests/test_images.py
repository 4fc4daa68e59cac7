"""Images decoded and augmented on the loader (`--pipeline` with decode_image): every served
sample compared with what Pillow gives for the same file, bad files failing their batch by name
or substituted, and images that declare too many pixels refused before they are decoded."""

import io
import os

import numpy as np
import pytest

import conveyor

# JPEG decoders may differ by a few levels per pixel (IDCT and chroma upsampling are not fixed
# by the standard): the loader's decode is compared with Pillow's (libjpeg-turbo) within these.
JPEG_MEAN_ABS = 1.0
JPEG_MAX_ABS = 40


def pil_rgb(path):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def center_crop(array, height, width):
    """torchvision's center_crop on an [H, W, C] array: zero padding, then round((size - crop) / 2)."""
    h, w = array.shape[:2]
    pad_top, pad_left = max(0, (height - h) // 2), max(0, (width - w) // 2)
    pad_bottom, pad_right = max(0, (height - h + 1) // 2), max(0, (width - w + 1) // 2)
    array = np.pad(array, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
    h, w = array.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return array[top:top + height, left:left + width]


def write_folder(root, n_per_class=4, formats=("png", "jpg", "webp")):
    """An ImageFolder of photos-like images (smooth gradients with noise) of varied sizes, in
    several modes (RGB, L, RGBA, P). Returns the sample paths in torchvision's order."""
    from PIL import Image

    rng = np.random.default_rng(11)
    paths = []
    for cls in ("ant", "bee"):
        os.makedirs(root / cls)
        for i in range(n_per_class):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
            pixels = np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            fmt = formats[i % len(formats)]
            mode = ("RGB", "L", "RGBA", "P")[i % 4]
            if fmt == "jpg" and mode in ("RGBA", "P"):
                mode = "RGB"
            image = image.convert(mode)
            path = root / cls / f"{i:03d}.{fmt}"
            image.save(path, **({"lossless": True} if fmt == "webp" else {}))
            paths.append(path)
    return sorted(paths)


def served(loader, dataset, batch_size=5, epoch=0):
    """{index: {field: value}} over one epoch."""
    out = {}
    ds = conveyor.StreamingDataset([loader.addr], dataset, batch_size=batch_size, shuffle="full", seed=3)
    ds.set_epoch(epoch)
    for batch in ds:
        for row, index in enumerate(batch["__index__"]):
            assert int(index) not in out, "each sample once per epoch"
            out[int(index)] = {k: v[row] for k, v in batch.items() if k != "__index__"}
    return out


def test_decoded_images_equal_pillows_decode(tmp_path, start_loader):
    paths = write_folder(tmp_path / "images")
    pipeline = "crops=images:image: decode_image | center_crop(40, 48)"
    gray = "gray=images:image: decode_image(mode=gray) | center_crop(40, 48)"
    resized = "small=images:image: decode_image | resize([24, 20])"
    loader = start_loader({"images": tmp_path / "images"}, "--pipeline", pipeline, "--pipeline", gray,
                          "--pipeline", resized)
    info = conveyor.datasets([loader.addr])
    assert info["crops"].fields["image"] == (np.dtype(np.uint8), (40, 48, 3))
    assert info["gray"].fields["image"] == (np.dtype(np.uint8), (40, 48, 1))

    from PIL import Image

    crops, grays, smalls = served(loader, "crops"), served(loader, "gray"), served(loader, "small")
    assert sorted(crops) == list(range(len(paths)))
    for index, path in enumerate(paths):
        rgb = pil_rgb(path)
        expected = center_crop(np.asarray(rgb), 40, 48)
        got = crops[index]["image"]
        assert got.shape == expected.shape
        lum = center_crop(np.asarray(rgb.convert("L"))[..., None], 40, 48)
        if path.suffix == ".jpg":
            diff = np.abs(got.astype(int) - expected)
            assert diff.mean() <= JPEG_MEAN_ABS and diff.max() <= JPEG_MAX_ABS, (path, diff.mean(), diff.max())
        else:
            np.testing.assert_array_equal(got, expected, err_msg=str(path))
            # Grayscale as Pillow's convert("L"), from the RGB image (ITU-R 601-2 weights).
            source_mode = Image.open(path).mode
            if source_mode != "L":
                np.testing.assert_array_equal(grays[index]["image"], lum, err_msg=str(path))
            # Bilinear, antialiased resize as Pillow's (what torchvision does to PIL images), within 1.
            reference = np.asarray(rgb.resize((20, 24), Image.BILINEAR)).astype(int)
            assert np.abs(smalls[index]["image"].astype(int) - reference).max() <= 1, path
        assert crops[index]["label"] == (0 if "ant" in str(path) else 1)


def test_exif_orientation_is_applied(tmp_path, start_loader):
    from PIL import Image

    os.makedirs(tmp_path / "photos" / "x")
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (250, 10, 10)  # left half red, right half blue
    pixels[:, 20:] = (10, 10, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "photos" / "x" / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    # Displayed upright, the 40x20 photo is 20 wide and 40 tall: a crop of exactly that size.
    loader = start_loader({"photos": tmp_path / "photos"}, "--pipeline",
                          "upright=photos:image: decode_image | center_crop(40, 20)")
    got = served(loader, "upright")[0]["image"]
    expected = np.asarray(pil_rgb(path))
    assert expected.shape == (40, 20, 3)
    assert np.abs(got.astype(int) - expected).mean() <= JPEG_MEAN_ABS
    assert got[2, 10, 0] > 200 and got[-3, 10, 2] > 200, "red on top, blue below: rotated as displayed"


def test_random_resized_crop_is_torchvisions_and_the_same_from_two_replicas(tmp_path, start_loader):
    from PIL import Image

    paths = write_folder(tmp_path / "images", formats=("png",))
    augment = ("aug=images:image: decode_image | random_resized_crop(16) | flip(axis=1) | to_chw "
               "| cast(float32, scale=1/255) | normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])")
    a = start_loader({"images": tmp_path / "images"}, "--pipeline", augment)
    b = start_loader({"images": tmp_path / "images"}, "--pipeline", augment)
    assert conveyor.datasets([a.addr])["aug"].fields["image"] == (np.dtype(np.float32), (3, 16, 16))
    first, second = served(a, "aug"), served(b, "aug")
    for index in first:
        np.testing.assert_array_equal(first[index]["image"], second[index]["image"])
    # Another epoch draws other crops.
    other = served(a, "aug", epoch=1)
    assert any(not np.array_equal(other[i]["image"], first[i]["image"]) for i in first)
    # Both replicas, one killed mid-epoch: every sample exactly once, as one replica alone gives it.
    both = conveyor.StreamingDataset([a.addr, b.addr], "aug", batch_size=2, shuffle="full", seed=3, prefetch=2)
    both.set_epoch(1)
    seen = {}
    for number, batch in enumerate(both):
        if number == 2:
            a.kill()
        for row, index in enumerate(batch["__index__"]):
            assert int(index) not in seen
            seen[int(index)] = batch["image"][row]
    assert sorted(seen) == sorted(other)
    assert all(np.array_equal(seen[i], other[i]["image"]) for i in seen)

    # With scale [1, 1] and each image's own aspect ratio the crop is the whole image, so the
    # result is Pillow's bilinear resize of it (within rounding).
    path = paths[0]
    w, h = Image.open(path).size
    whole = f"whole=images:image: decode_image | random_resized_crop(12, 10, scale=[1, 1], ratio=[{w}/{h}, {w}/{h}])"
    c = start_loader({"images": tmp_path / "images"}, "--pipeline", whole)
    got = served(c, "whole")[0]["image"]
    reference = np.asarray(pil_rgb(path).resize((10, 12), Image.BILINEAR)).astype(int)
    assert np.abs(got.astype(int) - reference).max() <= 1


def test_bad_images_fail_their_batch_by_name_or_are_substituted(tmp_path, start_loader):
    paths = write_folder(tmp_path / "images", formats=("png",))
    broken = tmp_path / "images" / "ant" / "001.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # cut short
    bad_index = paths.index(broken)
    pipeline = "crops=images:image: decode_image | center_crop(32)"
    loader = start_loader({"images": tmp_path / "images"}, "--pipeline", pipeline)
    with pytest.raises(conveyor.BatchError) as raised:
        served(loader, "crops", batch_size=len(paths))
    message = str(raised.value)
    assert f"sample {bad_index}" in message and "001.png" in message and "--on-bad-sample" in message, message
    # The loader serves on.
    assert loader.proc.poll() is None
    assert sorted(served(loader, "images")) == list(range(len(paths)))
    good = [i for i in range(len(paths)) if i != bad_index]

    substituting = start_loader({"images": tmp_path / "images"}, "--pipeline", pipeline,
                                "--on-bad-sample", "substitute")
    samples = served(substituting, "crops", batch_size=3)
    assert sorted(samples) == list(range(len(paths))), "a full epoch, every index answered"
    others = [samples[i]["image"] for i in good]
    assert any(np.array_equal(samples[bad_index]["image"], o) for o in others), "another sample in its place"


def test_a_jpeg_cut_short_is_refused_not_filled_in(tmp_path, start_loader):
    from PIL import Image

    os.makedirs(tmp_path / "photos" / "x")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "photos" / "x" / "a.jpg")
    data = (tmp_path / "photos" / "x" / "a.jpg").read_bytes()
    (tmp_path / "photos" / "x" / "b.jpg").write_bytes(data[: len(data) * 2 // 3])
    loader = start_loader({"photos": tmp_path / "photos"}, "--pipeline",
                          "decoded=photos:image: decode_image | center_crop(60, 80)")
    with pytest.raises(conveyor.BatchError, match="cut short") as raised:
        served(loader, "decoded", batch_size=2)
    assert "b.jpg" in str(raised.value)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, start_loader):
    import struct
    import zlib

    os.makedirs(tmp_path / "bombs" / "x")
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    # 10.8 GB of pixels declared; a few hundred bytes of zeros compressed.
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4000)) + chunk(b"IEND", b"")
    (tmp_path / "bombs" / "x" / "bomb.png").write_bytes(png)
    loader = start_loader({"bombs": tmp_path / "bombs"}, "--pipeline",
                          "decoded=bombs:image: decode_image | center_crop(8)")
    with pytest.raises(conveyor.BatchError, match=r"60000x60000 pixels .* --max-image-pixels") as raised:
        served(loader, "decoded")
    assert "bomb.png" in str(raised.value)
    assert loader.proc.poll() is None, "the loader serves on"
