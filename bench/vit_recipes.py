"""Which small ViT learns colour AND shape of the demo data, in how many steps (the sweep behind shapes-vit).

    python bench/vit_recipes.py VARIANT [--steps 2000] [--batch-size 64] [--lr 2e-3] [--threads 1]

Trains one variant on a freshly rendered batch every step (`shardlight.training.demo_models.fresh_batches`) and prints
held-out top-1 and shape-only accuracy every 250 steps, then one `RESULT {json}` line. Run several variants
side by side on a GPU machine; docs/models.md records the comparison. Variants:

  vit8        plain ViT, 8x8 patches, width 96, depth 6         (64 tokens)
  vit4        plain ViT, 4x4 patches, width 64, depth 6         (256 tokens)
  hybrid2     conv stem 32-64 (2 blocks) + 2x2 patches, depth 6 (64 tokens)
  hybrid2s    conv stem 16-32 (2 blocks) + 2x2 patches, depth 4 (64 tokens)
  hybrid3     conv stem 16-32-64 (3 blocks) + 1x1 patches, depth 4 — the shipped `shapes_vit_hybrid`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.vision_transformer_hybrid import HybridEmbed  # noqa: E402

from shardlight.models.architectures import conv_stem, default_cfgs  # noqa: E402
from shardlight.training.demo_models import fresh_batches, warmup_cosine  # noqa: E402
from shardlight.training.synthetic import CLASS_NAMES, SHAPES  # noqa: E402

VARIANTS = {
    "vit8": dict(patch_size=8, embed_dim=96, depth=6),
    "vit4": dict(patch_size=4, embed_dim=64, depth=6),
    "hybrid2": dict(patch_size=2, embed_dim=64, depth=6, embed_layer=partial(HybridEmbed, backbone=conv_stem((32, 64)))),
    "hybrid2s": dict(patch_size=2, embed_dim=64, depth=4,
                     embed_layer=partial(HybridEmbed, backbone=conv_stem((16, 32)))),
    "hybrid3": dict(patch_size=1, embed_dim=64, depth=4,
                    embed_layer=partial(HybridEmbed, backbone=conv_stem((16, 32, 64)))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, num_classes=len(CLASS_NAMES), num_heads=4, **VARIANTS[args.variant])
    model.to(device)
    cfg = default_cfgs["shapes_vit_hybrid"].default.to_dict()  # the shipped model's input normalisation
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 64, 64), mean=cfg["mean"], std=cfg["std"], crop_pct=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, 200, args.steps))
    eval_x, eval_y = next(fresh_batches(seed=1001, batch_size=960, steps=1, transform=transform))
    eval_x, eval_y = eval_x.to(device), eval_y.to(device)
    curve, start = [], time.time()
    train = fresh_batches(seed=0, batch_size=args.batch_size, steps=args.steps, transform=transform)
    for step in range(args.steps + 1):
        if step % 250 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                predicted = model(eval_x).argmax(1)
            model.train()
            top1 = (predicted == eval_y).float().mean().item()
            shape = (predicted % len(SHAPES) == eval_y % len(SHAPES)).float().mean().item()
            curve.append((step, round(top1, 3), round(shape, 3)))
            print(f"{args.variant} step {step}: top-1 {top1:.3f}, shape {shape:.3f} ({time.time() - start:.0f} s)",
                  flush=True)
        if step == args.steps:
            break
        x, y = next(train)
        loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print("RESULT", json.dumps({**{k: v for k, v in vars(args).items()}, "device": device, "curve": curve}))


if __name__ == "__main__":
    main()
