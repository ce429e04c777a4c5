"""What the base model does after its second search on the two-hop task (issue 24).

    python results/diagnostics/two_hop_third_turn.py NOTE OUT [evaluate.py flags]

runs `evaluate.py --task factbook-2hop --split test --precision bf16 --out OUT` plus the
flags, with NOTE (if not empty) appended to the result of the last allowed search, so
the model is told it cannot search again. Results: two_hop_third_turn.md."""
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import evaluate  # noqa: E402
import tool_env  # noqa: E402


@dataclass
class LastSearchNote:
    """The task's environment, with `note` appended to the result of the last search
    the episode may make (a tool_env.Environment: evaluate.main runs its episodes in it)."""

    inner: tool_env.ToolEnv
    note: str

    def initial_messages(self, row: dict) -> list[dict]:
        return self.inner.initial_messages(row)

    def step(self, messages: list[dict], truncated: bool = False) -> tool_env.EnvStep:
        s = self.inner.step(messages, truncated)
        if s.reason == "tool" and tool_env.count_tool_results(messages) + 1 >= self.inner.max_tool_calls:
            s.message["content"] += "\n" + self.note
        return s


if __name__ == "__main__":
    NOTE, OUT, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    flags = ["--task", "factbook-2hop", "--split", "test", "--precision", "bf16", "--out", OUT] + extra
    sys.exit(evaluate.main(flags, env=(lambda env: LastSearchNote(env, NOTE)) if NOTE else None))
