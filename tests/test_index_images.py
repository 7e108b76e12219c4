"""Generated (augmented) rows are indexed after the input rows; image bytes come from either tar."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from index_helpers import clustered, write_shard

from index.build import build_index
from index.search import Searcher
from index.service.images import ImageStore, ImageUnavailable


def _tar(path, members: dict[str, bytes]) -> tuple[list[int], list[int]]:
    """Write a tar and return each member's data offset and size, as the reader records them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        found = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    return [found[n][0] for n in members], [found[n][1] for n in members]


@pytest.fixture
def out(tmp_path):
    x = clustered(6, 16)
    source = tmp_path / "data" / "00000.tar"
    source.parent.mkdir()
    inputs = {f"00000_{i:06d}.jpg": f"input image {i}".encode() * (i + 1) for i in range(4)}
    write_shard(tmp_path, "00000", x[:4], tar=(str(source), *_tar(source, inputs)))
    generated = {f"gen_{i:06d}.png": f"generated {i}".encode() for i in range(2)}
    offsets, sizes = _tar(tmp_path / "augmented-00000.tar", generated)
    (tmp_path / "augmented").mkdir()
    (tmp_path / "augmented-00000.tar").rename(tmp_path / "augmented" / "00000.tar")
    write_shard(tmp_path, "00000", x[4:], synthetic=[True, True], folder="augmented", key_prefix="gen",
                tar=(str(source), offsets, sizes))
    build_index(str(tmp_path), "Flat")
    return tmp_path


def test_generated_rows_follow_input_rows_and_filter_as_synthetic(out):
    s = Searcher(str(out))
    assert s.size == 6 and s.keys[4:] == ["gen_000000", "gen_000001"]
    q = clustered(6, 16)[5]
    assert [h.key for h in s.search(vector=q, k=5, synthetic=True)] == ["gen_000001", "gen_000000"]
    real = s.search(vector=q, k=5, synthetic=False)
    assert len(real) == 4 and not any(h.synthetic for h in real)
    assert s.search(key="gen_000001", k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_image_bytes_come_from_the_right_tar_with_one_seek(out):
    store = ImageStore(Searcher(str(out)))
    assert store.read("00000_000002") == (b"input image 2" * 3, "image/jpeg")
    assert store.read("gen_000001")[0] == b"generated 1"
    assert store.locate("gen_000001").url.endswith("augmented/00000.tar")


def test_rows_without_offsets_are_unavailable(tmp_path):
    write_shard(tmp_path, "00000", clustered(3, 16))
    build_index(str(tmp_path), "Flat")
    with pytest.raises(ImageUnavailable, match="no stored image location"):
        ImageStore(Searcher(str(tmp_path))).read("00000_000001")
    assert np.isfinite(Searcher(str(tmp_path)).search(key="00000_000001", k=1)[0].score)
