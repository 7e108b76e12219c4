"""How many CPUs a worker holds, and how it splits them between model threads and decode workers.

Ray sets OMP_NUM_THREADS in an actor to its CPU share (at least 1), so torch's default thread count says
nothing about what the actor should use; `held_cpus` reads the share Ray assigned and the worker sets
torch's threads from it explicitly. Outside Ray (tests, a notebook) the process keeps its own settings.
"""

from __future__ import annotations

import math
import os

import torch

from shardlight.core.config import ComputeSpec


def in_ray_actor() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency of the workers
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def held_cpus() -> int:
    """The whole CPUs this worker may use: its Ray share inside an actor, else the process's affinity."""
    if in_ray_actor():
        import ray

        share = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
        return max(1, math.floor(share + 1e-6))
    return len(os.sched_getaffinity(0))


def model_threads(compute: ComputeSpec, device: torch.device, cpus: int) -> int:
    """Torch threads for the model: all held CPUs on a CPU worker (decode workers run niced beside them);
    on a GPU worker the model needs one thread to launch kernels and the rest of the CPUs decode."""
    if compute.threads:
        return compute.threads
    if device.type == "cuda":
        return 1
    return cpus if in_ray_actor() else torch.get_num_threads()


def apply_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
