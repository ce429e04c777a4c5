"""A run's folder: checkpoints that a kill cannot corrupt, resuming, the model card.

    OUTPUT_DIR/checkpoint/   model (float32, from_pretrained), tokenizer, README.md (model
                             card), trainer_state.pt (optimizer, scheduler, step, config,
                             every process's RNG states): what --resume needs
    OUTPUT_DIR/log.jsonl     one line per step (train.py)

save_checkpoint writes checkpoint.tmp and renames it over checkpoint (the old one is
checkpoint.old between the two renames); prepare_output_dir repairs what a kill at any
moment can leave, so that the same command with --resume always continues.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import torch


def rng_state(generator) -> dict:
    return {"generator": generator.get_state(), "generator_device": generator.device.type,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


CPU_GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()  # Mersenne Twister's state


def set_rng_state(generator, rng: dict, reseed: int) -> str | None:
    """Restore the RNG states of one process. Returns None, or the device type that saved
    the sampling generator when it had to be reseeded with `reseed` instead: --device may
    change on resume, and a generator's state does not carry over between device types (a
    CPU generator's is the Mersenne Twister's 5056 bytes, a CUDA generator's a seed and an
    offset). Reseeding from (seed, process, step) keeps the run deterministic (the same
    checkpoint resumed twice on the new device samples the same rollouts), though not
    the rollouts it would have sampled on the old device."""
    saved = rng.get("generator_device")
    if saved is None:  # checkpoints from before the field: only a CPU state has this size
        saved = "cpu" if rng["generator"].numel() == CPU_GENERATOR_STATE_BYTES else "cuda"
    if saved != generator.device.type:
        generator.manual_seed(reseed)
    else:
        generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(rng["python_rng"])
    if rng.get("cuda_rng") and torch.cuda.is_available():  # as many GPUs as both runs see
        for i, state in enumerate(rng["cuda_rng"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    return saved if saved != generator.device.type else None


def save_checkpoint(out_dir, master, tokenizer, optimizer, scheduler, rngs: list[dict], step, args):
    """model (its float32 master weights, save_pretrained) + tokenizer + trainer state
    (with the RNG states of every process), into a temp folder that then replaces
    OUTPUT_DIR/checkpoint, so a kill never leaves a half checkpoint. (--fsdp:
    sharding.save_checkpoint, from the same pieces.)"""
    tmp = begin_checkpoint(out_dir)
    save_model(master.model, tmp, master.state_dict())
    write_trainer_files(tmp, out_dir, tokenizer, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                  "rng": rngs}, step, args)
    commit_checkpoint(out_dir)


def begin_checkpoint(out_dir) -> str:
    """A fresh OUTPUT_DIR/checkpoint.tmp to write the next checkpoint into."""
    tmp = os.path.join(out_dir, "checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_trainer_files(tmp, out_dir, tokenizer, trainer_state: dict, step, args) -> None:
    """The tokenizer, trainer_state.pt (`trainer_state` with the step and the config)
    and the model card, into the checkpoint folder being written."""
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "config": vars(args), **trainer_state}, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(args, step, os.path.join(out_dir, "log.jsonl")))


def commit_checkpoint(out_dir) -> None:
    """checkpoint.tmp replaces checkpoint (kept as checkpoint.old between the two renames)."""
    final = os.path.join(out_dir, "checkpoint")
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(final + ".tmp", final)
    shutil.rmtree(old, ignore_errors=True)


def model_card(args, step: int, log_path: str) -> str:
    """The checkpoint's README.md: what this model is, how it was made, how it scores."""
    evals = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "eval_exact_match" in rec and rec["step"] <= step:
                    evals.append(rec)
    rows = "".join(f"| {r['step']} | {r['eval_tool_success']:.3f} | {r['eval_search_has_answer']:.3f} | "
                   f"{r['eval_exact_match']:.3f} |\n" for r in evals[:1] + evals[-1:] if evals)
    table = ("| step | tool success | search has answer | exact match |\n| ---: | ---: | ---: | ---: |\n" + rows
             if rows else "No held-out evaluation was logged (--eval-every 0).\n")
    split = f"{evals[-1]['eval_split']} split, {evals[-1]['eval_episodes']} questions, greedy" if evals else ""
    flags = []
    for k, v in vars(args).items():
        name = "--" + k.replace("_", "-")
        if v is None or k in ("resume", "output_dir", "device"):
            continue
        if isinstance(v, bool):  # store_true flags, and --[no-]fewshot
            flags += [name] if v else ["--no-fewshot"] if k == "fewshot" else []
        else:
            flags += [name, str(v)]
    flags = " ".join(flags)
    return (f"# {os.path.basename(os.path.normpath(args.output_dir))}: {args.model} trained with {args.method}\n\n"
            f"A tool-using agent (search, then answer) trained with mtgrpo's `train.py` for {step} of "
            f"{args.steps} steps, from `{args.model}` on the `{args.task}` task. Load it with "
            f"`AutoModelForCausalLM.from_pretrained` on this folder; `python chat.py --model RUN_DIR` "
            f"talks to it. `trainer_state.pt` (optimizer, RNG) is only for `--resume`.\n\n"
            f"Held-out evaluation ({split}), before training and at the latest evaluation:\n\n{table}\n"
            f"Made with:\n\n    python train.py {flags}\n")


def save_model(model, folder, state_dict: dict) -> None:
    """save_pretrained with a float32 state dict (the master weights). save_pretrained
    writes the model's own dtype (bfloat16 in bf16) into config.json, and from_pretrained with
    dtype="auto" (its default) would then round the weights on load: say float32."""
    model.save_pretrained(folder, state_dict=state_dict)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["dtype"] = "float32"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def open_board(args):
    """A TensorBoard writer for --log tensorboard (an optional dependency), else None."""
    if args.log != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        sys.exit("error: --log tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.output_dir, "tb"))


# Flags a resumed run may change; any other difference from the checkpoint's config is
# refused (the optimizer state, the RNG streams and the log all assume the old values).
RESUME_MAY_CHANGE = {"steps", "eval_every", "save_every", "device", "compile_decode", "resume", "output_dir", "log"}


def prepare_output_dir(args) -> dict | None:
    """Decide how a run starts, so that a kill at any moment leaves a run that the same
    command with --resume continues (or that a plain rerun restarts when nothing was
    saved yet). Returns the checkpoint's trainer state to resume from, or None."""
    out = args.output_dir
    ckpt, old = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old")
    try:
        os.makedirs(out, exist_ok=True)
        if not os.path.isdir(ckpt) and os.path.isdir(old):
            os.replace(old, ckpt)  # killed between save_checkpoint's two renames: the old one is whole
        shutil.rmtree(ckpt + ".tmp", ignore_errors=True)  # a save that did not finish
        probe = os.path.join(out, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to --output-dir {out}: {e.strerror}")
    has_ckpt = os.path.exists(os.path.join(ckpt, "trainer_state.pt"))
    if not has_ckpt:
        if os.path.exists(os.path.join(out, "log.jsonl")):
            # killed before its first checkpoint: nothing to resume, so start over
            print(f"note: {out} has a log but no checkpoint (stopped before its first save): starting over")
            for name in ("log.jsonl", "config.json", "evals"):
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
        return None
    if not args.resume:
        sys.exit(f"error: {out} already has a run; pass --resume to continue it or choose another --output-dir")
    try:
        state = load_trainer_state(ckpt)
    except Exception as e:  # a truncated or corrupt file: say which, and what to do
        sys.exit(f"error: {ckpt}/trainer_state.pt is unreadable ({type(e).__name__}); delete {ckpt} to restart the run")
    saved, now = state["config"], vars(args)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in now
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        sys.exit(f"error: --resume with settings that differ from the checkpoint: {', '.join(changed)}. "
                 f"Only --steps, --eval-every, --save-every, --device, --compile-decode and --log may change; use a new --output-dir for the rest")
    return state


def saved_config(out_dir) -> dict:
    """OUTPUT_DIR/config.json as the last sitting wrote it ({} when there is none), read
    before a resumed run rewrites it: it holds what the flags resolved to on that
    machine (resolved_precision), which the checkpoint's own config does not."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_trainer_state(ckpt: str) -> dict:
    """trainer_state.pt, onto the CPU whatever device saved it (--device may change on
    resume, and under torchrun each process trains on its own GPU):
    optimizer.load_state_dict then moves the optimizer state to the parameters' device."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)


def truncate_log(path, step) -> None:
    """Drop the log lines of steps after `step` (and a line cut off by a kill)."""
    if not os.path.exists(path):
        return
    lines = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut off by a kill
    with open(path, "w") as f:
        f.writelines(lines)
