"""One place that builds a run's environment and rubric from its config.

train.py, evaluate.py, chat.py, probe.py and bench.py all call `build(config)` with a run's
settings (train.py's flags, or a run's config.json with the command line's overrides),
so a run is evaluated and chatted with exactly as it was trained: the same corpus and
--search-chars, the same demonstration, the same tool-call limit, the same rubric.

    task             environment (tool_env.ToolEnv)                       rubric (rewards.py)
    factbook         wiki_search over the task's corpus, --demo's demo    PAPER_RUBRIC
    triviaqa[:PATH]  the same over a prepared corpus (corpus.py)          PAPER_RUBRIC
    factbook-2hop    the same, a two-search demo, 2 tool calls            TWO_HOP_RUBRIC

Your own agent does not need this file: build a tool_env.ToolEnv (or any object with
initial_messages and step) and a rewards.Rubric and hand them to the sampler and the
update, or to train.main(task=tasks.Task(env, rubric, rows)), as examples/calculator.py does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import corpus
import data
import models
import rewards
import tool_env


@dataclass
class Task:
    """What train.main and evaluate.evaluate need of a task: the environment the episodes
    run in, the rubric that scores them, and the dataset rows of each split."""

    env: tool_env.Environment
    rubric: rewards.Rubric
    rows: Callable[[str], Sequence[dict]]  # split ("train", "validation", "test") -> rows


def two_hop(task: str) -> bool:
    return task == "factbook-2hop"


def default_tool_calls(task: str) -> int:
    """The episode's tool-call limit when the run does not set one: the paper's one
    search, two for the two-hop task."""
    return 2 if two_hop(task) else 1


def build(config: dict) -> Task:
    """The environment and rubric of a run from its settings: "task", "corpus",
    "search_chars", "fewshot" (None: on for the embedded model, named by "model"), "demo" (a
    name in tool_env.DEMOS, for the one-search tasks; None: tool_env.DEFAULT_DEMO),
    "max_tool_calls" (None: default_tool_calls), "force_answer" (None: off; ToolEnv),
    "contains_max_extra_words" (None: off; rewards.contains_answer_reward). Raises ValueError, RuntimeError or
    FileNotFoundError with a message for the user (an unknown task, a missing corpus)."""
    task = config.get("task") or "factbook"
    source = corpus.default_corpus(task, config.get("corpus"))
    tools = tool_env.make_tools(corpus.load_corpus(source), config.get("search_chars") or tool_env.SEARCH_MAX_CHARS)
    fewshot = config.get("fewshot")
    if fewshot is None:  # the embedded 135M model never calls the tool without a demonstration
        fewshot = config.get("model", "smollm2-135m") in models.EMBEDDED
    name = config.get("demo") or tool_env.DEFAULT_DEMO
    if name not in tool_env.DEMOS:
        raise ValueError(f"unknown demonstration {name!r}; choose one of {', '.join(tool_env.DEMOS)}")
    demo = (tool_env.FEWSHOT_2HOP if two_hop(task) else tool_env.DEMOS[name]) if fewshot else None
    calls = config.get("max_tool_calls") or default_tool_calls(task)
    extra = config.get("contains_max_extra_words")  # None: the rubric as the paper weighs it
    rubric = (rewards.two_hop_rubric if two_hop(task) else rewards.paper_rubric)(extra)  # cached: None gives PAPER_RUBRIC
    env = tool_env.ToolEnv(tools, demo, calls, force_answer=bool(config.get("force_answer")))
    return Task(env, rubric, functools.partial(data.load_task, task))
