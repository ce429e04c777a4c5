"""Turn-level (R^T) and outcome (R^O) rewards of MT-GRPO (docs/paper.md §3), as rubrics.

A Rubric is two lists of weighted callables (Reward): turn rewards, each called with
(episode, row, j) for every tool turn j, and outcome rewards, called with (episode, row),
where `row` is the episode's whole dataset row. Each returns a score in [0, 1]; the
weights are the only scale, so every logged component is a rate. The paper's rubric,
with the reference's weights:

    R^T_j = 0.2 tool_execution + 0.5 search_has_answer of tool turn j      (about turn j's call)
    R^O = 1.0 exact_match + 0.5 contains_answer + 0.2 format + 0.2 xml      (about the outcome)

is PAPER_RUBRIC; the two-hop task's (data.build_two_hop) TWO_HOP_RUBRIC scores each search
by its own hop: R^T_1 = 0.2 tool_execution + 0.5 bridge_found (search 1 found the bridge
country), R^T_2 = 0.2 tool_execution + 0.5 search_has_answer (search 2 found the answer).
Your own rubric: examples/calculator.py.

The scores are pure functions of an episode's messages (the chat as a list of
{"role", "content"} dicts, as built by tool_env, read with tool_env's episode readers)
and the gold aliases, each testable on hand-written messages.

Changes against the reference rewards (docs/paper.md §5), each so that a policy cannot collect
reward without doing the task, each tested on crafted episodes in test_rewards.py:
- tool_execution: every failure is an "Error:" result (the reference counted a tool's
  own error text as a success);
- search_has_answer: the first *passage* of the first result, whatever `k` the call
  asked for (with k = 5, "the first result" was five passages);
- exact_match: TriviaQA's normalization (the reference: lower + strip);
- contains_answer: whole words, at most 10 words, and not a hedge or a list ("Gitega or
  Bujumbura", ten candidates: the reference paid for any substring);
- format: no free "spacing" check; an episode that does not end with an answer (a tool
  call beyond the limit, a cut-off turn) gets 0 for its last message (the reference
  scored a well-formed second tool call like an answer, and MT-GRPO learned to loop);
- xml: a required tag that is missing counts against the message (the reference only
  scored the tags that were used, so "<answer>x</answer>" alone was perfect).
"""

from __future__ import annotations

import functools
import re
import string
import sys
from dataclasses import dataclass, field
from typing import Callable

from tool_env import (
    PASSAGE_SEP,
    RESULT_CLOSE,
    RESULT_OPEN,
    assistant_messages,
    episode_messages,
    final_answer,
    is_error,
    tool_results,
)

# TriviaQA's evaluation treats these quote marks as punctuation too.
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u00b4", "`"}
TAGS = ("reasoning", "tool", "answer")


def normalize_answer(s: str) -> str:
    """TriviaQA's official normalization (evaluation/triviaqa_evaluation.py):
    underscores and punctuation become spaces, lowercase, the articles a/an/the are
    removed, whitespace is collapsed. The dataset's `normalized_aliases` are in
    this form."""
    s = s.replace("_", " ").lower()
    s = "".join(" " if ch in _PUNCT else ch for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, aliases: list[str]) -> float:
    """1.0 if the normalized prediction equals a normalized alias, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in aliases if normalize_answer(a)))


def contains_alias(haystack: str, aliases: list[str]) -> bool:
    """A normalized alias occurs in the normalized text as whole words."""
    h = f" {normalize_answer(haystack)} "
    return any(f" {a} " in h for a in map(normalize_answer, aliases) if a)


# ---------------------------------------------------------------------------------
# Turn-level rewards (about the tool call)


def tool_execution_reward(messages: list[dict]) -> float:
    """Successful calls / attempted calls; 0 if no call was attempted.

    An attempted call is one the environment answered with a <result>; it succeeded
    unless the result starts with "Error:". Fix of the reference's quirk: there, a
    tool's own error text that did not start with "Error:" counted as a success;
    here the environment (tool_env.run_tool_call) turns *every* failure (parse,
    validation, exception, empty output) into an "Error:" result.
    """
    results = tool_results(messages)
    if not results:
        return 0.0
    ok = sum(not is_error(r) for r in results)
    return ok / len(results)


# ---------------------------------------------------------------------------------
# Outcome rewards (about the final answer)


def exact_match_reward(messages: list[dict], aliases: list[str]) -> float:
    """1 if the last <answer> equals a gold alias after normalize_answer.
    (The reference only lowercased and stripped.)"""
    ans = final_answer(messages)
    return 0.0 if ans is None else exact_match(ans, aliases)


# Separators of a list of candidates. "and" is not one ("Trinidad and Tobago"), nor a
# comma inside a number ("870,000").
_LIST_SEP = re.compile(r"(?<!\d),|,(?!\d)|;|/|\n|\bor\b|\bvs\.?\b|\beither\b", re.I)


def is_hedge(answer: str) -> bool:
    """An answer that lists candidates ("Gitega or Bujumbura", "A, B, C")."""
    return len([p for p in _LIST_SEP.split(answer) if normalize_answer(p)]) > 1


def contains_answer_reward(messages: list[dict], aliases: list[str], max_words: int = 10,
                           max_extra_words: int | None = None) -> float:
    """1 if a gold alias occurs in the last <answer> as whole words, the answer
    has at most `max_words` words, and it is not a hedge or a list (unless it is
    exactly a gold alias, e.g. "Washington, D.C."). Fixes of the reference's quirk:
    an answer that pastes a passage, or lists candidates, collects nothing.

    max_extra_words (recipe v3, off by default): the answer has at most that many words
    more than the alias it contains, so "Mount Fogo volcano" still counts and a sentence
    around the gold ("The result says the code is Mt. Fogo.") does not. Without it, that
    sentence is a trap: it collects 0.5 here, every rollout of a group learns to write it,
    and no rollout is left to sample the exact answer (MT-GRPO seed 1 of the v2
    comparison: 112 of 115 test answers by step 30, EM 0)."""
    ans = final_answer(messages)
    if ans is None:
        return 0.0
    n = len(normalize_answer(ans).split())
    if n > max_words:
        return 0.0
    if is_hedge(ans) and not exact_match(ans, aliases):
        return 0.0
    if max_extra_words is None:
        return float(contains_alias(ans, aliases))
    return float(any(contains_alias(ans, [a]) and n <= len(normalize_answer(a).split()) + max_extra_words
                     for a in aliases))


def _format_score(text: str) -> float:
    """Fraction of four checks an assistant message passes: it starts with
    <reasoning>; it has a closed <reasoning>...</reasoning>; it has exactly one
    closed <tool> or <answer> block, after the reasoning; it ends with </tool> or
    </answer>. A message that writes a <result> itself (only the environment may)
    scores 0."""
    t = text.strip()
    if RESULT_OPEN in t or RESULT_CLOSE in t:
        return 0.0
    reasoning = re.search(r"<reasoning>.*?</reasoning>", t, re.S)
    actions = re.findall(r"<(tool|answer)>.*?</\1>", t, re.S)
    checks = [
        t.startswith("<reasoning>"),
        reasoning is not None,
        len(actions) == 1 and reasoning is not None and t.find(f"<{actions[0]}>") >= reasoning.end(),
        t.endswith("</tool>") or t.endswith("</answer>"),
    ]
    return sum(checks) / len(checks)


def format_reward(messages: list[dict]) -> float:
    """The mean over assistant messages of `_format_score`, where the last
    message scores 0 unless it gives an <answer>: an episode that ends on a tool call
    beyond the limit, or is cut off, did not finish the task. (The reference scored a
    well-formed second tool call as fully as an answer, so a policy that looped on
    the tool lost nothing; its "spacing" check was also always awarded.)"""
    texts = assistant_messages(episode_messages(messages))
    if not texts:
        return 0.0
    scores = [_format_score(t) for t in texts]
    if not re.search(r"<answer>.*?</answer>", texts[-1], re.S):
        scores[-1] = 0.0
    return sum(scores) / len(scores)


def _xml_score(text: str) -> float:
    """Per tag: 0.5 for opening exactly once, 0.5 for closing exactly once; mean over
    the tags used in the message and the required ones: <reasoning>, and <tool> or
    <answer> (<answer> if neither is used). A required tag that is missing scores 0,
    so "<answer>x</answer>" alone gets 0.5, not 1."""
    used = [t for t in TAGS if f"<{t}>" in text or f"</{t}>" in text]
    if not used:
        return 0.0
    required = {"reasoning", "tool" if "tool" in used else "answer"}
    tags = [t for t in TAGS if t in used or t in required]
    return sum(0.5 * (text.count(f"<{t}>") == 1) + 0.5 * (text.count(f"</{t}>") == 1) for t in tags) / len(tags)


def xml_reward(messages: list[dict]) -> float:
    """The mean over assistant messages of `_xml_score`."""
    texts = assistant_messages(episode_messages(messages))
    if not texts:
        return 0.0
    return sum(map(_xml_score, texts)) / len(texts)


# ---------------------------------------------------------------------------------
# Rubrics: R^T and R^O as lists of weighted callables


@dataclass(frozen=True)
class Reward:
    """One weighted component of R^T or R^O. An outcome reward is `fn(episode, row)`; a
    turn reward is `fn(episode, row, j)`, the score of tool turn j (1-based, the j-th
    call that got a result), or None where it does not apply to that turn. `episode`
    has `.messages`; `row` is the dataset row, whole. A score lies in [0, 1]: the weight
    is the only scale, so a logged component is a rate."""

    name: str
    weight: float
    fn: Callable


@dataclass
class Rubric:
    """R^T_j = sum over `turn` of weight x score of tool turn j; R^O = sum over `outcome`
    of weight x score (docs/paper.md §3). A reward that raises, or returns anything but
    a number in [0, 1], scores 0 and is reported once (on stderr): a user's reward that
    misbehaves must not stop a run."""

    turn: list[Reward]
    outcome: list[Reward]
    _reported: set = field(default_factory=set, repr=False, compare=False)

    def _score(self, reward: Reward, *args) -> float | None:
        try:
            v = reward.fn(*args)
        except Exception as e:  # noqa: BLE001 - reported, scored 0
            return self._report(reward, f"raised {type(e).__name__}: {e}")
        if v is None and len(args) == 3:  # a turn reward that does not apply to this turn
            return None
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:  # NaN fails this too
            return self._report(reward, f"returned {v!r}, not a score in [0, 1]")
        return float(v)

    def _report(self, reward: Reward, what: str) -> float:
        if reward.name not in self._reported:
            self._reported.add(reward.name)
            print(f"warning: reward {reward.name!r} {what}; it scores 0 (reported once)", file=sys.stderr)
        return 0.0

    def score(self, episode) -> None:
        """Fill episode.turn_rewards ([R^T_1, ...], one per tool turn), episode.outcome_reward
        (R^O) and episode.components: each reward's unweighted score, a turn reward's as
        its mean over the tool turns it applies to (0 if none)."""
        row, n_turns = episode.row, len(tool_results(episode.messages))
        per_turn = [[self._score(r, episode, row, j) for r in self.turn] for j in range(1, n_turns + 1)]
        episode.turn_rewards = [sum(r.weight * s for r, s in zip(self.turn, scores) if s is not None)
                                for scores in per_turn]
        components = {}
        for k, r in enumerate(self.turn):
            applied = [scores[k] for scores in per_turn if scores[k] is not None]
            components[r.name] = sum(applied) / len(applied) if applied else 0.0
        outcome = [self._score(r, episode, row) for r in self.outcome]
        episode.outcome_reward = sum(r.weight * s for r, s in zip(self.outcome, outcome))
        episode.components = {**components, **{r.name: s for r, s in zip(self.outcome, outcome)}}


def gold(row: dict) -> list[str]:
    """The gold aliases of a TriviaQA-schema row."""
    return row["answer"]["aliases"]


def turn_result(episode, j: int) -> str:
    """The result text of tool turn j (1-based)."""
    return tool_results(episode.messages)[j - 1]


def _first_passage(result: str) -> str | None:
    """The first passage of a tool result, or None if the call failed."""
    return None if is_error(result) else result.split(PASSAGE_SEP)[0]


def tool_ran(episode, row: dict, j: int) -> float:
    """§3.1 tool execution, of turn j: its call ran (its result is no "Error:")."""
    return float(_first_passage(turn_result(episode, j)) is not None)


def result_has_answer(episode, row: dict, j: int) -> float:
    """§3.1 search result has answer, of turn j: the first passage of its result holds a
    gold alias (whole words). Only the first passage, whatever `k` the call asked for."""
    return answer_found(turn_result(episode, j), row)


@functools.cache  # one Rubric per setting: PAPER_RUBRIC is paper_rubric(None)
def paper_rubric(contains_max_extra_words: int | None = None) -> Rubric:
    """The paper's rubric with the reference's weights (docs/paper.md §3):

        R^T_j = 0.2 tool_execution + 0.5 search_has_answer of tool turn j
        R^O   = 1.0 exact_match + 0.5 contains_answer + 0.2 format + 0.2 xml

    contains_max_extra_words: contains_answer_reward's max_extra_words (None: off)."""
    return Rubric(
        turn=[Reward("tool_execution", 0.2, tool_ran), Reward("search_has_answer", 0.5, result_has_answer)],
        outcome=[Reward("exact_match", 1.0, lambda ep, row: exact_match_reward(ep.messages, gold(row))),
                 Reward("contains_answer", 0.5, lambda ep, row: contains_answer_reward(
                     ep.messages, gold(row), max_extra_words=contains_max_extra_words)),
                 Reward("format", 0.2, lambda ep, row: format_reward(ep.messages)),
                 Reward("xml", 0.2, lambda ep, row: xml_reward(ep.messages))],
    )


PAPER_RUBRIC = paper_rubric(None)  # the key tasks.build looks up


# ---------------------------------------------------------------------------------
# The two-hop task (data.build_two_hop): hop 1 finds the bridge country, hop 2 the answer.
# Pure functions of one tool result and the task's row ({"answer": {"aliases"},
# "bridge": {"aliases"}}).


def bridge_found(result: str, row: dict) -> float:
    """Hop 1's score: the call ran and the first passage of its result, title included
    ("Barbados - Geography - Elevation"), names the bridge (one of its aliases, whole words)."""
    passage = _first_passage(result)
    return float(passage is not None and contains_alias(passage, row["bridge"]["aliases"]))


def answer_found(result: str, row: dict) -> float:
    """The call ran and the first passage of its result holds a gold alias: hop 2's score, and
    result_has_answer's for any tool turn."""
    passage = _first_passage(result)
    return float(passage is not None and contains_alias(passage, row["answer"]["aliases"]))


# Each search is scored by its own hop: R^T_1 = 0.2 tool_execution + 0.5 bridge_found,
# R^T_j = 0.2 tool_execution + 0.5 search_has_answer for j >= 2 (a retry of hop 2 too)
@functools.cache  # TWO_HOP_RUBRIC is two_hop_rubric(None)
def two_hop_rubric(contains_max_extra_words: int | None = None) -> Rubric:
    return Rubric(
        turn=[Reward("tool_execution", 0.2, tool_ran),
              Reward("bridge_found", 0.5, lambda ep, row, j: bridge_found(turn_result(ep, j), row) if j == 1 else None),
              Reward("search_has_answer", 0.5, lambda ep, row, j: answer_found(turn_result(ep, j), row) if j >= 2 else None)],
        outcome=paper_rubric(contains_max_extra_words).outcome,
    )


TWO_HOP_RUBRIC = two_hop_rubric(None)
