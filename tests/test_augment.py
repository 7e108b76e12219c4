"""The DiT augmentation stage: one shard in, a WebDataset tar and a Parquet file out, reproducibly."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from shardlight.core.config import AugmentSpec, ClipSpec, ComputeSpec, LabelSpec, RunConfig, parse_config  # noqa: E402
from shardlight.core.errors import InputError  # noqa: E402
from shardlight.core.layout import (  # noqa: E402
    augment_done,  # noqa: E402
    augmented_path,
    read_stats,
)
from shardlight.core.schema import CORE_COLUMNS  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from shardlight.training.train_dit import DitRecipe, build_demo_model, quick_recipe, save_dit  # noqa: E402
from workers.augment import ShardAugmenter, derive_seed  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.reader import ShardReader  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny torch ops run single-threaded here (see conftest.one_torch_thread)."""


CLIP, LABELS, COMPUTE = ClipSpec(), LabelSpec(kind="vit", model="shapes-vit", top_k=3), ComputeSpec(device="cpu")


@pytest.fixture(scope="module")
def dit_weights(tmp_path_factory) -> Path:
    """A demo-format DiT checkpoint with random (non-zero) adaLN layers, so images depend on seed and label."""
    recipe = quick_recipe(DitRecipe())
    model = build_demo_model(recipe)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in [b.modulation for b in model.blocks] + [model.final.modulation, model.final.linear]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("dit") / "shapes-dit.safetensors"
    save_dit(model, path, recipe, [], 0.0)
    return path


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[str, Path]:
    """One tiny shard and its embeddings file (random demo CLIP/ViT: labels are valid class names)."""
    root = tmp_path_factory.mktemp("aug")
    shard = write_shards(root / "data", shards=1, samples_per_shard=6, seed=5)[0]
    out = root / "out"
    torch.manual_seed(0)
    ShardEmbedder(CLIP, LABELS, COMPUTE).process(str(shard), str(out))
    return str(shard), out


def spec(weights: Path, **overrides) -> AugmentSpec:
    base = dict(enabled=True, checkpoint=str(weights), generate_per_class=1, vary_sources=2, vary_per_source=2,
                steps=3, guidance=2.0, strength=0.5, batch_size=4)
    return AugmentSpec(**{**base, **overrides})


def read_tar(path: str) -> dict[str, dict]:
    """KEY -> {png, json} in tar order, grouped the way WebDataset groups members."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


def run(weights, shard, embedded_out, dest: Path, **overrides) -> dict:
    shutil.copytree(embedded_out / "embeddings", dest / "embeddings", dirs_exist_ok=True)
    torch.manual_seed(123)  # global RNG state must not matter
    return ShardAugmenter(spec(weights, **overrides), CLIP, LABELS, COMPUTE).process(shard, str(dest))


@pytest.mark.timeout(600)
def test_process_writes_tar_and_parquet_reproducibly(dit_weights, embedded, tmp_path):
    shard, out = embedded
    source = pq.read_table(out / "embeddings" / "00000.parquet")
    classes = sorted(set(source.column("label").to_pylist()))
    stats = run(dit_weights, shard, out, tmp_path / "a")
    expected = len(classes) * 1 + 2 * 2
    assert stats["generated"] == stats["rows"] == expected and stats["dropped_low_clip"] == 0
    assert stats["by_mode"] == {"generate": len(classes), "vary": 4}
    assert augment_done(str(tmp_path / "a"), shard)

    tar = read_tar(augmented_path(str(tmp_path / "a"), "00000", "tar"))
    table = pq.read_table(augmented_path(str(tmp_path / "a"), "00000", "parquet"))
    assert set(CORE_COLUMNS) <= set(table.column_names)
    assert {"synthetic", "source_key", "target_label", "mode", "seed", "steps", "guidance", "strength"} \
        <= set(table.column_names)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == list(tar) and len(rows) == expected
    assert all(r["synthetic"] is True and r["image_format"] == "png" for r in rows)
    assert sorted({r["target_label"] for r in rows if r["mode"] == "generate"}) == classes
    source_labels = dict(zip(source.column("key").to_pylist(), source.column("label").to_pylist()))
    for r in rows:
        meta = tar[r["key"]]["json"]
        assert meta["target_label"] == r["target_label"] and meta["mode"] == r["mode"] and meta["steps"] == 3
        assert meta["guidance"] == 2.0 and r["label"] is not None and len(r["image_embedding"]) == 128
        if r["mode"] == "vary":
            assert r["source_key"] in source_labels and r["target_label"] == source_labels[r["source_key"]]
            assert meta["strength"] == 0.5 and meta["seed"] == derive_seed(0, "vary", r["source_key"], int(r["key"][-3:]))
        else:
            assert r["source_key"] is None and meta["strength"] is None
        assert Image.open(io.BytesIO(tar[r["key"]]["png"])).size == (64, 64)
        assert abs(r["clip_score"] - meta["prompt_score"]) < 1e-5
    assert read_stats(augmented_path(str(tmp_path / "a"), "00000", "parquet"))["rows"] == expected
    tar_path = augmented_path(str(tmp_path / "a"), "00000", "tar")
    readable = list(ShardReader(tar_path))  # a real WebDataset shard: the pipeline's reader takes it
    assert [r.key for r in readable] == list(tar) and all(r.image_format == "png" for r in readable)
    blob = Path(tar_path).read_bytes()
    assert all(blob[r["tar_offset"]:r["tar_offset"] + r["tar_size"]] == tar[r["key"]]["png"] for r in rows)

    again = run(dit_weights, shard, out, tmp_path / "b")
    tar_again = read_tar(augmented_path(str(tmp_path / "b"), "00000", "tar"))
    assert again["rows"] == expected
    assert {k: v["png"] for k, v in tar.items()} == {k: v["png"] for k, v in tar_again.items()}
    assert len({v["png"] for v in tar.values()}) == expected  # every seed gives its own image

    run(dit_weights, shard, out, tmp_path / "c", seed=1, modes=["generate"])
    tar_other = read_tar(augmented_path(str(tmp_path / "c"), "00000", "tar"))
    assert set(tar_other) < set(tar)
    assert all(tar_other[k]["png"] != tar[k]["png"] for k in tar_other)


@pytest.mark.timeout(600)
def test_low_clip_scores_are_dropped_and_counted(dit_weights, embedded, tmp_path):
    shard, out = embedded
    stats = run(dit_weights, shard, out, tmp_path, modes=["generate"], classes=["red circle", "blue star"],
                generate_per_class=2, min_clip_score=2.0)  # cosine ≤ 1: everything is dropped
    assert stats["generated"] == 4 and stats["rows"] == 0 and stats["dropped_low_clip"] == 4
    assert len(read_tar(augmented_path(str(tmp_path), "00000", "tar"))) == 0
    assert pq.read_table(augmented_path(str(tmp_path), "00000", "parquet")).num_rows == 0


def test_unknown_configured_class_is_an_error(dit_weights, embedded, tmp_path):
    shard, out = embedded
    with pytest.raises(ValueError, match="not a class of the DiT"):
        run(dit_weights, shard, out, tmp_path, classes=["pink hexagon"])


def test_missing_dit_weights_fail_in_one_line(tmp_path):
    from shardlight.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as err:
        ShardAugmenter(AugmentSpec(enabled=True, checkpoint=str(tmp_path / "none.safetensors")),
                       CLIP, LABELS, COMPUTE)
    assert "\n" not in str(err.value)


def test_augment_config_is_typed_and_off_by_default(tmp_path):
    assert RunConfig().augment.enabled is False
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "shapes-dit.safetensors").write_bytes(b"")
    cfg = parse_config({"augment": {"enabled": True, "checkpoint": "models/shapes-dit.safetensors",
                                    "modes": ["vary"], "strength": 0.4}}, base=tmp_path)
    assert cfg.augment.checkpoint == str(tmp_path / "models" / "shapes-dit.safetensors")
    for bad in ({"strength": 0}, {"modes": ["inpaint"]}, {"sampler": "ddpm"}):
        with pytest.raises(InputError):
            parse_config({"augment": bad})


@pytest.mark.timeout(600)
def test_shard_worker_shares_models_and_runs_each_half_once(dit_weights, embedded, tmp_path):
    """The flow's per-actor worker: embed then augment with the same CLIP and labeler, skipping done halves."""
    from workers.shard_worker import ShardWorker

    shard, _ = embedded
    worker = ShardWorker(CLIP, LABELS, COMPUTE, spec(dit_weights))
    assert worker.augmenter.clip is worker.embedder.clip and worker.augmenter.labeler is worker.embedder.labeler
    first = worker.process(shard, str(tmp_path))
    assert first["embed"]["rows"] == 6 and first["augment"]["rows"] == first["augment"]["generated"] > 0
    assert first["augment_error"] is None
    assert worker.process(shard, str(tmp_path)) == {"shard": "00000", "embed": None, "augment": None,
                                                     "augment_error": None}
    plain = ShardWorker(CLIP, LABELS, COMPUTE, AugmentSpec()).process(shard, str(tmp_path / "plain"))
    assert plain["embed"]["rows"] == 6 and plain["augment"] is None and not augment_done(str(tmp_path / "plain"), shard)


@pytest.mark.timeout(600)
def test_a_failed_augmentation_keeps_the_embeddings_and_is_reported(dit_weights, embedded, tmp_path):
    from shardlight.core.layout import shard_done
    from workers.shard_worker import ShardWorker

    shard, _ = embedded
    worker = ShardWorker(CLIP, LABELS, COMPUTE, spec(dit_weights))

    def broken(shard_url, out):
        raise RuntimeError("CUDA out of memory\nmore detail")

    worker.augmenter.process = broken  # fault injection into our own worker, not a stand-in for Ray or Prefect
    result = worker.process(shard, str(tmp_path))
    assert result["embed"]["rows"] == 6 and shard_done(str(tmp_path), shard)
    assert result["augment"] is None and result["augment_error"] == "RuntimeError: CUDA out of memory"
    assert not augment_done(str(tmp_path), shard)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shard_worker_on_ray_only_augments_an_embedded_shard(dit_weights, embedded, tmp_path):
    """The flow's stage through workers.pool.process_shards (Ray actors): a shard embedded by an earlier run
    (before augmentation was switched on, say) is only augmented."""
    from workers.shard_worker import process_shards

    shard, out = embedded
    shutil.copytree(out / "embeddings", tmp_path / "embeddings")
    cfg = RunConfig(input=shard, output=str(tmp_path), augment=spec(dit_weights),
                    ray={"num_cpus": 2, "num_actors": 1}, compute={"device": "cpu"})
    result = process_shards(cfg, cfg.output, [shard])
    assert not result.failed and len(result.stats) == 1
    (done,) = result.stats
    assert done["embed"] is None and done["augment_error"] is None
    assert done["augment"]["rows"] == done["augment"]["generated"] > 0
    assert result.worker["augment"]["model"] and augment_done(str(tmp_path), shard)


@pytest.mark.timeout(600)
def test_preview_grid_has_a_row_per_class(dit_weights, embedded, tmp_path):
    from flows.report.preview import CELL, GAP, LABEL_W, augment_preview

    shard, out = embedded
    run(dit_weights, shard, out, tmp_path, classes=["red circle", "blue star"], vary_sources=1)
    rows = pq.read_table(augmented_path(str(tmp_path), "00000", "parquet")).to_pylist()
    classes = {r["target_label"] for r in rows}
    png = augment_preview(str(tmp_path), tmp_path / "preview.png", max_per_row=4)
    sheet = Image.open(png)
    assert sheet.size == (LABEL_W + 4 * (CELL + GAP), len(classes) * (CELL + GAP) + GAP)
    varied = next(r for r in rows if r["mode"] == "vary")
    row = sorted(classes).index(varied["target_label"])
    y = GAP + row * (CELL + GAP)
    column = 0 if varied["target_label"] not in ("red circle", "blue star") else 1  # after its generated image
    frame = sheet.getpixel((LABEL_W + column * (CELL + GAP) - 1, y + CELL // 2))
    assert frame == (40, 80, 220)  # the source is framed, its variations follow


def test_preview_without_augmentations_says_so(tmp_path):
    from flows.report.preview import augment_preview

    with pytest.raises(FileNotFoundError, match="augment.enabled"):
        augment_preview(str(tmp_path), tmp_path / "p.png")
