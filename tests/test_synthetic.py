import json
import tarfile

from shardlight.training.synthetic import CLASS_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, write_shards


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_follow_img2dataset_layout(tmp_path):
    paths = write_shards(tmp_path, shards=2, samples_per_shard=5, seed=7)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"]
    members = _members(paths[0])
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 5
    for key in keys:
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
        meta = json.loads(members[f"{key}.json"])
        assert meta["label"] == f"{meta['color']} {meta['shape']}"
        assert meta["label"] in CLASS_NAMES and meta["label_id"] == CLASS_NAMES.index(meta["label"])
        caption = members[f"{key}.txt"].decode()
        assert meta["color"] in caption and meta["shape"] in caption
        assert members[f"{key}.jpg"][:2] == b"\xff\xd8"


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = _members(write_shards(tmp_path / "a", 1, 4, seed=1)[0])
    b = _members(write_shards(tmp_path / "b", 1, 4, seed=1)[0])
    c = _members(write_shards(tmp_path / "c", 1, 4, seed=2)[0])
    assert a == b
    assert a != c


def test_eval_phrasings_are_not_training_templates():
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert len(CLASS_NAMES) == 24
