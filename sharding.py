"""FSDP2 for models that do not fit one GPU (train.py --fsdp under torchrun).

The paper trained Qwen2.5-7B on 8 GPUs with DeepSpeed ZeRO-3. Its float32 weights,
gradients and AdamW state (about 112 GB) fit no single GPU, so here, as in ZeRO-3,
each of the N processes holds 1/N of them, with PyTorch's own engine,
torch.distributed.fsdp.fully_shard (FSDP2):

- wrap: each decoder layer is one FSDP unit, the root (embeddings, final norm, LM
  head) another. Every parameter becomes a float32 DTensor sharded along dim 0:
  those shards ARE the master weights (no precision.MasterWeights), and AdamW's
  state is sharded with them. A unit's shards are all-gathered into a whole copy in
  the compute dtype (MixedPrecisionPolicy(param_dtype=bf16) in bf16) just before it
  runs, and freed after its forward and after its backward.
- gradients: after every backward, each unit's gradient is reduce-scattered in
  float32 and added to the float32 shards' .grad, so gradient accumulation over the
  update's micro-batches and shared prompts (logprobs.Prefix.backward) happens in
  float32 in 1/N of the memory. The engine would average over the processes; the
  loss is already divided by the global normalizer, so it is told to SUM
  (set_gradient_divide_factor(1) with sum reductions), as train.sum_gradients does
  without FSDP. A reduce-scatter per backward costs more messages than one at the
  last backward (set_requires_gradient_sync(False) before the others), but that
  would keep every unit's whole float32 gradient on every GPU until then: the
  memory this mode exists to save.
- the root: logprobs calls model.base_model and the LM head directly (only the
  vocabulary rows that the loss needs go through the head), which bypasses the
  root's FSDP hooks. So the update gathers the root's weights at the start of each
  optimizer step and frees them after it (ShardedWeights.zero_grad and push); the
  decoder layers are FSDP units of their own and gather themselves as they run, for
  the backward when the gradient reaches their output: a shared prompt's backward
  (logprobs.Prefix) starts from its keys and values, so it also sends a zero gradient
  through the last hidden state (Prefix(through_output=True)).
- lockstep: all-gathers and reduce-scatters are collectives, so every process must
  run the same passes in the same order. Processes train different episodes, so
  lockstep_plan pads each one's plan of micro-batches to the longest over the
  processes with idle passes (a forward and a backward that add exactly 0).
- sampling, evaluation and the probe: gathered() all-gathers every unit once and
  keeps the whole compute-dtype model through the decode loop (each unit gathered
  once per training step's sampling, not once per decoded token), then frees it.
- checkpoints: save_checkpoint gathers the full float32 state dict onto rank 0's CPU
  and writes the usual Hugging Face folder (checkpoint.py, which plain transformers
  loads), and each process writes its optimizer shards with torch.distributed
  .checkpoint (DCP) into checkpoint/optimizer/; --resume loads the model from the
  folder and the shards back, on the same number of processes.

Tested with gloo on CPU (test_distributed.py), not on GPUs. Not sharded: the frozen
reference model of --beta > 0 (a whole compute-dtype copy per process). Every
process loads the whole float32 model onto its CPU before sharding it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

import checkpoint
import logprobs


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (those transformers keeps whole when splitting a
    model: `_no_split_modules`, e.g. LlamaDecoderLayer, Qwen2DecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"--fsdp: no decoder layers found in {type(model).__name__} (no _no_split_modules)")
    return layers


def wrap(model, precision: str, device="cpu", mesh=None):
    """Shard a float32 model (on the CPU or on `device`) over the processes, onto
    `device`: fully_shard each decoder layer, then the root, in place; the module is
    returned. `mesh`: a 1-D DeviceMesh (default: all processes, on `device`'s type)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    logprobs._head_on_positions_ok(model)  # cached on the model now: under FSDP it would be a collective
    bf16 = torch.bfloat16 if precision == "bf16" else None  # None: compute in the parameters' float32
    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for unit in units(model):
        unit.set_gradient_divide_factor(1.0)  # sum over the processes, not the mean
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    model.set_reshard_after_backward(False, recurse=False)  # the root stays gathered through an update
    # The engine takes the first unit to run a forward for the root; the probe runs the
    # layers without the root's forward, so run one through the root now.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    model.reshard()
    return model


def units(model) -> list:
    """The model's FSDP units: the decoder layers, then the root."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)][::-1]


@contextlib.contextmanager
def gathered(model):
    """The whole model, in the compute dtype, on every process for the duration:
    every unit all-gathered once and kept (not freed after each forward), for
    sampling, evaluation and the probe, which run many small forwards. Every process
    must enter it (the all-gathers are collectives); inside, forwards communicate
    nothing, so rank 0 may evaluate alone."""
    us = units(model)
    for u in us:
        u.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for u in us:
            u.reshard()
        model.set_reshard_after_forward(True)  # the layers: free after forward
        model.set_reshard_after_forward(False, recurse=False)  # the root's default


class ShardedWeights:
    """precision.MasterWeights' interface over a wrapped model, for train.update: the
    float32 shards are the master weights, and the engine puts the float32 gradients
    on them, so collect_grads has nothing to do."""

    def __init__(self, model):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]  # float32 DTensor shards

    def zero_grad(self) -> None:
        """Start an optimizer step: no gradients, the root's weights gathered (see the
        module docstring: logprobs calls the root's submodules directly)."""
        for p in self.params:
            p.grad = None
        # Forget the forwards since the last backward (sampling, the probe: as many as each
        # process decoded tokens), from which the engine would pick the units to prefetch
        # in the first backward: every process must pick the same.
        self.model.reset_iter_state()
        self.model.unshard()  # the root unit only

    def collect_grads(self) -> None:
        pass

    def push(self) -> None:
        """After the optimizer step: the root's gathered copy holds the old weights: free it."""
        self.model.reshard()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the sharded gradients: on DTensors it takes
        the norm of the whole gradient (the shards' norms reduced over the processes)
        and returns it as a replicated DTensor; here as a plain tensor."""
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


def lockstep_plan(plan: list, filler: list[int]) -> list:
    """train.update's plan of (prefix ids, micro-batches), padded so that every process
    runs as many groups, and as many micro-batches in each, as the process with the
    most: a missing micro-batch is None (an idle pass), a missing group has the
    prefix `filler` (a real group's prefix is empty exactly when `filler` is)."""
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, [len(chunks) for _, chunks in plan])
    out = []
    for gi in range(max(len(s) for s in shapes)):
        prefix, chunks = plan[gi] if gi < len(plan) else (filler, [])
        n = max(s[gi] for s in shapes if gi < len(s))
        out.append((prefix, list(chunks) + [None] * (n - len(chunks))))
    return out


def idle_pass(model, prefix, pad_id: int, device) -> None:
    """A micro-batch's forward and backward (through every unit, so this process takes
    part in the same collectives as the others) whose gradient is exactly 0."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    logp, _ = logprobs.token_logprobs(model, ids, torch.ones_like(ids), prefix=prefix)
    (logp.sum() * 0.0).backward()


# ------------------------------------------------------------------ checkpoints

OPTIMIZER_DIR = "optimizer"  # inside checkpoint/: the DCP shards of the optimizer state


def full_state_dict(model) -> dict:
    """The whole float32 state dict on rank 0's CPU ({} on the other processes).
    A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (the embedded model's embeddings and LM head) come back as two copies:
    # one tensor under both names, as precision.MasterWeights.state_dict has it, so that
    # save_pretrained writes it once
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(p), name)]
    return state


def save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, rngs, step, args) -> None:
    """checkpoint.save_checkpoint for a wrapped model (every process calls it): rank 0
    writes the model (the full float32 state dict), the tokenizer, the model card and
    trainer_state.pt (without the optimizer) into checkpoint.tmp, every process its
    optimizer shards into checkpoint.tmp/optimizer (DCP), then rank 0 renames it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = full_state_dict(model)
    rank = dist.get_rank()
    tmp = checkpoint.begin_checkpoint(out_dir) if rank == 0 else None
    if rank == 0:
        checkpoint.save_model(model, tmp, state)
        checkpoint.write_trainer_files(tmp, out_dir, tokenizer, {"scheduler": scheduler.state_dict(), "rng": rngs},
                                       step, args)
    tmp = [tmp]
    dist.broadcast_object_list(tmp)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=os.path.join(tmp[0], OPTIMIZER_DIR))  # returns once every process's shards are written
    if rank == 0:
        checkpoint.commit_checkpoint(out_dir)
    dist.barrier()


def load_optimizer(ckpt: str, model, optimizer) -> None:
    """The optimizer shards that save_checkpoint wrote, into `optimizer` (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    dcp.load(state, checkpoint_id=os.path.join(ckpt, OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
