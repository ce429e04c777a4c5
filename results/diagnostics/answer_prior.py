"""What the base model's answers look like under each demonstration: the prior that the
first training steps sample from (issue 20: recipe v4's MT-GRPO seed 2 collapsed onto
answers like ".js", the ".jp" demonstration's form, and never answered a test question
exactly; README "Results").

For each demonstration, the embedded base model in bf16 (as the comparison trains) on the
whole validation split, sampled as in training (T 0.9, top-k 50, 64 tokens per turn, 4
rollouts per question): the tool-call rate and tool success, the share of final answers
that start with "." (the demonstration's ".jp"), that are a demonstration's own answer,
and that hold words of the tool result; exact match and contains_answer. Demonstrations:
- `jp` (tool_env.FEWSHOT, recipes v2-v4): the internet country code of Japan, ".jp";
- `jp+lake`: the same, then tool_env.FEWSHOT_LAKE, whose answer is a plain name copied
  from its result (Japan's major lakes, "Biwa-ko").

    python results/diagnostics/answer_prior.py > results/diagnostics/answer_prior.md
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import precision  # noqa: E402
import rewards  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
import tool_env  # noqa: E402

SAMPLES = 4


def answer_shares(episodes) -> dict:
    n = dot = demo_answer = from_result = 0
    for e in episodes:
        final = tool_env.final_answer(e.messages)
        if final is None:
            continue
        n += 1
        dot += final.strip().startswith(".")
        demo_answer += rewards.normalize_answer(final) in ("jp", "biwa ko")
        results = " ".join(tool_env.tool_results(e.messages))  # the episode's own, not the demonstrations'
        words = rewards.normalize_answer(final).split()
        from_result += bool(words) and all(w in rewards.normalize_answer(results).split() for w in words)
    return {"answered": n / len(episodes), "starts with '.'": dot / max(n, 1),
            "a demonstration's answer": demo_answer / max(n, 1), "every word from the result": from_result / max(n, 1)}


def main():
    model, tok = models.load_model("smollm2-135m", "cpu")
    precision.cast_params(model, precision.DTYPES["bf16"])
    rows = list(data.load_task("factbook", "validation"))
    print("# The base model's answers under each demonstration (bf16, sampled as in training)\n")
    print(f"Validation split, {len(rows)} questions x {SAMPLES} rollouts, T 0.9, top-k 50, 64 tokens per turn. "
          "Shares of answers are over the episodes that answered.\n")
    keys = ["tool_call_rate", "tool_success", "exact_match", "contains_answer"]
    print("| demonstration | " + " | ".join(keys) + " | answered | starts with '.' | a demonstration's answer | "
          "every word from the result |\n|---|" + "---:|" * (len(keys) + 4))
    for name in tool_env.DEMOS:
        task = tasks.build({"task": "factbook", "fewshot": True, "demo": name})
        m, eps = evaluate.evaluate(model, tok, rows, task.env, task.rubric,
                                   sampler.RolloutConfig(max_turn_tokens=64, temperature=0.9, top_k=50), samples=SAMPLES)
        shares = answer_shares(eps)
        print(f"| `{name}` | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " | "
              + " | ".join(f"{v:.3f}" for v in shares.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
