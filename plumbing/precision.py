"""Numerics per device: the dtype every command computes in by default, and TF32.

    CUDA  bfloat16, and TF32 for the float32 matrix products that remain (inputs rounded to a
          10-bit mantissa, float32 accumulation; exact for bfloat16 inputs)
    CPU   float32

train.py runs bfloat16 as autocast over float32 weights and optimizer state; hinted_decode.py,
eval.py and ddt.py load the weights in the dtype. Whatever the dtype, the statistics are
float32: ddt.log_probs casts the logits before any softmax, and ddt.py forms its logits in float32.
"""

import torch

DTYPES = ("float32", "bfloat16")  # the choices of every --dtype


def compute_dtype(name: str | None, device) -> str:
    """The value of `--dtype name` on `device`: `name`, or "bfloat16" on CUDA and "float32"
    elsewhere (getattr(torch, ...) gives the dtype). On CUDA it also turns TF32 on."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return name or ("bfloat16" if cuda else "float32")
