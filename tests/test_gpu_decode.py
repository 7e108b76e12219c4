"""GPU decoding (workers/gpu_decode.py) against the CPU decoder: same rows, same error records, close pixels.

The choice of decoder and its errors run everywhere. The GpuDecoder's own logic (routing by JPEG header,
retrying a failed batch image by image, CPU fallbacks, shard order) also runs on a CPU device, where it
uses torchvision's CPU JPEG decoder; the tests marked `gpu` run it with nvJPEG on a CUDA GPU
(`pytest -m gpu tests/test_gpu_decode.py`) and compare embeddings with the CPU decoding path.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec, parse_config
from shardlight.core.errors import InputError
from shardlight.core.layout import embeddings_path, errors_path
from shardlight.models.preprocess import PixelSpec, to_uint8
from shardlight.training.photos import sample as photo_sample
from shardlight.training.photos import write_photo_shards
from tests.conftest import write_tar
from workers.decode import CpuDecoder, DecodeSpecs
from workers.decoders import make_decoder
from workers.embed import ShardEmbedder
from workers.gpu_decode import GpuDecoder, fit, gpu_decodable
from workers.reader import ShardReader

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CLIP_SPEC = PixelSpec(224, 224, "bicubic", (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
SMALL_SPEC = PixelSpec(72, 64, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# torchvision >= 0.29 marks its image decoders deprecated (in favour of TorchCodec); they still work.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _photo(seed: int, side: int = 256) -> Image.Image:
    return Image.open(io.BytesIO(photo_sample(random.Random(seed), "x", side)["jpg"])).convert("RGB")


ODD_FORMATS = {  # name -> (member extension, bytes maker); the first is the only one the GPU takes
    "gray": ("jpg", lambda img: _encode(img.convert("L"), quality=90)),
    "progressive": ("jpg", lambda img: _encode(img, quality=90, progressive=True)),
    "cmyk": ("jpg", lambda img: _encode(img.convert("CMYK"), quality=90)),
    "png": ("png", lambda img: _encode(img, "PNG")),
}


def write_odd_shard(path, per_kind: int = 3):
    """Baseline JPEGs and every ODD_FORMATS kind, interleaved, with captions."""
    samples = []
    for i in range(per_kind):
        samples.append({"__key__": f"base{i}", "jpg": _encode(_photo(i), quality=95), "txt": b"a photo"})
        for name, (ext, make) in ODD_FORMATS.items():
            samples.append({"__key__": f"{name}{i}", ext: make(_photo(100 + i)), "txt": f"a {name} image".encode()})
    return write_tar(path, samples)


# --- the choice of decoder (CI) ---------------------------------------------------------------------------

def test_decode_setting_is_validated_in_one_line():
    assert parse_config({"compute": {"decode": "gpu"}}).compute.decode == "gpu"
    with pytest.raises(InputError) as err:
        parse_config({"compute": {"decode": "tpu"}})
    assert "compute.decode" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_decode_without_cuda_is_a_one_line_error():
    specs = DecodeSpecs(CLIP_SPEC)
    with pytest.raises(InputError) as err:
        make_decoder(ComputeSpec(decode="gpu"), torch.device("cpu"), specs, cpus=1, batch_size=8)
    assert str(err.value) == "compute.decode is 'gpu' but this worker has no CUDA GPU"
    with pytest.raises(InputError, match="no CUDA GPU"):
        ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="none"), ComputeSpec(decode="gpu"))


def test_auto_and_cpu_decode_on_a_cpu_worker_use_the_cpu_decoder():
    specs = DecodeSpecs(CLIP_SPEC)
    for want in ("auto", "cpu"):
        decoder = make_decoder(ComputeSpec(decode=want, decode_workers=0), torch.device("cpu"), specs, 1, 8)
        assert type(decoder) is CpuDecoder and decoder.describe()["decode"] == "cpu"


def test_a_transform_without_pixel_spec_cannot_use_the_gpu_decoder():
    specs = DecodeSpecs(CLIP_SPEC, label=lambda image: image)  # a transform the GPU cannot reproduce
    assert not GpuDecoder.supports(specs) and GpuDecoder.supports(DecodeSpecs(CLIP_SPEC, SMALL_SPEC))
    with pytest.raises(InputError, match="resize \\+ centre crop"):
        GpuDecoder(ComputeSpec(), torch.device("cpu"), specs)


# --- routing and geometry (CI) ----------------------------------------------------------------------------

def test_only_complete_baseline_jpegs_go_to_the_gpu():
    img = _photo(1)
    baseline = _encode(img, quality=95)
    assert gpu_decodable(baseline) and gpu_decodable(ODD_FORMATS["gray"][1](img))
    for name in ("progressive", "cmyk", "png"):
        assert not gpu_decodable(ODD_FORMATS[name][1](img)), name
    assert not gpu_decodable(baseline[: len(baseline) // 2])  # truncated: no EOI
    assert not gpu_decodable(b"\xff\xd8\xff\xe0 this is not a jpeg")
    assert not gpu_decodable(_encode(img, "WEBP")) and not gpu_decodable(b"")


@pytest.mark.parametrize("size", [(256, 256), (256, 400), (333, 256), (100, 90)])
@pytest.mark.parametrize("spec", [CLIP_SPEC, SMALL_SPEC], ids=["bicubic224", "bilinear64"])
def test_tensor_resize_and_crop_match_the_pil_transform(size, spec):
    img = _photo(7).resize(size, Image.Resampling.BICUBIC)
    expected = to_uint8(img, spec).astype(int)
    got = fit([torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())], spec)[0].numpy().astype(int)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 3  # antialiased float resize vs PIL's fixed point


# --- the decoder's own logic on a CPU device (CI) --------------------------------------------------------

def _decode_all(decoder, url: str):
    metas, clip, errors = [], [], []
    for batch in decoder.batches(ShardReader(url)):
        metas += [(m.raw.key, m.width, m.height) for m in batch.samples]
        errors += [(e.key, e.stage, e.reason, e.dropped) for e in batch.errors]
        if batch.samples:
            clip.append(batch.clip.cpu())
    return metas, (torch.cat(clip) if clip else None), errors


def _pair(device: torch.device, batch_size: int = 4):
    specs = DecodeSpecs(CLIP_SPEC, SMALL_SPEC, draft=False)
    return (GpuDecoder(ComputeSpec(), device, specs, cpus=2, batch_size=batch_size),
            CpuDecoder(specs, workers=0, batch_size=batch_size))


def _same_output(gpu: GpuDecoder, cpu: CpuDecoder, url: str, max_mean_diff: float = 1.0):
    got, want = _decode_all(gpu, url), _decode_all(cpu, url)
    assert got[0] == want[0] and got[2] == want[2]  # keys, sizes and error records, in order
    if want[1] is not None:
        # nvJPEG's IDCT and chroma upsampling are not libjpeg's: pixels differ more on a GPU (embeddings are
        # compared below); on a CPU both sides use libjpeg and only the resize differs.
        slack = 3.0 if gpu.device.type == "cuda" else 1.0
        assert (got[1].float() - want[1].float()).abs().mean() < max_mean_diff * slack
    return got


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_hostile_shards_give_the_cpu_decoders_rows_and_error_records(device, damaged_shards):
    gpu, cpu = _pair(torch.device(device))
    for shard in sorted(damaged_shards["dir"].glob("*.tar")):
        _same_output(gpu, cpu, str(shard))
    assert gpu.stats["errors"] == 1 and gpu.stats["fallbacks"] == 1  # the corrupt JPEG, by header


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_odd_formats_fall_back_to_the_cpu_and_land(device, tmp_path):
    shard = write_odd_shard(tmp_path / "odd.tar")
    gpu, cpu = _pair(torch.device(device))
    metas, _, errors = _same_output(gpu, cpu, str(shard), max_mean_diff=1.5)
    assert len(metas) == 15 and errors == []
    assert gpu.stats["fallbacks"] == 9 and gpu.stats["gpu"] == 6  # progressive, CMYK, PNG; not gray


def test_a_failed_batch_is_retried_image_by_image(tmp_path, monkeypatch):
    shard = write_photo_shards(tmp_path / "d", 1, 10, seed=2)[0]
    gpu, cpu = _pair(torch.device("cpu"), batch_size=8)
    poison = next(s.image for s in ShardReader(str(shard)) if s.key.endswith("0003"))
    real = gpu.backend.decode

    def refuse_poison(datas):  # like nvJPEG meeting a stream it cannot decode: the whole call fails
        if poison in datas:
            raise RuntimeError("Error while decoding JPEG images")
        return real(datas)

    monkeypatch.setattr(gpu.backend, "decode", refuse_poison)
    metas, _, errors = _same_output(gpu, cpu, str(shard))
    assert len(metas) == 10 and errors == []
    assert gpu.stats["retries"] == 1 and gpu.stats["fallbacks"] == 1 and gpu.stats["gpu"] == 9


def test_a_consumer_that_stops_early_leaves_no_thread_behind(tmp_path):
    import threading

    shard = write_photo_shards(tmp_path / "d", 1, 24, seed=3)[0]
    gpu, _ = _pair(torch.device("cpu"), batch_size=4)
    batches = gpu.batches(ShardReader(str(shard)))
    assert len(next(batches).samples) == 4
    batches.close()  # e.g. the model raised: the reading and decoding threads must end, not block
    assert not [t for t in threading.enumerate() if t.name.startswith("decode-") and t.is_alive()]


# --- on a GPU: embeddings against the CPU decoding path --------------------------------------------------

def _embeddings(out, shard) -> dict:
    table = pq.read_table(embeddings_path(str(out), shard.stem))
    return {"key": table["key"].to_pylist(), "image": np.array(table["image_embedding"].to_pylist()),
            "label": table["label"].to_pylist() if "label" in table.column_names else None}


def _gpu_vs_cpu_decode(clip: ClipSpec, labels: LabelSpec, shards, tmp_path, batch_size: int = 64):
    """Rows of the same shards embedded on the GPU, decoded once on the CPU and once on the GPU."""
    runs = {}
    for decode in ("cpu", "gpu"):
        embedder = ShardEmbedder(clip, labels, ComputeSpec(device="cuda", decode=decode, batch_size=batch_size))
        assert embedder.describe()["decode"] == decode
        for shard in shards:
            stats = embedder.process(str(shard), str(tmp_path / decode))
        embedder.close()
        runs[decode] = [_embeddings(tmp_path / decode, s) for s in shards]
        runs[decode + "_stats"] = stats
    cos, agree = [], []
    for on_cpu, on_gpu in zip(runs["cpu"], runs["gpu"]):
        assert on_cpu["key"] == on_gpu["key"]
        cos.append((on_cpu["image"] * on_gpu["image"]).sum(axis=1))
        if on_cpu["label"] is not None:
            agree += [a == b for a, b in zip(on_cpu["label"], on_gpu["label"])]
    return np.concatenate(cos), agree, runs


@pytest.mark.gpu
@cuda
def test_gpu_decoded_photo_embeddings_match_the_cpu_path(tmp_path):
    shards = write_photo_shards(tmp_path / "photos", 2, 128, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cos, _, runs = _gpu_vs_cpu_decode(ClipSpec(model="ViT-B-32"), LabelSpec(kind="none"), shards, tmp_path)
    print(f"ViT-B-32 photo-like: mean cosine {cos.mean():.5f}, min {cos.min():.5f}")
    assert cos.mean() >= 0.995 and cos.min() >= 0.98
    assert runs["gpu_stats"]["decode_fallbacks"] == 0


@pytest.mark.gpu
@cuda
def test_gpu_decoded_demo_embeddings_and_labels_match_the_cpu_path(tmp_path):
    from shardlight.training.synthetic import write_shards

    shards = write_shards(tmp_path / "demo", 2, 96, seed=4)
    cos, agree, _ = _gpu_vs_cpu_decode(ClipSpec(model="shapes-clip"), LabelSpec(kind="vit", model="shapes-vit"),
                                       shards, tmp_path)
    print(f"demo: mean cosine {cos.mean():.5f}, min {cos.min():.5f}, labels agree {np.mean(agree):.3f}")
    assert cos.mean() >= 0.995 and cos.min() >= 0.98 and np.mean(agree) >= 0.95


@pytest.mark.gpu
@cuda
def test_odd_formats_land_with_close_embeddings_on_the_gpu(tmp_path):
    shard = write_odd_shard(tmp_path / "odd.tar", per_kind=4)
    cos, _, runs = _gpu_vs_cpu_decode(ClipSpec(model="ViT-B-32"), LabelSpec(kind="none"), [shard], tmp_path, 8)
    assert len(cos) == 20 and cos.min() >= 0.98
    assert runs["gpu_stats"]["decode_fallbacks"] == 12 and runs["gpu_stats"]["rows"] == 20


@pytest.mark.gpu
@cuda
def test_hostile_shards_embed_to_the_same_rows_and_errors_on_the_gpu(damaged_shards, tmp_path):
    for decode in ("cpu", "gpu"):
        embedder = ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="vit", model="shapes-vit"),
                                 ComputeSpec(device="cuda", decode=decode, batch_size=4))
        for shard in sorted(damaged_shards["dir"].glob("*.tar")):
            embedder.process(str(shard), str(tmp_path / decode))
        embedder.close()
    for shard in sorted(damaged_shards["dir"].glob("*.tar")):
        tables = {d: pq.read_table(errors_path(str(tmp_path / d), shard.stem)).to_pylist() for d in ("cpu", "gpu")}
        assert tables["cpu"] == tables["gpu"]
        keys = {d: pq.read_table(embeddings_path(str(tmp_path / d), shard.stem))["key"].to_pylist()
                for d in ("cpu", "gpu")}
        assert keys["cpu"] == keys["gpu"]


# --- captions tokenised in helper processes (CI) ---------------------------------------------------------

def test_text_pool_tokenises_like_the_model_in_order():
    from shardlight.models.clip import ClipEmbedder
    from workers.text import TextPool, text_processes

    assert text_processes("cpu", 16) == 0 and text_processes("cuda", 2) == 0 and text_processes("cuda", 16) == 4
    clip = ClipEmbedder(ClipSpec(model="shapes-clip"), torch.device("cpu"))
    batches = [[f"a red circle number {i} " * (i % 5 + 1) for i in range(b, b + 7)] for b in range(0, 35, 7)]
    batches.insert(2, [])  # a batch without captions
    pool = TextPool("shapes-clip", processes=1, chunk=3)
    try:
        got = list(pool.ahead(iter(batches), lambda texts: texts, depth=2))
    finally:
        pool.close()
    assert [item for item, _ in got] == batches
    for texts, tokens in got:
        if not texts:
            assert tokens is None
            continue
        assert np.array_equal(tokens, clip.tokenizer(texts).numpy())
        assert np.allclose(clip.embed_tokens(tokens), clip.embed_texts(texts))
