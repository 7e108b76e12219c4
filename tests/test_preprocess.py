"""The models' transforms split into uint8 (CPU) + normalise (device), and captions at their real length:
both must give what open_clip and timm give (pixels exactly, text vectors within 1e-5)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shardlight.core.config import CONFIG_DIR, ClipSpec, LabelSpec
from shardlight.core.errors import ModelLoadError
from shardlight.models.clip import ClipEmbedder
from shardlight.models.labelers import build_labeler
from shardlight.models.preprocess import normalize, open_rgb, pixel_spec, to_uint8

CPU = torch.device("cpu")
SHIPPED_CLIP = ClipSpec(model="shapes-clip", pretrained=str(CONFIG_DIR / "models/shapes-clip.safetensors"))
SIZES = [(64, 64), (300, 200), (201, 399), (100, 60), (63, 500), (1000, 225)]
CAPTIONS = [
    "a red circle",
    "",
    "a photo of a small blue square on a green background, slightly rotated, with soft shadows and noise",
    "star",
    " ".join(["a long caption that runs past the context length of every text tower"] * 12),
    "ünïcödé & punctuation!?",
]


@pytest.fixture(scope="module")
def shipped(one_torch_thread):
    return ClipEmbedder(SHIPPED_CLIP, CPU)


@pytest.fixture(scope="module")
def vit_b32(one_torch_thread):
    return ClipEmbedder(ClipSpec(model="ViT-B-32"), CPU)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _assert_split_matches(transform):
    spec = pixel_spec(transform)
    for image in _images():
        expected = transform(image)
        got = normalize(torch.from_numpy(to_uint8(image, spec))[None], spec)[0]
        assert torch.equal(got, expected), image.size


def test_clip_and_vit_transforms_split_exactly(shipped, vit_b32):
    labeler = build_labeler(LabelSpec(kind="vit", model="shapes-vit"), CPU, torch.float32, shipped)
    for transform in (shipped.preprocess, vit_b32.preprocess, labeler.transform):
        _assert_split_matches(transform)
    assert shipped.pixel_spec and vit_b32.pixel_spec.size == 224 and labeler.pixel_spec


def _uint8_and_float_batches(clip):
    """The same images as the uint8 batch the decoder hands over and as the model's own float transform."""
    images = _images()
    uint8 = torch.stack([torch.from_numpy(to_uint8(im, clip.pixel_spec)) for im in images])
    return uint8, torch.stack([clip.preprocess(im) for im in images])


def test_uint8_and_float_batches_embed_alike(shipped):
    uint8, floats = _uint8_and_float_batches(shipped)
    np.testing.assert_allclose(shipped.embed_images(uint8), shipped.embed_images(floats), atol=1e-6)


def test_transforms_that_do_not_split_are_refused():
    from torchvision import transforms as T

    with pytest.raises(ModelLoadError, match="unsupported transform step RandomHorizontalFlip"):
        pixel_spec(T.Compose([T.Resize(64), T.RandomHorizontalFlip(), T.CenterCrop(64)]))
    with pytest.raises(ModelLoadError, match="padding"):
        pixel_spec(T.Compose([T.Resize(32), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))


def test_reduced_jpeg_decode_keeps_the_file_size_and_enough_pixels():
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(buf, "JPEG")
    full, w, h = open_rgb(buf.getvalue())
    small, ws, hs = open_rgb(buf.getvalue(), draft_to=224)
    assert (w, h) == (ws, hs) == (640, 480) and full.size == (640, 480)
    assert small.size == (320, 240)  # 1/2 scale: both sides stay >= 224
    assert open_rgb(buf.getvalue(), draft_to=300)[0].size == (640, 480)  # < 2x: decoded in full


@pytest.mark.parametrize("which", ["shipped", "vit_b32"])
def test_captions_at_real_length_match_open_clip(which, request):
    clip = request.getfixturevalue(which)
    assert clip.cuts_text
    tokens = clip.tokenizer(CAPTIONS)
    assert int((tokens != 0).sum(1).max()) == clip.model.context_length  # one caption fills the context
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(clip.embed_texts(CAPTIONS), expected, atol=1e-5)
    short = CAPTIONS[:2] + CAPTIONS[3:4]  # a batch of short captions runs at its own, shorter length
    np.testing.assert_allclose(clip.embed_texts(short), expected[[0, 1, 3]], atol=1e-5)


@pytest.mark.parametrize("which", ["shipped", "vit_b32"])
def test_captions_in_length_buckets_match_open_clip_in_batch_order(which, request):
    """More captions than one bucket, lengths shuffled: every vector comes back in its caption's place."""
    from shardlight.models.clip import TEXT_BUCKET

    clip = request.getfixturevalue(which)
    rng = np.random.default_rng(7)
    context = clip.model.context_length
    captions = [" ".join(["word"] * int(n)) for n in rng.integers(0, context + 3, size=2 * TEXT_BUCKET + 5)]
    tokens = clip.tokenizer(captions)
    lengths = (tokens != 0).sum(1)
    assert len(set(lengths.tolist())) > 10 and int(lengths.max()) == context
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(clip.embed_texts(captions), expected, atol=1e-5)


def test_towers_that_see_the_padding_keep_the_full_context(shipped):
    from shardlight.models.clip import _cuts_text

    model = shipped.model
    saved = model.text_pool_type
    try:
        model.text_pool_type = "last"  # pooled at the last position: the padding matters
        assert not _cuts_text(model, shipped.tokenizer)
    finally:
        model.text_pool_type = saved
    mask = model.attn_mask
    try:
        model.attn_mask = None  # bidirectional: every token sees the padding
        assert not _cuts_text(model, shipped.tokenizer)
    finally:
        model.attn_mask = mask


def test_cpu_bf16_runs_bf16_weights_close_to_float32(shipped, one_torch_thread):
    """CPU bf16 is bf16 weights without autocast (clip.py's note): parameters stay trainable-looking so the
    attention's input projection folds into one product; vectors stay within bf16 rounding of float32."""
    half = ClipEmbedder(SHIPPED_CLIP, CPU, torch.bfloat16)
    params = list(half.model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in params)
    assert half.logit_scale == shipped.logit_scale  # taken before the cast
    uint8, floats = _uint8_and_float_batches(shipped)
    expected = shipped.embed_images(uint8)
    for got in (half.embed_images(uint8), half.embed_images(floats)):
        assert got.dtype == np.float32
        assert float((got * expected).sum(1).min()) > 0.999
    texts = half.embed_texts(CAPTIONS)
    assert float((texts * shipped.embed_texts(CAPTIONS)).sum(1).min()) > 0.999
