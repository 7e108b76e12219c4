import pytest

from shardlight.core.errors import InputError
from shardlight.core.storage import list_shards, shard_name, write_atomic


@pytest.fixture
def shard_dir(tmp_path):
    for name in ["00000.tar", "00001.tar", "00002.tar.gz", "00003.tgz", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_lists_every_shard_kind_sorted(shard_dir):
    names = [p.rsplit("/", 1)[-1] for p in list_shards(str(shard_dir))]
    assert names == ["00000.tar", "00001.tar", "00002.tar.gz", "00003.tgz"]


def test_brace_and_glob_patterns(shard_dir):
    assert len(list_shards(f"{shard_dir}/{{00000..00001}}.tar")) == 2
    assert len(list_shards(f"{shard_dir}/*.tar")) == 2
    assert len(list_shards([f"{shard_dir}/00000.tar", f"file://{shard_dir}/00001.tar"])) == 2


def test_missing_input_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(InputError, match="no input shards match"):
        list_shards(str(tmp_path / "*.tar"))


def test_shards_with_the_same_output_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "00000.tar").write_bytes(b"x")
    (tmp_path / "b" / "00000.tar.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="share the output name '00000'"):
        list_shards(str(tmp_path))


def test_shard_name_strips_suffixes():
    assert shard_name("s3://bucket/x/00012.tar.gz") == "00012"
    assert shard_name("/data/00003.tgz") == "00003"


def test_write_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    write_atomic(str(target), b"one")
    write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]
