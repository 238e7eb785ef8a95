"""Where the models run: the DEVICE setting resolved to a torch device. Shared by the detector and the segmenter."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; any other value ('cpu', 'cuda', 'cuda:N') as it is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
