"""Talk to an agent: ask it questions and see every turn (its reasoning, the tool call,
the search result, the answer).

    python chat.py                                  # the embedded model; type questions, empty line or Ctrl-D ends
    python chat.py --model runs/default             # a train.py run, sampled as it was trained (greedily)
    python chat.py --questions questions.txt        # one question per line
    echo "What is the capital of Peru?" | python chat.py

It searches the task's corpus (the Factbook by default; --corpus for another). Answers
are greedy, as in evaluation; --temperature samples instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import evaluate
import precision
import sampler
import tool_env


def answer(model, tokenizer, question: str, env, rollout: sampler.RolloutConfig) -> sampler.Episode:
    """One episode for a question typed by the user (no gold answer: nothing is scored)."""
    return sampler.sample_episodes(model, tokenizer, [{"question_id": "user", "question": question}], env, 1, rollout)[0]


def transcript(episode: sampler.Episode) -> str:
    """The episode from the question on: each assistant turn and each tool result."""
    q = next(i for i, m in enumerate(episode.messages)
             if m["role"] == "user" and m["content"] == f"{tool_env.QUESTION_PREFIX} {episode.question}")
    lines = []
    for m in episode.messages[q + 1 :]:
        who = "agent" if m["role"] == "assistant" else "tool "
        lines += [f"{who} | {line}" for line in m["content"].strip().splitlines() or [""]]
    answer = tool_env.final_answer(episode.messages)
    lines.append(f"=> {answer if answer is not None else '(no answer: ' + episode.end_reason + ')'}")
    return "\n".join(lines)


def questions(args):
    """The questions: from --questions, else typed at a terminal, else lines of stdin."""
    if args.questions:
        with open(args.questions) as f:
            yield from (line.strip() for line in f if line.strip())
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("question> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not line.strip():
            if interactive or not line:  # an empty line ends a session; EOF ends a pipe
                return
            continue
        yield line.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=evaluate.DefaultsHelp)
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', a model folder or HF id, or a train.py run")
    p.add_argument("--task", default=None, help="whose corpus to search (default: the run's, else factbook)")
    p.add_argument("--corpus", default=None, help="a JSONL of {title, text} passages")
    p.add_argument("--questions", default=None, help="a file with one question per line")
    p.add_argument("--fewshot", action=argparse.BooleanOptionalAction, default=None,
                   help="the demonstration (default: as the run was trained; on for the embedded model)")
    p.add_argument("--max-turn-tokens", type=int, default=None, help="default: the run's, else 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=precision.PRECISIONS)
    args = p.parse_args(argv)
    if args.questions and not os.path.isfile(args.questions):
        sys.exit(f"error: --questions {args.questions}: no such file")
    config = evaluate.run_config(args.model, args)  # the run's own environment and rollout settings
    env = evaluate.build_task(config).env
    model, tok = evaluate.load(args, args.model)
    rollout = sampler.RolloutConfig.from_dict(config)
    for q in questions(args):
        print(f"\nQuestion: {q}\n{transcript(answer(model, tok, q, env, rollout))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
