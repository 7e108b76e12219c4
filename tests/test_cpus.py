"""CPU shares: how many CPU actors a cluster gets, how many CPUs each holds, and the threads that follow."""

import torch

from shardlight.core.config import ComputeSpec
from workers.cpus import held_cpus, model_threads
from workers.decoders import auto_decode_workers, decode_between
from workers.pool import cpu_share, gpu_share


def test_cpu_actors_hold_two_cpus_and_a_lone_node_shares_its_odd_one():
    assert cpu_share([2]) == (1, 2)  # the 2-core machine: one actor with both cores
    assert cpu_share([3]) == (1, 3)
    assert cpu_share([16]) == (8, 2)
    assert cpu_share([1]) == (1, 1)
    assert cpu_share([4, 2]) == (3, 2)  # several nodes: two each, never more than a node has
    assert cpu_share([1, 8]) == (9, 1)


def test_gpu_actors_hold_their_share_of_the_gpu_node():
    nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 4}]  # the CPU-only head does not count
    assert gpu_share(nodes, 1.0) == 8.0 and gpu_share(nodes, 0.5) == 4.0 and gpu_share([{"CPU": 2}], 1) == 1.0


def test_threads_outside_ray_keep_the_process_setting(one_torch_thread):
    cpu = torch.device("cpu")
    assert held_cpus() >= 1
    assert model_threads(ComputeSpec(), cpu, 8) == torch.get_num_threads() == 1
    assert model_threads(ComputeSpec(threads=3), cpu, 8) == 3
    assert auto_decode_workers(2, cpu) == 1 and auto_decode_workers(16, torch.device("cuda")) == 15
    assert auto_decode_workers(2, cpu, between=True) == 2


def test_cpu_decoding_goes_between_batches_unless_the_model_is_a_large_fp32_one():
    cpu, cuda, big, small = torch.device("cpu"), torch.device("cuda"), 150_000_000, 5_000_000
    auto = ComputeSpec()
    assert decode_between(auto, cpu, torch.bfloat16, big) and decode_between(auto, cpu, torch.float32, small)
    assert not decode_between(auto, cpu, torch.float32, big)
    assert not decode_between(auto, cuda, torch.bfloat16, small)
    assert decode_between(ComputeSpec(decode_schedule="between"), cpu, torch.float32, big)
    assert not decode_between(ComputeSpec(decode_schedule="beside"), cpu, torch.bfloat16, small)
