"""Image reading, colour modes, EXIF, errors, preprocessing and the loader."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat import images as I
from dinofeat.zoo import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


# ------------------------------------------------------------------------ listing
def test_list_images_recursive_sorted_filtered(tmp_path, make_image):
    for rel in ["b.jpg", "a/z.PNG", "a/b/c.webp", "A.jpeg", ".hidden.jpg", ".cache/x.png",
                "notes.txt", "a/readme.md"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in (".txt", ".md"):
            p.write_text("x")
        else:
            make_image(8, 8).save(p, format="WEBP" if p.suffix == ".webp" else
                                  ("PNG" if p.suffix.lower() == ".png" else "JPEG"))
    got = [p.relative_to(tmp_path).as_posix() for p in I.list_images(tmp_path)]
    assert got == ["A.jpeg", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        I.list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        I.list_images(tmp_path / "b.jpg")


# -------------------------------------------------------------------------- modes
def test_modes_become_rgb(tmp_path, make_image):
    base = make_image(12, 10)
    rgb = _arr(base)
    lum = _arr(base.convert("L"))

    # grey modes are replicated to three channels
    for mode in ("L", "1"):
        p = tmp_path / f"{mode}.png"
        base.convert(mode).save(p)
        got = _arr(I.open_image(p))
        ref = _arr(base.convert(mode).convert("L"))
        assert got.shape == (12, 10, 3) and (got == ref[..., None]).all()

    # palette without transparency: the palette colours
    p = tmp_path / "p.png"
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(p)
    assert (_arr(I.open_image(p)) == _arr(pal.convert("RGB"))).all()

    # CMYK JPEG: Pillow's conversion (lossy file, so compare with its own decode)
    p = tmp_path / "cmyk.jpg"
    base.convert("CMYK").save(p, quality=95)
    got = _arr(I.open_image(p))
    assert np.abs(got - _arr(Image.open(p).convert("RGB"))).max() == 0
    assert np.abs(got - rgb).mean() < 12

    # 16-bit greyscale PNG: v / 257
    v16 = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 550).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(v16).save(p)
    assert Image.open(p).mode.startswith("I")
    got = _arr(I.open_image(p))
    assert (got == np.rint(v16 / 257.0).astype(np.int64)[..., None]).all()
    # 32-bit integer and float images
    got = _arr(I.to_rgb(Image.fromarray(v16.astype(np.int32), "I")))
    assert (got[..., 0] == np.rint(v16 / 257.0)).all()
    f = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    got = _arr(I.to_rgb(Image.fromarray(f, "F")))
    assert (got[..., 1] == np.rint(f * 255)).all()
    del lum


def _png16_rgb(a: np.ndarray) -> bytes:
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_keeps_high_byte_on_both_paths(tmp_path):
    a = (np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000 + 7)
    p = tmp_path / "rgb16.png"
    p.write_bytes(_png16_rgb(a))
    expect = (a >> 8).astype(np.int64)
    assert (_arr(I.open_image(p)) == expect).all()
    t = I.read_image(p)
    assert t.dtype == torch.uint8 and (t.permute(1, 2, 0).numpy() == expect).all()


def test_transparency_composited_on_white(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 40
    rgba[..., 2] = 10
    rgba[..., 3] = np.tile(np.array([0, 64, 128, 255, 0, 255, 32, 200], np.uint8), (6, 1))
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    got = _arr(I.open_image(p))
    a = rgba[..., 3:4].astype(np.float64) / 255
    expect = np.rint(rgba[..., :3] * a + 255 * (1 - a))
    assert np.abs(got - expect).max() <= 1
    assert (got[:, 0] == 255).all()  # fully transparent -> white
    # LA, and a palette image with a transparent index
    la = Image.fromarray(np.stack([np.full((4, 4), 30, np.uint8),
                                   np.array([[0, 255] * 2] * 4, np.uint8)], -1), "LA")
    got = _arr(I.to_rgb(la))
    assert (got[:, 0] == 255).all() and (got[:, 1] == 30).all()
    pimg = Image.new("P", (4, 4), 1)
    pimg.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pimg.putpixel((0, 0), 0)
    pimg.info["transparency"] = 0
    q = tmp_path / "p_trns.png"
    pimg.save(q, transparency=0)
    got = _arr(I.open_image(q))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (10, 20, 30)
    t = I.read_image(q)
    assert (t.permute(1, 2, 0).numpy() == got).all()


# --------------------------------------------------------------------------- EXIF
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation(tmp_path, make_image, fmt, orientation, k):
    img = make_image(16, 24)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.{fmt.lower()}"
    img.save(p, format=fmt, exif=exif.tobytes(), **({"quality": 98} if fmt == "JPEG" else {}))
    stored = _arr(Image.open(p).convert("RGB"))  # pixels as stored, not rotated
    expect = np.rot90(stored, k=k)
    pil = _arr(I.open_image(p))
    fast = I.read_image(p).permute(1, 2, 0).numpy().astype(np.int64)
    assert pil.shape == expect.shape == fast.shape
    assert (pil == expect).all()
    assert np.abs(fast - pil).max() <= 1  # torchvision vs Pillow decode of the same file
    # the same rotation for an in-memory PIL image
    assert (I.as_uint8_image(Image.open(p)).permute(1, 2, 0).numpy() == pil).all()


def test_fast_decode_matches_pillow(tmp_path, make_image):
    img = make_image(37, 53)
    for name, kw in [("a.png", {}), ("a.jpg", {"quality": 90}), ("g.png", {}), ("g.jpg", {})]:
        src = img.convert("L") if name.startswith("g") else img
        p = tmp_path / name
        src.save(p, **kw)
        fast = I.read_image(p).permute(1, 2, 0).numpy().astype(np.int64)
        pil = _arr(I.open_image(p))
        assert fast.shape == (37, 53, 3)
        assert np.abs(fast - pil).max() <= 1, name
        if name.endswith(".png"):
            assert (fast == pil).all()


# ------------------------------------------------------------------------- errors
def test_unreadable_files_raise_naming_the_file(tmp_path, make_image):
    cases = {}
    cases["missing.jpg"] = None
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases["empty.jpg"] = "empty file"
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    cases["garbage.png"] = "not an image"
    buf = io.BytesIO()
    make_image(64, 64).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases["truncated.jpg"] = "truncated"
    (tmp_path / "folder.png").mkdir()
    cases["folder.png"] = "folder"
    for name, reason in cases.items():
        p = tmp_path / name
        for reader in (I.open_image, I.read_image):
            with pytest.raises(I.ImageReadError) as ei:
                reader(p)
            e = ei.value
            assert str(p) in str(e) and e.path == str(p)
            assert isinstance(e, OSError) and isinstance(e, ValueError)
            if reason:
                assert reason in e.reason.lower(), (name, e.reason)
            again = pickle.loads(pickle.dumps(e))  # crosses DataLoader worker boundaries
            assert str(again) == str(e)


def test_decompression_bomb_refused(tmp_path, make_image, monkeypatch):
    p = tmp_path / "big.png"
    make_image(40, 50).save(p)
    for reader in (I.open_image, I.read_image):
        with pytest.raises(I.ImageReadError, match="decompression bomb") as ei:
            reader(p, max_pixels=1999)
        assert "big.png" in str(ei.value) and "2000" in str(ei.value)
        assert reader(p, max_pixels=2000) is not None
    monkeypatch.setattr(I, "MAX_PIXELS", 100)
    with pytest.raises(I.ImageReadError, match="MAX_PIXELS"):
        I.read_image(p)


def test_in_memory_images(make_image):
    img = make_image(9, 7)
    ref = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    arr = np.asarray(img)
    assert torch.equal(I.as_uint8_image(img), ref)
    assert torch.equal(I.as_uint8_image(arr), ref)
    assert torch.equal(I.as_uint8_image(ref), ref)
    g = arr[..., 0]
    assert torch.equal(I.as_uint8_image(g), torch.from_numpy(g.copy()).expand(3, -1, -1))
    assert torch.equal(I.as_uint8_image(g[..., None]), I.as_uint8_image(g))
    assert torch.equal(I.as_uint8_image(torch.from_numpy(g.copy())[None]), I.as_uint8_image(g))
    rgba = np.concatenate([arr, np.zeros_like(arr[..., :1])], -1)
    assert (I.as_uint8_image(rgba) == 255).all()
    with pytest.raises(ValueError, match="uint8"):
        I.as_uint8_image(arr.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        I.as_uint8_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        I.as_uint8_image(torch.zeros(2, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="cannot use a dict"):
        I.as_uint8_image({})


# ------------------------------------------------------------------ preprocessing
def test_dino_transform_matches_pil_pipeline(make_image):
    """The paper's PIL pipeline (bicubic short side 256, centre crop 224) against ours on
    tensors: sizes identical, pixels within a couple of grey levels."""
    img = make_image(300, 451)
    tf = I.ImageTransform(Preprocessing())
    ours = tf(I.pil_to_tensor(img)).permute(1, 2, 0).numpy().astype(np.int64)
    w, h = img.size
    s = 256 / min(w, h)
    rs = img.resize((int(w * s), 256), Image.BICUBIC)  # torchvision's size rule
    left, top = int(round((rs.width - 224) / 2)), int(round((rs.height - 224) / 2))
    ref = _arr(rs.crop((left, top, left + 224, top + 224)))
    assert ours.shape == ref.shape == (224, 224, 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    # size= scales both the crop and the resize
    tf2 = I.ImageTransform(Preprocessing(), size=112)
    assert (tf2.resize_size, tf2.crop_size) == (128, 112)
    assert tf2(I.pil_to_tensor(img)).shape == (3, 112, 112)


def test_whole_transform_sizes(make_image):
    pre = Preprocessing(mode="whole", crop_size=224)
    tf = I.ImageTransform(pre, patch_size=16)
    for h, w in [(300, 451), (451, 300), (100, 100), (20, 500)]:
        out = tf(I.pil_to_tensor(make_image(h, w)))
        eh, ew = round(h * 224 / max(h, w)), round(w * 224 / max(h, w))
        assert out.shape == (3, max(16, eh // 16 * 16), max(16, ew // 16 * 16))
    tf = I.ImageTransform(pre, patch_size=8, size=60)
    assert tf.output_size(30, 60) == (24, 56)


def test_grayscale_matches_pillow(make_image):
    img = make_image(20, 30)
    t = I.rgb_to_gray3(I.pil_to_tensor(img))
    assert (t[0].numpy() == np.asarray(img.convert("L"))).all()
    assert torch.equal(t[0], t[2])
    tf = I.ImageTransform(Preprocessing(grayscale=True, resize_size=20, crop_size=20))
    out = tf(I.pil_to_tensor(img))
    assert torch.equal(out[0], out[1])


def test_normalize_batch():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    got = I.normalize_batch(x, IMAGENET_MEAN, IMAGENET_STD)
    ref = (x.double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.double).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD, dtype=torch.double).view(1, 3, 1, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        I.normalize_batch(x.float(), IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------- inputs, loader
def test_resolve_images_kinds(tmp_path, make_image):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        make_image(8, 8, seed=i).save(d / f"{i}.png")
    r = I.resolve_images(d)
    assert r.from_folder and [s.key for s in r.sources] == sorted(d.glob("*.png"))
    r = I.resolve_images([d / "2.png", make_image(5, 5), np.zeros((4, 4, 3), np.uint8)])
    assert not r.from_folder and [s.key for s in r.sources] == [d / "2.png", 1, 2]
    assert len(I.resolve_images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))) == 4
    assert len(I.resolve_images(np.zeros((2, 8, 8, 3), np.uint8))) == 2
    r = I.resolve_images(torch.zeros(2, 3, 8, 8))
    assert r.tensor is not None and len(r) == 2
    with pytest.raises(FileNotFoundError, match="no such image file or folder"):
        I.resolve_images(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        I.resolve_images(torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match="float tensors"):
        I.resolve_images([torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="no images"):
        I.resolve_images([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        I.resolve_images(tmp_path / "empty")


def test_loader_workers_order_and_failures(tmp_path, make_image):
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        if i in (2, 5):
            p.write_bytes(b"broken")
        else:
            make_image(10 + i, 12, seed=i).save(p)
        paths.append(p)
    sources = I.resolve_images(paths).sources
    tf = I.ImageTransform(Preprocessing(mode="whole", crop_size=16), patch_size=4)
    seen, failed = [], []
    for batch in I.image_loader(sources, tf, batch_size=3, num_workers=2):
        seen.extend(batch.positions)
        failed.extend(i for i, _ in batch.failed)
        for pos, imgs in batch.groups:
            assert imgs.dtype == torch.uint8 and imgs.shape[0] == len(pos)
            for j, p in enumerate(pos):
                assert torch.equal(imgs[j], tf(I.read_image(paths[p])))
    assert seen == list(range(7)) and failed == [2, 5]


# ------------------------------------------------------------- reduced-size decoding
@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_reduced_jpeg_decoding(tmp_path, make_image, orientation, mode):
    """A JPEG four times the resize target is decoded at 1/4 scale, EXIF-rotated and
    converted like a full decode, and preprocesses to nearly the same pixels."""
    img = make_image(480, 640, mode=mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "big.jpg"
    img.save(p, quality=95, exif=exif.tobytes())
    t = I.ImageTransform(Preprocessing(resize_size=120, crop_size=112), 16)
    full = I.read_image(p)
    small = I.read_image(p, reduce_to=t.decode_size)
    # 480 // 120 = 4: libjpeg's 1/4 scale, rotated like the full decode
    assert tuple(small.shape[1:]) == (full.shape[1] // 4, full.shape[2] // 4)
    assert small.dtype == torch.uint8 and small.shape[0] == 3
    a, b = t(full).float(), t(small).float()
    assert a.shape == b.shape == (3, 112, 112)
    assert (a - b).abs().mean() < 2.0  # grey levels
    # under twice the target: decoded in full, exactly as without reduce_to
    t2 = I.ImageTransform(Preprocessing(resize_size=300, crop_size=224), 16)
    assert torch.equal(I.read_image(p, reduce_to=t2.decode_size), full)


def test_reduced_decoding_keeps_limits_and_errors(tmp_path, make_image, monkeypatch):
    t = I.ImageTransform(Preprocessing(resize_size=32, crop_size=32), 16)
    p = tmp_path / "big.jpg"
    make_image(400, 600).save(p, quality=90)
    monkeypatch.setattr(I, "MAX_PIXELS", 400 * 600 - 1)  # the file's full size counts
    with pytest.raises(I.ImageReadError, match="decompression bomb"):
        I.read_image(p, reduce_to=t.decode_size)
    monkeypatch.setattr(I, "MAX_PIXELS", 10 ** 9)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(p.read_bytes()[:300])
    with pytest.raises(I.ImageReadError, match="cut.jpg"):
        I.read_image(cut, reduce_to=t.decode_size)
    png = tmp_path / "big.png"  # other formats: decoded in full
    make_image(400, 600).save(png)
    assert I.read_image(png, reduce_to=t.decode_size).shape[1:] == (400, 600)


def test_decode_size_is_the_resize_before_cropping():
    t = I.ImageTransform(Preprocessing(resize_size=256, crop_size=224), 16)
    assert t.decode_size(3000, 4000) == (256, 342)
    assert t.decode_size(4000, 3000) == (342, 256)
    w = I.ImageTransform(Preprocessing(mode="whole", crop_size=224), 16)
    assert w.decode_size(3000, 4000) == w.output_size(3000, 4000) == (160, 224)


def test_loader_decode_modes(tmp_path, make_image):
    for i in range(3):
        make_image(480, 640, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
    t = I.ImageTransform(Preprocessing(resize_size=64, crop_size=64), 16)
    src = [I.ImageSource(p, p) for p in I.list_images(tmp_path)]
    full = next(iter(I.image_loader(src, t, decode="full", num_workers=0))).groups[0][1]
    red = next(iter(I.image_loader(src, t, num_workers=0))).groups[0][1]
    assert full.shape == red.shape == (3, 3, 64, 64)
    assert 0 < (full.float() - red.float()).abs().mean() < 2.0
    with pytest.raises(ValueError, match="decode"):
        I.image_loader(src, t, decode="half")


def test_split_cores_between_decoding_and_model():
    from pathlib import Path
    assert I.split_cores(2, 0.01, 0.03) == (1, 2)   # model-bound: the worker fills gaps
    assert I.split_cores(2, 0.15, 0.03) == (2, 1)   # decode-bound
    assert I.split_cores(16, 0.01, 0.03) == (4, 12)
    assert I.split_cores(1, 0.5, 0.5) == (1, 1)
    src = [I.ImageSource(Path(f"{i}.jpg"), Path(f"{i}.jpg")) for i in range(10)]
    assert I.plan_decoding(src, batch_size=64, cores=16).workers == 0  # one batch: no workers
    assert I.plan_decoding(src, batch_size=4, num_workers=3).workers == 3
    # few cores: decoding threads and the model take turns (on a GPU, processes overlap)
    turns = I.plan_decoding(src, batch_size=4, cores=2)
    assert (turns.mode, turns.workers) == ("turns", 2)
    assert I.plan_decoding(src, batch_size=64, cores=2, device_type="cuda").mode == "processes"
    assert I.plan_decoding(src, batch_size=4, cores=I.TURNS_MAX_CORES + 1).mode == "processes"


def test_threaded_batches_equal_the_loader(tmp_path):
    from dinofeat.zoo import Preprocessing
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.jpg")
    (tmp_path / "3.jpg").write_bytes(b"not a jpeg")  # unreadable: reported, not raised
    t = I.ImageTransform(Preprocessing(resize_size=32, crop_size=32), 16)
    src = [I.ImageSource(p, p) for p in I.list_images(tmp_path)]
    ref = list(I.image_loader(src, t, batch_size=3, num_workers=0))
    got = list(I.ThreadedBatches(src, t, batch_size=3, threads=2))
    assert len(got) == len(I.ThreadedBatches(src, t, batch_size=3, threads=2)) == len(ref) == 3
    for a, b in zip(ref, got):
        assert a.positions == b.positions and a.failed == b.failed
        assert [p for p, _ in a.groups] == [p for p, _ in b.groups]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.groups, b.groups))
    assert got[1].failed and got[1].failed[0][0] == 3
    with pytest.raises(ValueError):
        I.ThreadedBatches(src, t, threads=0)
