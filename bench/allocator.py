"""A model worker's allocator setting (workers/memory.py), as the ratio kept ÷ glibc's default.

    python bench/allocator.py [--model ViT-B-32] [--batch-size 64] [--batches 12] [--rounds 3]

Each round runs the CLIP image tower (random weights, no hub) on one same-shaped batch of random pixels
in two fresh processes, one with glibc's default malloc and one after `keep_freed_memory()`, in
alternating order; each process warms up on two batches, then times `--batches` more and counts their
minor page faults. Prints both rates, faults per batch, and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine, median_spread  # noqa: E402

_ONE = """
import json, resource, sys, time, warnings
sys.path.insert(0, {repo!r})
if {kept}:
    from workers.memory import keep_freed_memory
    assert keep_freed_memory()
warnings.filterwarnings("ignore")
import torch, open_clip
torch.manual_seed(0)
model = open_clip.create_model({model!r}, pretrained=None).eval()
size = model.visual.image_size
size = size[0] if isinstance(size, (tuple, list)) else size
pixels = torch.randn({batch}, 3, size, size)
with torch.inference_mode():
    for _ in range(2):
        model.encode_image(pixels)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range({batches}):
        model.encode_image(pixels)
    seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"rate": {batch} * {batches} / seconds, "faults": faults / {batches},
                  "threads": torch.get_num_threads()}}))
"""


def one(args, kept: bool) -> dict:
    code = _ONE.format(repo=str(REPO), kept=kept, model=args.model, batch=args.batch_size, batches=args.batches)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    got: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):
        for kept in (False, True) if r % 2 == 0 else (True, False):
            got[kept].append(one(args, kept))
            print(f"round {r + 1}: {'kept' if kept else 'default'} {got[kept][-1]['rate']:.1f} images/s, "
                  f"{got[kept][-1]['faults']:.0f} page faults per batch", flush=True)
    ratios = [k["rate"] / d["rate"] for d, k in zip(got[False], got[True])]
    print(f"\n{machine()}; {args.model} image tower, random weights, batch {args.batch_size}, "
          f"{got[False][0]['threads']} torch threads; {args.rounds} rounds, alternating, fresh processes")
    for kept, name in ((False, "glibc default"), (True, "freed memory kept")):
        rates = [g["rate"] for g in got[kept]]
        faults = statistics.median(g["faults"] for g in got[kept])
        print(f"{name:<20} {median_spread(rates)} images/s, {faults:,.0f} page faults per batch")
    print(f"kept ÷ default: median {statistics.median(ratios):.3f} (per round {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
