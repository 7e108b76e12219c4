import gzip
import io
import tarfile

from PIL import Image

from shardlight.core.schema import SampleError
from tests.conftest import make_samples, tar_keys, write_tar
from workers.reader import RawSample, ShardReader, decode


def _read(path):
    reader = ShardReader(str(path))
    return reader, list(reader)


def test_samples_carry_caption_meta_and_image_offsets(tmp_path):
    path = write_tar(tmp_path / "00000.tar", make_samples(3, seed=1, prefix="k"))
    reader, items = _read(path)
    assert reader.problem is None
    assert [s.key for s in items] == ["k0000", "k0001", "k0002"]
    raw = path.read_bytes()
    for s in items:
        assert isinstance(s, RawSample) and s.caption and s.meta["label"]
        assert raw[s.tar_offset: s.tar_offset + s.tar_size] == s.image  # one seek finds the image


def test_png_webp_and_missing_caption(tmp_path):
    samples = make_samples(2, seed=2, prefix="p")
    for s, fmt in zip(samples, ["png", "webp"]):
        buf = io.BytesIO()
        Image.open(io.BytesIO(s.pop("jpg"))).save(buf, format=fmt.upper())
        s[fmt] = buf.getvalue()
    del samples[1]["txt"]
    samples[1]["json"] = b'{"url": "u"}'
    _, items = _read(write_tar(tmp_path / "00000.tar", samples))
    assert [s.image_format for s in items] == ["png", "webp"]
    assert items[1].caption is None
    assert all(isinstance(decode(s).image, Image.Image) for s in items)


def test_caption_falls_back_to_json(tmp_path):
    samples = make_samples(1, seed=2, prefix="j")
    del samples[0]["txt"]
    _, items = _read(write_tar(tmp_path / "00000.tar", samples))
    assert items[0].caption and items[0].caption in samples[0]["json"].decode()


def test_gzipped_shard(tmp_path):
    plain = write_tar(tmp_path / "x.tar", make_samples(2, seed=3, prefix="g")).read_bytes()
    path = tmp_path / "00000.tar.gz"
    path.write_bytes(gzip.compress(plain))
    reader, items = _read(path)
    assert reader.problem is None and len(items) == 2
    assert items[0].tar_offset is None  # no seeking inside a compressed stream


def test_corrupt_image_becomes_a_decode_error(tmp_path):
    samples = make_samples(2, seed=4, prefix="c")
    samples[0]["jpg"] = b"garbage"
    _, items = _read(write_tar(tmp_path / "00000.tar", samples))
    result = decode(items[0])
    assert isinstance(result, SampleError) and result.stage == "decode" and result.key == "c0000"
    assert "cannot decode jpg" in result.reason


def test_sample_without_image_is_recorded(tmp_path):
    samples = make_samples(2, seed=5, prefix="n")
    del samples[0]["jpg"]
    _, items = _read(write_tar(tmp_path / "00000.tar", samples))
    assert isinstance(items[0], SampleError) and "no image member (found: json, txt)" in items[0].reason
    assert isinstance(items[1], RawSample)


def test_bad_json_keeps_the_row_and_says_so(tmp_path):
    samples = make_samples(1, seed=6, prefix="m")
    samples[0]["json"] = b"{not json"
    _, items = _read(write_tar(tmp_path / "00000.tar", samples))
    assert items[0].metadata_error.startswith("bad json metadata") and items[0].meta == {}


def test_empty_and_truncated_shards_are_described_not_raised(tmp_path):
    empty = tmp_path / "00000.tar"
    empty.write_bytes(b"")
    reader, items = _read(empty)
    assert items == [] and reader.problem == "empty shard (no tar members)"

    full = write_tar(tmp_path / "full.tar", make_samples(6, seed=7, prefix="t")).read_bytes()
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full[: len(full) // 2])  # on a header boundary: t0003's json is never seen
    reader, items = _read(cut)
    assert reader.problem.startswith("truncated shard after 11 members")
    assert tar_keys(cut) == ["t0000", "t0001", "t0002", "t0003"]
    assert [(type(s).__name__, s.key) for s in items] == [("RawSample", f"t000{i}") for i in range(4)]


def test_sample_cut_inside_its_data_is_an_error_record(tmp_path):
    """The truncation cuts t0004.jpg's data after its header: tarfile lists the key, so the reader names it."""
    full = write_tar(tmp_path / "full.tar", make_samples(6, seed=7, prefix="t"))
    with tarfile.open(full) as tar:
        member = tar.getmember("t0004.jpg")
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full.read_bytes()[: member.offset_data + member.size // 2])
    reader, items = _read(cut)
    assert tar_keys(cut) == [f"t000{i}" for i in range(5)]
    assert [s.key for s in items] == tar_keys(cut)  # every key the tar shows, in order
    assert all(isinstance(s, RawSample) for s in items[:4])
    assert isinstance(items[4], SampleError) and items[4].dropped and items[4].stage == "read"
    assert "cut off by the truncation: member t0004.jpg is incomplete" in items[4].reason
    assert reader.problem.startswith("truncated shard after 12 members")
