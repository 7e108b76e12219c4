"""One output, one embedding space: a run with other models or label settings is refused; queries embed
with the model that built the index."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shardlight.core.config import CONFIG_DIR, ClipSpec, LabelSpec
from shardlight.core.errors import InputError
from shardlight.core.space import check_space, models_path, record_space
from tests.index_helpers import clustered, write_shard

WEIGHTS = CONFIG_DIR / "models" / "shapes-clip.safetensors"
VIT = LabelSpec(kind="vit", model="shapes-vit", checkpoint=str(CONFIG_DIR / "models" / "shapes-vit.safetensors"),
                top_k=3)


@pytest.fixture
def out(tmp_path) -> Path:
    write_shard(tmp_path / "out", "00000", clustered(8, dim=16))
    return tmp_path / "out"


def test_same_settings_pass_and_a_new_output_records_them(tmp_path, out):
    clip = ClipSpec(model="shapes-clip", pretrained=str(WEIGHTS))
    check_space(str(tmp_path / "empty"), clip, VIT)  # nothing there yet
    record_space(str(out), clip, VIT)
    recorded = json.loads(Path(models_path(str(out))).read_text())
    assert recorded["clip"]["pretrained"] == str(WEIGHTS) and recorded["identity"]["labels.top_k"] == 3
    check_space(str(out), clip, VIT)
    moved = tmp_path / "elsewhere" / WEIGHTS.name  # a moved checkout: same bytes, other path
    moved.parent.mkdir()
    shutil.copy(WEIGHTS, moved)
    check_space(str(out), ClipSpec(model="shapes-clip", pretrained=str(moved)), VIT)


@pytest.mark.parametrize("change, named", [
    ({"clip": ClipSpec(model="shapes-clip", pretrained=None)}, "clip.pretrained shapes-clip.safetensors"),
    ({"labels": VIT.model_copy(update={"top_k": 5})}, "labels.top_k 3 → 5"),
    ({"labels": LabelSpec(kind="zeroshot", class_names=["a", "b"])}, "labels.kind vit → zeroshot"),
])
def test_other_models_or_label_settings_are_refused_naming_the_difference(out, change, named):
    clip = ClipSpec(model="shapes-clip", pretrained=str(WEIGHTS))
    record_space(str(out), clip, VIT)
    new = {"clip": clip, "labels": VIT, **change}
    with pytest.raises(InputError) as err:
        check_space(str(out), new["clip"], new["labels"])
    message = str(err.value)
    assert named in message and "--out NEW_DIR" in message and "re-embed" in message and "\n" not in message


def test_an_output_from_before_models_json_is_judged_by_its_run_json(out):
    config = {"clip": {"model": "shapes-clip", "pretrained": str(WEIGHTS), "seed": 0}, "labels": VIT.model_dump()}
    (out / "run.json").write_text(json.dumps({"config": config}))
    check_space(str(out), ClipSpec(model="shapes-clip", pretrained=str(WEIGHTS)), VIT)
    with pytest.raises(InputError, match="clip.pretrained"):
        check_space(str(out), ClipSpec(model="shapes-clip"), VIT)


def test_the_cli_refuses_before_any_service_starts(tmp_path, out):
    from tests.test_cli import assert_one_line_error, run_cli

    record_space(str(out), ClipSpec(model="shapes-clip", pretrained=str(WEIGHTS)), VIT.model_copy(update={"top_k": 5}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00001.tar").write_bytes(b"")
    result = run_cli("run", str(CONFIG_DIR / "demo.yaml"), "-i", str(tmp_path / "data"), "-o", str(out))
    assert_one_line_error(result, "labels.top_k 5 → 3")  # demo.yaml keeps 3


def test_queries_embed_with_the_model_that_built_the_index(tmp_path, monkeypatch):
    """run.json names a later run's model; the searcher must still use index/meta.json's."""
    import shardlight.models.clip as clip_module
    from index.build import build_index
    from index.search import Searcher

    out = tmp_path / "out"
    write_shard(out, "00000", clustered(16, dim=16))
    built_with = {"model": "shapes-clip", "pretrained": str(WEIGHTS), "seed": 0}
    build_index(str(out), "Flat", model=built_with)
    (out / "run.json").write_text(json.dumps({"config": {"clip": {"model": "ViT-B-32", "pretrained": None}}}))
    seen = []

    class Fake:
        def __init__(self, spec, device, dtype=None):
            seen.append(spec)

        def embed_texts(self, texts):
            return np.ones((len(texts), 16), np.float32) / 4.0

    monkeypatch.setattr(clip_module, "ClipEmbedder", Fake)
    Searcher(out).search(text="a red circle", k=3)
    assert seen == [ClipSpec(**built_with)]



def test_the_report_names_the_dit_that_was_loaded_not_the_config_default(out):
    """augment.model defaults to DiT-Tiny/4; the demo checkpoint is a DiT-Tiny/2 and the rows say so."""
    from flows.report.summary import collect_summary
    from shardlight.core.layout import STATS_KEY
    from shardlight.core.schema import rows_table, write_table

    table = rows_table([], 16)
    write_table(str(out / "augmented" / "00000.parquet"), table,
                {STATS_KEY: json.dumps({"shard": "00000", "model": "DiT-Tiny/2", "rows": 0}).encode()})
    config = {"augment": {"enabled": True, "model": "DiT-Tiny/4", "checkpoint": "x/shapes-dit.safetensors"}}
    (out / "run.json").write_text(json.dumps({"config": config}))
    assert collect_summary(str(out)).models["augment"] == "DiT-Tiny/2 (shapes-dit.safetensors)"
