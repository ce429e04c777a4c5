"""What the base model does after its second search on the two-hop task (issue 24).

    python results/diagnostics/two_hop_third_turn.py NOTE OUT [evaluate.py flags]

runs `evaluate.py --task factbook-2hop --split test --precision bf16 --out OUT` plus the
flags, with NOTE (if not empty) appended to the result of the last allowed search, so
the model is told it cannot search again. Results: two_hop_third_turn.md."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tool_env  # noqa: E402

NOTE, OUT, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
plain_step = tool_env.env_step


def step_with_note(messages, tools, max_tool_calls=1, truncated=False, timeout=tool_env.TOOL_TIMEOUT_S):
    s = plain_step(messages, tools, max_tool_calls, truncated, timeout)
    if s.reason == "tool" and tool_env.count_tool_results(messages) + 1 >= max_tool_calls:
        s.message["content"] += "\n" + NOTE  # the last search the episode may make
    return s


if NOTE:
    tool_env.env_step = step_with_note  # ToolEnv.step looks env_step up at call time
import evaluate  # noqa: E402

sys.exit(evaluate.main(["--task", "factbook-2hop", "--split", "test", "--precision", "bf16", "--out", OUT] + extra))
