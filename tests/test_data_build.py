"""Image loading, shard building/reading, the face dataset and the embedded pack."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rlrestore.config import DegradationConfig
from rlrestore.data import (
    FaceDataset,
    ImageLoadError,
    ShardError,
    build_shards,
    collate_faces,
    decode_png,
    embedded_faces_dir,
    encode_png,
    iter_image_files,
    load_image,
    read_shards,
    save_image,
    split_holdout,
    square_resize,
    to_tensor,
    to_uint8,
)
from rlrestore.runtime.seeds import sample_seed

SIZE = 32


def _gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=2
    ).astype(np.uint8)


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _make_source(root: Path) -> dict[str, np.ndarray]:
    """Write a zoo of good and bad inputs; returns the expected RGB array of each readable file."""
    (root / "sub").mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}

    rgb = _gradient(40, 30)
    Image.fromarray(rgb).save(root / "rgb.png")
    expected["rgb.png"] = rgb

    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:, 12:, 3] = 0  # right half fully transparent -> white
    Image.fromarray(rgba, mode="RGBA").save(root / "sub" / "rgba.png")
    want = np.zeros((24, 24, 3), np.uint8)
    want[:, :12] = (200, 0, 0)
    want[:, 12:] = 255
    expected["sub/rgba.png"] = want
    (root / "sub" / "rgba.txt").write_text("from sidecar\n")

    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    Image.fromarray(gray, mode="L").save(root / "gray.jpg", quality=95)
    expected["gray.jpg"] = np.repeat(gray[..., None], 3, axis=2)

    Image.fromarray(np.full((20, 20), 25700, np.uint16)).save(root / "deep16.png")
    expected["deep16.png"] = np.full((20, 20, 3), 100, np.uint8)

    webp = _gradient(16, 16)
    Image.fromarray(webp).save(root / "sub" / "face.webp", lossless=True)
    expected["sub/face.webp"] = webp

    palette = Image.fromarray(_gradient(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "palette.png")
    expected["palette.png"] = np.asarray(palette.convert("RGB"))

    tiny = _gradient(8, 8)
    Image.fromarray(tiny).save(root / "tiny.PNG")
    expected["tiny.PNG"] = tiny

    Image.fromarray(np.full((12, 12, 3), 10, np.uint8)).save(root / "twin.png")
    Image.fromarray(np.full((12, 12, 3), 250, np.uint8)).save(root / "twin.bmp")
    expected["twin.png"] = np.full((12, 12, 3), 10, np.uint8)
    expected["twin.bmp"] = np.full((12, 12, 3), 250, np.uint8)

    good = _png_bytes(Image.fromarray(_gradient(64, 64)))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a JPEG\n")
    Image.fromarray(rgb).save(root / ".hidden.png")
    (root / ".cache").mkdir()
    Image.fromarray(rgb).save(root / ".cache" / "x.png")

    captions = [
        {"file": "rgb.png", "caption": "a gradient face"},
        "this line is not json",
        {"file": "sub/rgba.png", "caption": "from jsonl"},
        {"file": "missing.png", "caption": "nobody"},
        {"file": "face.webp", "caption": "found by bare name"},
        {"file": "rgb.png", "caption": "second caption"},
    ]
    (root / "captions.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in captions) + "\n"
    )
    return expected


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray], object]:
    root = tmp_path_factory.mktemp("data")
    src, out = root / "src", root / "shards"
    expected = _make_source(src)
    report = build_shards(src, out, image_size=SIZE, shard_size=4, progress=False)
    return src, out, expected, report


# ---- image I/O ----


def test_sixteen_bit_values_are_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 200, 257, 25700, 32768, 65534, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (1, 7, 3)
    assert loaded[0, :, 0].tolist() == [0, 1, 1, 100, 128, 255, 255]
    assert (loaded[..., 0] == loaded[..., 2]).all()
    big_endian = Image.new("I;16B", (2, 1))
    big_endian.putpixel((0, 0), 65535)
    big_endian.putpixel((1, 0), 514)
    big_endian.save(tmp_path / "g16b.tiff")
    assert load_image(tmp_path / "g16b.tiff")[0, :, 1].tolist() == [255, 2]


def test_modes_exif_and_cmyk(tmp_path: Path) -> None:
    img = Image.fromarray(_gradient(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "exif.jpg").shape == (20, 10, 3)

    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (4, 6, 3)
    assert np.abs(cmyk.astype(int) - (255, 0, 0)).max() <= 3

    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == 255).all()  # fully transparent -> white

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal_t.png", transparency=0)
    assert (load_image(tmp_path / "pal_t.png") == 255).all()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"plain text, no pixels\n", "not a recognised image format"),
        ("truncated", "truncated"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path: Path, content: bytes | str, reason: str) -> None:
    path = tmp_path / "bad.png"
    if content == "truncated":
        good = _png_bytes(Image.fromarray(_gradient(64, 64)))
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value) and reason in info.value.reason
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_pixel_limit(tmp_path: Path) -> None:
    Image.new("L", (8000, 8000), 7).save(tmp_path / "huge.png", compress_level=1)
    loaded = load_image(tmp_path / "huge.png")
    assert loaded.shape == (8000, 8000, 3) and loaded[4000, 4000, 0] == 7
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1000000"):
        load_image(tmp_path / "huge.png", max_pixels=1_000_000)


def test_tensor_and_png_round_trips(tmp_path: Path) -> None:
    img = _gradient(12, 9)
    tensor = to_tensor(img)
    assert tensor.shape == (3, 9, 12) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    assert np.array_equal(to_uint8(tensor), img)
    assert to_uint8(torch.full((3, 2, 2), 5.0)).min() == 255
    assert to_uint8(torch.full((3, 2, 2), -5.0)).max() == 0
    assert np.array_equal(decode_png(encode_png(img)), img)
    assert encode_png(img) == encode_png(img.copy())
    save_image(tensor, tmp_path / "nested" / "t.png")
    assert np.array_equal(load_image(tmp_path / "nested" / "t.png"), img)
    with pytest.raises(ImageLoadError, match="not a recognised"):
        decode_png(b"\xff\xd8\xff not a png", label="shard-x (id a)")


def test_square_resize_crops_the_centre() -> None:
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 200  # the centre square
    out = square_resize(img, 10)
    assert out.shape == (10, 10, 3) and (out == 200).all()
    assert square_resize(img, 40).shape == (40, 40, 3)


def test_iter_image_files(tmp_path: Path) -> None:
    for name in ["b.PNG", "a/c.jpeg", "a/d.WebP", ".e.png", ".git/f.png", "g.txt", "h.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["a/c.jpeg", "a/d.WebP", "b.PNG"]
    with pytest.raises(NotADirectoryError, match="nowhere"):
        iter_image_files(tmp_path / "nowhere")


# ---- shards ----


def test_build_counts_and_report(built) -> None:
    _, out, expected, report = built
    assert report.count == len(expected) == 9
    assert report.shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert {item.path: item.reason for item in report.skipped}.keys() == {
        "truncated.png",
        "empty.png",
        "notes.jpg",
    }
    reasons = {item.path: item.reason for item in report.skipped}
    assert "truncated" in reasons["truncated.png"]
    assert "empty" in reasons["empty.png"]
    assert "not a recognised image format" in reasons["notes.jpg"]
    assert [(e.line, e.reason.split(" ")[0]) for e in report.caption_errors] == [
        (2, "not"),
        (4, "file"),
        (6, "duplicate"),
    ]
    assert "names no image" in report.caption_errors[1].reason
    assert "skipped 3 file(s)" in report.summary() and "truncated.png" in report.summary()

    on_disk = json.loads((out / "_report.json").read_text())
    assert {row["path"] for row in on_disk["skipped"]} == {"truncated.png", "empty.png", "notes.jpg"}
    assert all(row["reason"] for row in on_disk["skipped"])
    assert [row["line"] for row in on_disk["caption_errors"]] == [2, 4, 6]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest == {
        "schema_version": 1,
        "image_size": SIZE,
        "count": 9,
        "shards": report.shards,
        "skipped": 3,
    }
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.schema.field("orig_width").type == pa.int32()
    assert table.schema.field("image").type == pa.binary()


def test_round_trip_ids_captions_and_pixels(built) -> None:
    _, out, expected, _ = built
    records = read_shards(out)
    by_source = {record.source: record for record in records}
    assert set(by_source) == set(expected)
    ids = [record.id for record in records]
    assert len(set(ids)) == len(ids)
    assert by_source["sub/rgba.png"].id == "sub__rgba"
    assert by_source["tiny.PNG"].id == "tiny"
    twins = {by_source["twin.png"].id, by_source["twin.bmp"].id}
    assert len(twins) == 2 and all(t.startswith("twin-") for t in twins)

    assert by_source["rgb.png"].caption == "a gradient face"
    assert by_source["sub/rgba.png"].caption == "from sidecar"  # sidecar wins over captions.jsonl
    assert by_source["sub/face.webp"].caption == "found by bare name"
    assert by_source["gray.jpg"].caption is None

    for source, want in expected.items():
        image = by_source[source].image
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        if source == "gray.jpg":  # lossy source: compare loosely
            assert np.abs(image.astype(int) - square_resize(want, SIZE).astype(int)).mean() < 3
        else:
            assert np.array_equal(image, square_resize(want, SIZE)), source
    assert (by_source["deep16.png"].image == 100).all()

    sizes = [
        row
        for shard in sorted(out.glob("shard-*.parquet"))
        for row in pq.read_table(shard, columns=["source", "orig_width", "orig_height"]).to_pylist()
    ]
    assert {"source": "rgb.png", "orig_width": 40, "orig_height": 30} in sizes


def test_build_is_deterministic_and_clears_stale_shards(built, tmp_path: Path) -> None:
    src, out, _, _ = built
    again = tmp_path / "again"
    build_shards(src, again, image_size=SIZE, shard_size=4, progress=False)
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert pq.read_table(again / name).equals(pq.read_table(out / name))
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(_gradient(8, 8)).save(single / "only.png")
    report = build_shards(single, again, image_size=SIZE, shard_size=4, progress=False)
    assert report.shards == ["shard-00000.parquet"]
    assert sorted(p.name for p in again.glob("shard-*.parquet")) == ["shard-00000.parquet"]
    assert [r.id for r in read_shards(again)] == ["only"]


def test_the_folder_is_one_parquet_dataset(built) -> None:
    """Only Parquet files and underscore-prefixed JSON: pyarrow's dataset reader takes the folder."""
    import pyarrow.dataset as ds

    _, out, _, report = built
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) == [
        "_manifest.json",
        "_report.json",
    ]
    dataset = ds.dataset(out)
    assert dataset.count_rows() == report.count == 9
    assert sorted(dataset.to_table(columns=["id"])["id"].to_pylist()) == sorted(r.id for r in read_shards(out))


def test_a_folder_of_the_old_layout_still_loads(built, tmp_path: Path, caplog) -> None:
    """``manifest.json``/``report.json`` (before the rename) are read, with a note in the log; the
    training shards of a run are reused, not rebuilt; a rebuild removes the old names."""
    import shutil

    from rlrestore.data.shards import read_manifest, shard_file
    from rlrestore.orchestration.jobs import prepare_shards
    from tests.conftest import tiny_config

    _, out, _, _ = built
    config = tiny_config(tmp_path / "run", f"data.image_size={SIZE}")
    old = tmp_path / "run" / "data"
    shutil.copytree(out, old)
    (old / "_manifest.json").rename(old / "manifest.json")
    (old / "_report.json").rename(old / "report.json")
    with caplog.at_level("INFO", logger="rlrestore.data.shards"):
        assert read_manifest(old) == read_manifest(out) and read_manifest(old)["count"] == 9
        assert shard_file(old, "_report.json") == old / "report.json"
    assert "old shard layout, read manifest.json" in caplog.text
    assert prepare_shards(config) == old.resolve()  # manifest found: the folder is kept as it is
    assert sorted(r.id for r in read_shards(old)) == sorted(r.id for r in read_shards(out))
    assert read_manifest(tmp_path) is None

    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(_gradient(8, 8)).save(single / "only.png")
    build_shards(single, old, image_size=SIZE, shard_size=4, progress=False)
    assert sorted(p.name for p in old.iterdir()) == ["_manifest.json", "_report.json", "shard-00000.parquet"]


def test_build_fails_without_readable_images(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_text("text")
    with pytest.raises(ShardError, match=str(src)) as info:
        build_shards(src, tmp_path / "out", image_size=SIZE, shard_size=4, progress=False)
    assert "2 image file(s), all unreadable" in str(info.value)
    assert len(json.loads((tmp_path / "out" / "_report.json").read_text())["skipped"]) == 2
    assert not (tmp_path / "out" / "_manifest.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match="no files with an image extension"):
        build_shards(empty, tmp_path / "out2", image_size=SIZE, shard_size=4, progress=False)
    with pytest.raises(ShardError, match="does not exist"):
        build_shards(tmp_path / "missing", tmp_path / "out3", image_size=SIZE, shard_size=4, progress=False)


def test_read_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no shards"):
        read_shards(tmp_path)
    (tmp_path / "shard-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match="shard-00000.parquet is not a readable Parquet file"):
        read_shards(tmp_path)
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "shard-00000.parquet")
    with pytest.raises(ShardError, match=r"shard-00000.parquet lacks column\(s\) \['source', 'caption'"):
        read_shards(tmp_path)


def test_split_holdout(built) -> None:
    records = read_shards(built[1])
    train, holdout = split_holdout(list(reversed(records)), 3)
    ids = sorted(record.id for record in records)
    assert [r.id for r in holdout] == ids[-3:]
    assert [r.id for r in train] == ids[:-3]
    assert split_holdout(records, 0)[1] == []
    with pytest.raises(ValueError, match="leaves no training faces"):
        split_holdout(records, len(records))


# ---- dataset ----


def test_face_dataset_items(built) -> None:
    records = read_shards(built[1])
    cfg = DegradationConfig(reference_size=64)
    dataset = FaceDataset(records, resolution=24, degradation=cfg, seed=5)
    assert len(dataset) == len(records)
    item = dataset[0]
    assert item["hq"].shape == item["lq"].shape == (3, 24, 24)
    for key in ("hq", "lq"):
        assert item[key].dtype == torch.float32
        assert item[key].min() >= -1.0 and item[key].max() <= 1.0
    assert item["id"] == records[0].id
    assert item["seed"] == sample_seed(5, records[0].id, 0)
    captions = {dataset[i]["id"]: dataset[i]["caption"] for i in range(len(dataset))}
    assert captions["gray"] == "" and captions["rgb"] == "a gradient face"

    twin = FaceDataset(records, resolution=24, degradation=cfg, seed=5)
    assert torch.equal(twin[3]["lq"], dataset[3]["lq"])
    dataset.set_epoch(1)
    later = dataset[3]
    assert torch.equal(later["hq"], twin[3]["hq"])
    assert not torch.equal(later["lq"], twin[3]["lq"])
    assert later["seed"] != twin[3]["seed"]
    twin.set_epoch(1)
    assert torch.equal(twin[3]["lq"], later["lq"])

    batch = collate_faces([dataset[i] for i in range(3)])
    assert batch["hq"].shape == (3, 3, 24, 24)
    assert batch["id"] == [records[i].id for i in range(3)]
    assert isinstance(batch["caption"], list) and isinstance(batch["seed"][0], int)


def test_embedded_pack() -> None:
    faces = embedded_faces_dir()
    pngs = sorted(faces.glob("*.png"))
    assert len(pngs) >= 60
    assert sum(p.stat().st_size for p in faces.iterdir()) < 8_000_000
    sources = (faces / "SOURCES.md").read_text()
    assert "resized to 128x128 px" in sources and "CC BY-NC-SA 4.0" in sources
    first = load_image(pngs[0])
    assert first.shape == (128, 128, 3)
