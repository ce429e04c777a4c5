"""What one GPU holds when train.py trains a model: a memory plan by simulation, not a
measurement. The model is built from its config on the meta device (no weights, no
download, no GPU), its parameters are counted from the real module tree (tied weights
once), and pure functions below turn the counts and the run's settings into bytes:

    python memory_plan.py --model qwen2.5-7b --processes 8 --shard \
        --group-size 21 --questions-per-step 16 --max-turn-tokens 512
    python memory_plan.py --model smollm2-135m          # the embedded model, train.py's defaults
    python memory_plan.py --model Qwen/Qwen2.5-1.5B-Instruct --questions-per-step 8 --max-turn-tokens 512
    python memory_plan.py --model smollm2-135m qwen2.5-1.5b-instruct qwen2.5-7b --processes 8   # one table

It prints the breakdown for the setting asked (--processes, --shard), then a table of
1 process, N processes, and N processes sharded (N = --processes, or 8), each with its
peak and whether it fits an 80 GB GPU (--gpu-gib); with several models the table only. The scheme is train.py's with --precision bf16
(precision.MasterWeights): a bf16 model that samples and trains, float32 master
weights, float32 gradients, AdamW's two float32 moments. --shard is FSDP2-style
sharding, which train.py does not implement (yet): what a process would hold with it.

What is counted, and why (every term is a function below):
- state: bf16 weights 2 B, master 4 B, float32 gradients 4 B, AdamW 8 B per parameter;
  the float32 gradients stay allocated between updates (train.update leaves them on
  the master weights), so sampling holds them too. With beta > 0 the reference model's
  bf16 weights. Sharded: all of it divided by N, plus the units FSDP2 gathers whole in
  bf16 for compute: the root (embeddings, LM head, final norm; FSDP2 does not reshard
  the root after forward) and two decoder layers (the one computing, the one prefetched).
- sampling: the KV cache of G x questions-per-process rows over the episode's slots
  (prompt, max_tool_calls + 1 turns, the tool results), as allocated by the sampler's
  doubling buffer (sampler._growing_cache: up to 2x the filled slots); the working set
  of the largest prefill (all rows' tool results at once) and the last position's logits.
- update: the bf16 gradients of one backward before collect_grads moves them into the
  float32 ones (sharded: reduce-scattered, so /N plus one layer's); the activations that
  autograd keeps for one micro-batch (formula in layer_activation_bytes, checked against
  autograd's saved tensors on a small Qwen2 in test_memory_plan.py), the prompt's forward
  that logprobs.Prefix keeps for the group, the LM head on loss positions only; one
  all-reduce bucket (train.BUCKET_ELEMENTS) with several processes unsharded.
Not counted: the CUDA context and cuBLAS workspaces (about 1 GB), allocator
fragmentation, evaluation (8 questions, greedy: smaller than a training step). "fits"
leaves 10% of the GPU for them: yes below 90%, tight between 90% and 100%, no above.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

GiB = 2**30

# Hand-written configs (no network here): the sizes of the published config.json files.
QWEN = {
    "qwen2.5-1.5b-instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
ALIASES = {"qwen/qwen2.5-1.5b-instruct": "qwen2.5-1.5b-instruct", "qwen2.5-1.5b": "qwen2.5-1.5b-instruct",
           "qwen/qwen2.5-1.5b": "qwen2.5-1.5b-instruct", "qwen/qwen2.5-3b": "qwen2.5-3b",
           "qwen/qwen2.5-3b-instruct": "qwen2.5-3b", "qwen/qwen2.5-7b": "qwen2.5-7b",
           "qwen/qwen2.5-7b-instruct": "qwen2.5-7b"}


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs to know of a model."""

    name: str
    params: int  # unique parameters (tied weights once)
    layer_params: int  # the largest decoder layer
    root_params: int  # everything outside the decoder layers: embeddings, LM head, final norm
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class Settings:
    """A run's settings that memory depends on (train.py's flags of the same names)."""

    processes: int = 1
    shard: bool = False
    group_size: int = 8
    questions_per_step: int = 4
    prompt_tokens: int = 256  # system prompt + question (the paper's prompt: ~230 tokens)
    max_turn_tokens: int = 64
    max_tool_calls: int = 1
    result_tokens: int = 200  # one tool result with its chat glue: one 600-character passage
    micro_batch_tokens: int = 512
    beta: float = 0.0


# ---------------------------------------------------------------- the model (the only model-dependent part)


def load_config(name: str):
    """A transformers config: a hand-written Qwen2.5 one, the embedded model's (its cached
    folder), a folder with a config.json, or a Hugging Face id already in the local cache."""
    from transformers import AutoConfig, Qwen2Config

    key = ALIASES.get(name.lower(), name.lower())
    if key in QWEN:
        return Qwen2Config(**QWEN[key])
    import models

    path = models._embedded_path(name) if name in models.EMBEDDED else name
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)  # a plan never downloads
    except Exception as e:  # offline hub, no such folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"no config for model {name!r}: {first} (known without a download: "
                         f"{', '.join(['smollm2-135m', *QWEN])}, or a folder with a config.json)") from None


def shape_of(cfg, name: str = "") -> Shape:
    """Build the model on the meta device (shapes only, no memory) and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    layers = model.base_model.layers  # Llama, Qwen2, Mistral, ...: the decoder layers
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    heads = cfg.num_attention_heads
    return Shape(name=name or cfg.model_type, params=params, layer_params=max(per_layer),
                 root_params=params - sum(per_layer), hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                 layers=len(layers), heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                 head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size)


# ---------------------------------------------------------------- pure arithmetic (bytes)


def questions_per_process(s: Settings) -> int:
    if s.questions_per_step % s.processes:
        raise ValueError(f"--questions-per-step {s.questions_per_step} must be a multiple of the {s.processes} processes")
    return s.questions_per_step // s.processes


def episode_tokens(s: Settings) -> int:
    """The longest episode: the prompt, max_tool_calls + 1 turns, a result after each call."""
    return s.prompt_tokens + (s.max_tool_calls + 1) * s.max_turn_tokens + s.max_tool_calls * s.result_tokens


def sampled_tokens(s: Settings) -> int:
    return (s.max_tool_calls + 1) * s.max_turn_tokens


def allocated_slots(prompt: int, total: int, shared: int = 0) -> int:
    """Cache slots the sampler's buffer holds for `total` filled ones
    (sampler._growing_cache): a fill beyond the capacity grows it to max(need, twice
    the capacity, 64). The sampler first fills the prefix all prompts share (`shared`,
    sampler.shared_prefix_len; 0: none), then the prompts, then a token at a time."""
    cap = 0
    for need in ([shared] if shared else []) + [prompt]:
        if need > cap:
            cap = max(need, 2 * cap, 64)
    while cap < total:
        cap = max(2 * cap, 64)
    return cap


def kv_bytes_per_slot(m: Shape) -> int:
    """One token's keys and values over all layers, bf16."""
    return m.layers * 2 * m.kv_heads * m.head_dim * 2


def layer_activation_bytes(m: Shape, rows: int, q_len: int, kv_len: int) -> int:
    """Bytes one decoder layer keeps for backward, bf16 compute, SDPA with a padding mask
    (as the update always passes one), for `rows` sequences of `q_len` new tokens that
    attend to `kv_len` positions (a shared prompt prefix and themselves). Per new token:
      2 RMSNorms, each its float32 input and bf16 normalized output   2 x (4 + 2) h
      the q/k/v projections' input, q after rotary, attention output   2 h + 2 h + 2 h
      the MLP's input                                                  2 h
      gate, up, SiLU(gate), SiLU(gate) * up (the down projection's input)   4 x 2 i
      SDPA's log-sum-exp (float32, per head)                           4 heads
      the padding mask, converted to bf16 by SDPA per layer            2 kv_len
    and per attended position of each row: keys and values, repeated to all heads
    (transformers' repeat_kv: SDPA's native GQA is used only without a mask)  2 x 2 h.
    That is 20 h + 8 i + 4 heads + 2 kv_len per token and 4 h per attended position.
    """
    per_token = 20 * m.hidden + 8 * m.intermediate + 4 * m.heads + 2 * kv_len
    return rows * (q_len * per_token + kv_len * 4 * m.hidden)


def prefix_activation_bytes(m: Shape, prompt: int) -> int:
    """logprobs.Prefix: the prompt forwarded once per group with gradients on, kept until its
    backward at the end of the group. It runs without a mask, so SDPA uses native GQA:
    keys and values are kept unrepeated (2 x 2 kv_heads head_dim per token)."""
    per_token = 20 * m.hidden + 8 * m.intermediate + 4 * m.heads + 2 * 2 * m.kv_heads * m.head_dim
    return m.layers * prompt * per_token


FINAL_NORM_BYTES = 6  # per token and hidden unit: the final RMSNorm's float32 input and bf16 output
# the LM head on one loss position: float32 log-softmax kept for backward (4 B a logit);
# while it is computed also the bf16 logits (2), their float32 copy (4), / temperature (4)
HEAD_SAVED_BYTES, HEAD_TRANSIENT_BYTES = 4, 10


def micro_batch(s: Settings) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch of continuations (the prompt's
    last token on; logprobs.plan_micro_batches): as many longest episodes as fit in
    micro_batch_tokens, at least one (a longer episode forms a micro-batch of its own)."""
    cont = episode_tokens(s) - s.prompt_tokens + 1
    return max(1, s.micro_batch_tokens // cont), cont


def saved_for_backward(m: Shape, s: Settings) -> dict[str, int]:
    """What autograd keeps from the forward of the largest micro-batch until its backward
    (the quantity test_memory_plan.py measures with saved-tensor hooks): the decoder layers
    and the final norm over rows x continuation tokens, the group's prompt (Prefix), the
    LM head's input and log-softmax on the loss positions."""
    rows, cont = micro_batch(s)
    positions = rows * sampled_tokens(s)
    return {"decoder layers": m.layers * layer_activation_bytes(m, rows, cont, s.prompt_tokens + cont)
            + rows * cont * FINAL_NORM_BYTES * m.hidden,
            "prompt (Prefix)": prefix_activation_bytes(m, s.prompt_tokens) + s.prompt_tokens * FINAL_NORM_BYTES * m.hidden,
            "LM head": positions * (2 * m.hidden + HEAD_SAVED_BYTES * m.vocab)}


def state_terms(m: Shape, s: Settings) -> dict[str, int]:
    """The weights and optimizer state one process holds (bytes), both phases."""
    n = s.processes if s.shard else 1
    t = {"bf16 weights": 2 * m.params // n, "float32 master weights": 4 * m.params // n,
         "float32 gradients": 4 * m.params // n, "AdamW state (2 x float32)": 8 * m.params // n}
    gathered = 2 * (m.root_params + 2 * m.layer_params) if n > 1 else 0  # FSDP2 all-gathers these whole, bf16
    if s.beta > 0:
        t["reference model (bf16)"] = 2 * m.params // n + gathered
    if n > 1:
        t["gathered for compute: root + 2 layers (bf16)"] = gathered
    return t


def sampling_terms(m: Shape, s: Settings) -> dict[str, int]:
    """What sampling adds: the KV cache, the largest prefill's working set, the logits."""
    rows = s.group_size * questions_per_process(s)
    slots = allocated_slots(s.prompt_tokens, episode_tokens(s))
    t = {"KV cache while sampling": rows * slots * kv_bytes_per_slot(m)}
    # the largest prefill: the tool results of all rows in one forward (sampler step 4),
    # or the prompts; in inference mode one layer at a time: its MLP (4 tensors of i), a
    # few hidden-sized tensors and the mask over the cache slots (bool + bf16) per token
    tokens = max(rows * s.result_tokens if s.max_tool_calls else 0, questions_per_process(s) * s.prompt_tokens)
    t["prefill working set (one layer)"] = tokens * (8 * m.intermediate + 12 * m.hidden + 3 * slots)
    t["next-token logits"] = rows * m.vocab * (2 + 4 + 4 + 4)
    return t


def update_terms(m: Shape, s: Settings) -> dict[str, int]:
    """What the update adds: bf16 gradients of a backward, one micro-batch's activations."""
    n = s.processes if s.shard else 1
    rows, cont = micro_batch(s)
    positions = rows * sampled_tokens(s)  # the LM head runs on loss positions only
    one_layer = layer_activation_bytes(m, rows, cont, s.prompt_tokens + cont)
    saved = saved_for_backward(m, s)
    t = {"bf16 gradients of one backward": 2 * m.params // n + (2 * (m.root_params + m.layer_params) if n > 1 else 0),
         # the backward of a layer needs about one more layer's worth (the activations' gradients)
         "activations: decoder layers": saved["decoder layers"] + one_layer,
         # the prompt's float32 key/value leaves and their float32 gradients come with it
         "activations: the group's prompt (Prefix)": saved["prompt (Prefix)"]
         + m.layers * s.prompt_tokens * 2 * m.kv_heads * m.head_dim * (4 + 4),
         "LM head on loss positions": saved["LM head"] + positions * m.vocab * HEAD_TRANSIENT_BYTES}
    if s.beta > 0:  # the reference's forward is no_grad: one layer's working set, its head on the same positions
        t["reference forward (no grad)"] = one_layer + positions * m.vocab * HEAD_TRANSIENT_BYTES
    if s.processes > 1 and not s.shard:
        import train  # the all-reduce bucket of train.sum_gradients

        t["all-reduce bucket (float32)"] = 4 * train.BUCKET_ELEMENTS
    return t


def plan(m: Shape, s: Settings) -> dict:
    """Every term (bytes) and the two phases' peaks: sampling holds the state and the KV
    cache; the update holds the state, the bf16 gradients and the activations."""
    state, samp, upd = state_terms(m, s), sampling_terms(m, s), update_terms(m, s)
    peak_sampling = sum(state.values()) + sum(samp.values())
    peak_update = sum(state.values()) + sum(upd.values())
    return {"state": state, "sampling": samp, "update": upd, "peak_sampling": peak_sampling,
            "peak_update": peak_update, "peak": max(peak_sampling, peak_update)}


def fits(peak: int, gpu_gib: float = 80.0) -> str:
    """yes: at most 90% of the GPU (room for the CUDA context and fragmentation); tight: up
    to 100%; no: more."""
    if peak <= 0.9 * gpu_gib * GiB:
        return "yes"
    return "tight" if peak <= gpu_gib * GiB else "no"


# ---------------------------------------------------------------- the command


def gib(b: int) -> str:
    return f"{b / GiB:.1f}" if b >= 0.05 * GiB else f"{b / GiB:.2f}"


def breakdown(m: Shape, s: Settings, gpu_gib: float) -> str:
    p = plan(m, s)
    rows, cont = micro_batch(s)
    what = f"{s.processes} process{'es' if s.processes > 1 else ''}" + (", sharded" if s.shard and s.processes > 1 else "")
    lines = [f"{m.name}: {m.params / 1e9:.3f}B parameters ({m.params:,}; largest layer {m.layer_params:,}, "
             f"root {m.root_params:,}); {what}",
             f"one process: {s.group_size} x {questions_per_process(s)} = {s.group_size * questions_per_process(s)} "
             f"rollouts, episodes of at most {episode_tokens(s)} tokens "
             f"({allocated_slots(s.prompt_tokens, episode_tokens(s))} cache slots allocated); "
             f"largest micro-batch {rows} x {cont} tokens",
             "", f"| {'GiB on one GPU':<48} | {'sampling':>8} | {'update':>8} |", f"| {'-' * 48} | {'-' * 7}: | {'-' * 7}: |"]
    for k, v in p["state"].items():
        lines.append(f"| {k:<48} | {gib(v):>8} | {gib(v):>8} |")
    for k, v in p["sampling"].items():
        lines.append(f"| {k:<48} | {gib(v):>8} | {'':>8} |")
    for k, v in p["update"].items():
        lines.append(f"| {k:<48} | {'':>8} | {gib(v):>8} |")
    lines.append(f"| {'**peak**':<48} | {gib(p['peak_sampling']):>8} | {gib(p['peak_update']):>8} |")
    lines.append(f"\npeak {gib(p['peak'])} GiB: fits {gpu_gib:g} GB: {fits(p['peak'], gpu_gib)}")
    return "\n".join(lines)


def table(models: list[Shape], s: Settings, gpu_gib: float) -> str:
    """A row per model and number of processes: 1, N, N sharded (N = s.processes, or 8
    when that is 1; N only where the questions divide among N processes)."""
    n = s.processes if s.processes > 1 else 8
    cases = [dataclasses.replace(s, processes=1, shard=False)]
    if s.questions_per_step % n == 0:
        cases += [dataclasses.replace(s, processes=n, shard=False), dataclasses.replace(s, processes=n, shard=True)]
    cols = ["model", "GPUs", "params", "state", "KV cache", "activations", "sampling", "update", "peak GiB",
            f"fits {gpu_gib:g} GB"]
    rows = []
    for m in models:
        for c in cases:
            p = plan(m, c)
            act = sum(v for k, v in p["update"].items() if k.startswith(("activations", "LM head", "reference forward")))
            rows.append([m.name, f"{c.processes}" + (" sharded" if c.shard else ""), f"{m.params / 1e9:.2f}B",
                         gib(sum(p["state"].values())), gib(p["sampling"]["KV cache while sampling"]), gib(act),
                         gib(p["peak_sampling"]), gib(p["peak_update"]), gib(p["peak"]), fits(p["peak"], gpu_gib)])
    w = [max(len(x) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "| " + " | ".join(x.ljust(k) if j < 2 else x.rjust(k) for j, (x, k) in enumerate(zip(r, w))) + " |"  # noqa: E731
    rule = "| " + " | ".join("-" * k if j < 2 else "-" * (k - 1) + ":" for j, k in enumerate(w)) + " |"
    return "\n".join([line(cols), rule, *map(line, rows)])


def parse_args(argv=None):
    import train

    U, R = train.UpdateConfig, train.sampler.RolloutConfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", nargs="+", default=["smollm2-135m"],
      help=f"smollm2-135m, {', '.join(QWEN)}, a HF id of those, or a model folder; several: one table")
    a("--processes", type=int, default=1, help="torchrun processes, one GPU each")
    a("--shard", action="store_true", help="FSDP2-style: weights, gradients, master weights, AdamW state / N")
    a("--group-size", type=int, default=8, help="G")
    a("--questions-per-step", type=int, default=4)
    a("--prompt-tokens", type=int, default=Settings.prompt_tokens)
    a("--max-turn-tokens", type=int, default=R.max_turn_tokens)
    a("--max-tool-calls", type=int, default=1)
    a("--result-tokens", type=int, default=Settings.result_tokens, help="tokens of one tool result with its chat glue")
    a("--micro-batch-tokens", type=int, default=U.micro_batch_tokens)
    a("--beta", type=float, default=U.beta, help="> 0: a reference model is held too")
    a("--gpu-gib", type=float, default=80.0, help="GPU memory for the 'fits' column")
    args = p.parse_args(argv)
    for name in ("processes", "group_size", "questions_per_step", "prompt_tokens", "max_turn_tokens", "micro_batch_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tool_calls < 0 or args.result_tokens < 0:
        p.error("--max-tool-calls and --result-tokens must be 0 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    try:
        questions_per_process(s)
        models = [shape_of(load_config(name), name) for name in args.model]
    except ValueError as e:
        sys.exit(f"error: {e}")
    if len(models) == 1:  # the breakdown of the setting asked, then the comparison
        print(breakdown(models[0], s, args.gpu_gib) + "\n")
    print(table(models, s, args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
