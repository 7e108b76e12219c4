"""What every benchmark prints: the machine, then a table of rates as ratios of a baseline from the same run."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def print_ratios(rows: list[tuple[str, float]], ratio_title: str, first_title: str = "measure") -> None:
    """One line per (name, images/s), each divided by the first row's rate."""
    base = rows[0][1]
    width = max(12, *(len(name) + 2 for name, _ in rows))
    print(f"{first_title:<{width}}{'images/s':>10}{ratio_title:>12}")
    for name, value in rows:
        print(f"{name:<{width}}{value:>10.1f}{value / base:>12.2f}")
