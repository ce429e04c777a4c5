"""Mixed precision for training: a bfloat16 model for the forward and backward passes,
float32 master weights and float32 AdamW state (Micikevicius et al., "Mixed Precision
Training", 2018; what DeepSpeed's bf16 mode did for the paper's runs).

    precision = resolve("auto", device)           # "bf16" where the hardware runs it fast, else "fp32"
    model = ...float32 model...
    master = MasterWeights(model, precision)      # keeps float32 copies, casts the model to bf16
    optimizer = AdamW(master.params, ...)         # the optimizer only ever sees float32 tensors
    loss.backward(); master.collect_grads()       # after every backward: bf16 grads -> float32
    clip_grad_norm_(master.params); optimizer.step(); master.push()   # float32 -> bf16 model

Why not `torch.autocast`: autocast keeps float32 weights and casts each one to bf16 at
every call. In the sampler's decode loop (one token per step, weights read every step)
that re-cast costs more than it saves: measured (in an earlier session, on a CPU with
bf16 instructions) a decode step of 16 rows took 130 ms under autocast, 56 ms with bf16
weights, 103 ms in float32; a forward+backward of 8 x 256 tokens 5.0 s, 2.9 s and 8.6 s. A bf16 copy of the weights
is read by every forward (sampling, evaluation, training) at the bf16 price.

Why float32 master weights: AdamW's update at lr 1e-6 is far below bf16's resolution
(8 bits of mantissa: a weight of 0.05 moves in steps of 2.4e-4), so updating bf16
weights directly rounds almost every update away (measured: 0.4% of the embedded
model's weights changed after one step at lr 1e-6). The float32 master accumulates them.

Why "auto" checks the hardware: on a CPU without bf16 units (e.g. AMD Zen 3, AVX2
only) bf16 matrix products are emulated: a forward+backward of the embedded model on
8 x 256 tokens took 490 s in bf16 against 22-30 s in float32 on such a machine.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16), which
    oneDNN uses for bf16 matrix products. Asked of torch's own CPU feature check, with
    /proc/cpuinfo's flags as a fallback where torch does not expose it."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(c is not None for c in checks):
        return any(c() for c in checks)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def resolve(precision: str, device) -> str:
    """"fp32" or "bf16" for a --precision flag. auto: bf16 on a CUDA GPU that supports
    it and on a CPU with bf16 units, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if str(device) == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"  # other backends (mps, xpu): the safe choice


def cast_params(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the model's floating-point parameters to `dtype` in place (the Parameter
    objects stay, tied weights stay tied) and leave its buffers as they are. Not
    model.to(dtype), which casts the buffers too, among them the rotary embedding's
    inv_freq and original_inv_freq: transformers computes them in float32 and keeps them
    float32 even in from_pretrained(dtype=bfloat16) (checked with transformers 5.23 on
    the embedded Llama; Qwen2's rotary embedding is the same code). A model cast with
    .to() would then turn its rotary angles from a bf16-rounded inv_freq, and be another
    policy than the same weights loaded in bf16, which is how evaluate.py loads them."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


CAST_CHUNK = 1 << 21  # elements per float32 temporary in add_float (8 MB)


def add_float(dst: torch.Tensor, src: torch.Tensor, chunk: int = CAST_CHUNK) -> None:
    """dst (float32) += src (bf16, dense or sparse), the exact float32 sum.

    Cast first: on the CPU a float32 += bf16 add_ takes a slow mixed-dtype loop (about 6x
    an all-float32 add_, 2.5x the cast plus the add); the cast is exact, so the sum is bit
    for bit the same. Cast a dense gradient in slices of rows of at most `chunk` elements:
    a whole vocabulary-sized one (the tied embedding's, 113 MB in float32) is above glibc's
    mmap threshold, so each backward pass's cast got fresh pages that the kernel zero-fills
    and takes back on free; an 8 MB slice reuses the same heap memory every time
    (docs/performance.md, issue 23)."""
    if src.is_sparse or src.dim() == 0 or src.numel() <= chunk:
        dst.add_(src.float())
        return
    rows = max(1, chunk // src[0].numel())
    for i in range(0, src.shape[0], rows):
        dst[i:i + rows].add_(src[i:i + rows].float())


class MasterWeights:
    """float32 master copies of a model's trainable weights; the model itself is cast to
    the compute dtype. In fp32 the master weights *are* the model's parameters, and
    every method below is a no-op, so the training loop is the same in both precisions.

    `params` go to the optimizer and to gradient clipping; `collect_grads` after each
    backward moves the model's (bf16) gradients into the master's float32 .grad, so
    gradient accumulation over micro-batches happens in float32; `push` copies the
    updated master weights back into the model after each optimizer step;
    `state_dict` is the model's state dict with the float32 master tensors, for saving.
    """

    def __init__(self, model: torch.nn.Module, precision: str = "fp32"):
        if precision not in DTYPES:
            raise ValueError(f"MasterWeights needs a resolved precision (fp32 or bf16), got {precision!r}")
        self.model = model
        self.dtype = DTYPES[precision]
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.model_params):
            raise ValueError("MasterWeights takes a float32 model (it keeps the float32 values as the master copy)")
        self.mixed = self.dtype != torch.float32
        if self.mixed:
            self.params = [p.detach().clone().requires_grad_(True) for p in self.model_params]
            cast_params(model, self.dtype)  # the parameters only: buffers stay as a bf16 load leaves them
        else:
            self.params = self.model_params

    def collect_grads(self) -> None:
        """Add the model's gradients (bf16) into the master gradients (float32) and free them."""
        if not self.mixed:
            return
        for m, p in zip(self.params, self.model_params):
            if p.grad is None:
                continue
            if m.grad is None:  # a sparse embedding gradient (logprobs.lean_backward) is made dense once
                m.grad = (p.grad.to_dense() if p.grad.is_sparse else p.grad).float()
            else:
                add_float(m.grad, p.grad)
            p.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.mixed:
            for p in self.model_params:
                p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Copy the master weights into the model, rounded to the compute dtype."""
        if self.mixed:
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)

    def state_dict(self) -> dict:
        """The model's state dict with float32 tensors: the master copy of every trainable
        weight (tied weights map to the same tensor), other entries cast to float32."""
        master = {id(p): m for p, m in zip(self.model_params, self.params)}
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in master:
                out[name] = master[id(t)].detach()
            else:
                out[name] = t.detach().float() if t.is_floating_point() else t.detach()
        return out
