"""A model worker keeps the memory it frees: the next batch's activations reuse already mapped pages."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# In a fresh process: an MLP over same-shaped batches, its 40 MiB hidden activations freed after each layer,
# as a CLIP tower's are (ViT-B-32's MLP at batch 64: 39 MiB); prints the page faults of the eighth batch
# (kept, the heap stops growing within the first four; by default every batch faults ~40,000 pages).
# Above 32 MiB glibc always maps a block afresh by default; below it, its dynamic mmap threshold makes the
# default case depend on the order of earlier frees (a 13 MiB probe passed and failed by turns).
_PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
if {kept}:
    from workers.memory import keep_freed_memory
    assert keep_freed_memory()
import torch
torch.set_num_threads(1)
up, down = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
batch = torch.randn(10240, 256)
with torch.inference_mode():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = batch
        for _ in range(2):
            x = down(torch.nn.functional.gelu(up(x)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_a_late_batch(kept: bool) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(repo=str(REPO), kept=kept)], capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_workers_later_batches_reuse_mapped_pages():
    assert _faults_of_a_late_batch(kept=False) > 1000  # glibc's default: large blocks mapped anew each time
    assert _faults_of_a_late_batch(kept=True) < 100
