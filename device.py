"""Where and in what precision the models run: the DEVICE and PRECISION settings resolved for torch. Shared by the
detector and the segmenter."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; any other value ('cpu', 'cuda', 'cuda:N') as it is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype the image encoders and Grounding DINO run in under autocast; None: float32, no autocast.

    precision (config.PRECISIONS): 'auto' is bfloat16 on CUDA (float16 on GPUs without bfloat16) and float32 on
    CPU, where autocast is slower than float32 on most processors; 'fp32', 'bf16', 'fp16' anywhere."""
    if precision == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: str, dtype: torch.dtype | None):
    """torch.autocast on the device's type in `dtype`; a no-op context for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def allow_tf32(precision: str, device: str) -> None:
    """On CUDA, let float32 matmuls and convolutions (what stays float32: Grounding DINO's transformer, SAM's mask
    decoder) use TF32 tensor cores, unless PRECISION=fp32 asks for full float32. Process-wide, as torch has it."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def in_warmed_batches(run, batch: torch.Tensor, sizes: tuple[int, ...]):
    """`run(batch)` for a function compiled with static shapes and warmed up at the batch sizes `sizes` (ascending):
    in chunks of the largest, each padded with zero images up to the smallest warmed size that holds it, the padding's
    outputs dropped, so no other batch size reaches it (it would compile again, in the middle of a request). Only for
    models whose images don't interact. `run` returns a (B, ...) tensor or a tuple of them; so does this."""
    largest, chunks = sizes[-1], []
    for chunk in batch.split(largest):
        size = next(s for s in sizes if s >= len(chunk))
        out = run(torch.cat([chunk, chunk.new_zeros(size - len(chunk), *chunk.shape[1:])]))
        chunks.append(out[: len(chunk)] if isinstance(out, torch.Tensor) else tuple(o[: len(chunk)] for o in out))
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    return tuple(torch.cat(level) for level in zip(*chunks, strict=True))


def dtype_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16', as PRECISION spells them (for /health and the log)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def to_float(value):
    """`value` with its floating tensors in float32: a tensor, or lists, tuples and dicts of them (a transformers
    ModelOutput is a dict), or objects with `tensors` (groundingdino's NestedTensor), changed in place."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(to_float(v) for v in value)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = to_float(value[key])
        return value
    if hasattr(value, "tensors"):
        value.tensors = to_float(value.tensors)
    return value


class Autocast(torch.nn.Module):
    """Wraps a submodule of a model so that it runs under autocast in `dtype` and hands float32 on: the rest of
    the model sees the tensors it always did. Indexing reaches the wrapped module (Grounding DINO indexes its
    backbone)."""

    def __init__(self, module: torch.nn.Module, device: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device, self.dtype = module, device, dtype

    def forward(self, *args, **kwargs):
        with autocast(self.device, self.dtype):
            return to_float(self.module(*args, **kwargs))

    def __getitem__(self, index):
        return self.module[index]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
