"""Turn-level (R^T) and outcome (R^O) rewards of MT-GRPO (docs/paper.md §3).

Every function here is pure: it reads an episode's messages (the chat as a list of
{"role", "content"} dicts, as built by tool_env, read with tool_env's episode readers)
and the gold aliases, and returns a score in [0, 1]. The two sums the algorithm uses
weight them once, with the reference's weights (TURN_WEIGHTS, OUTCOME_WEIGHTS):

    R^T_j = 0.2 tool_execution + 0.5 search_has_answer of tool turn j      (about turn j's call)
    R^O = 1.0 exact_match + 0.5 contains_answer + 0.2 format + 0.2 xml      (about the outcome)

`turn_reward` and `outcome_reward` also return every component's score, unweighted, for
logging (so a logged search_has_answer is a rate, in training as in evaluation).

The two-hop task (data.build_two_hop) scores each search by its own hop
(`two_hop_turn_rewards`): R^T_1 = 0.2 tool_execution + 0.5 bridge_found (search 1 found the
bridge country), R^T_2 = 0.2 tool_execution + 0.5 search_has_answer (search 2 found the answer).

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

import re
import string

from tool_env import (
    ERROR_PREFIX,
    PASSAGE_SEP,
    RESULT_CLOSE,
    RESULT_OPEN,
    assistant_messages,
    episode_messages,
    final_answer,
    tool_results,
)

# TriviaQA's evaluation treats these quote marks as punctuation too.
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u00b4", "`"}
TAGS = ("reasoning", "tool", "answer")

# The only weight layer (docs/paper.md §3): R^T and R^O are these weighted sums.
TURN_WEIGHTS = {"tool_execution": 0.2, "search_has_answer": 0.5}
OUTCOME_WEIGHTS = {"exact_match": 1.0, "contains_answer": 0.5, "format": 0.2, "xml": 0.2}


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
    ok = sum(not r.startswith(ERROR_PREFIX) for r in results)
    return ok / len(results)


def search_has_answer_reward(messages: list[dict], aliases: list[str]) -> float:
    """1 if a gold alias occurs (normalized, whole words) in the first passage of
    the first tool result, else 0. Only the first passage, whatever `k` the call asked
    for: otherwise asking for five passages would buy five chances. An error result
    earns nothing even if it quotes the answer."""
    results = tool_results(messages)
    if not results or results[0].startswith(ERROR_PREFIX):
        return 0.0
    return float(contains_alias(results[0].split(PASSAGE_SEP)[0], aliases))


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


def contains_answer_reward(messages: list[dict], aliases: list[str], max_words: int = 10) -> float:
    """1 if a gold alias occurs in the last <answer> as whole words, the answer
    has at most `max_words` words, and it is not a hedge or a list (unless it is
    exactly a gold alias, e.g. "Washington, D.C."). Fixes of the reference's quirk:
    an answer that pastes a passage, or lists candidates, collects nothing."""
    ans = final_answer(messages)
    if ans is None or len(normalize_answer(ans).split()) > max_words:
        return 0.0
    if is_hedge(ans) and not exact_match(ans, aliases):
        return 0.0
    return float(contains_alias(ans, aliases))


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
# The sums


def _weighted(scores: dict, weights: dict, override: dict | None) -> tuple[float, dict]:
    w = {**weights, **(override or {})}
    return sum(w[k] * v for k, v in scores.items()), scores


def turn_scores(result: str, aliases: list[str]) -> dict:
    """The turn-level scores of one tool turn, from its own result: did the call run,
    and does the first passage of its result contain a gold alias."""
    ok = not result.startswith(ERROR_PREFIX)
    return {"tool_execution": float(ok),
            "search_has_answer": float(ok and contains_alias(result.split(PASSAGE_SEP)[0], aliases))}


def turn_rewards(messages: list[dict], aliases: list[str], weights: dict | None = None) -> tuple[list[float], dict]:
    """R^T_j of each tool turn j (the turns whose call got a result), each the sum of
    TURN_WEIGHTS[c] x turn j's own score c (`weights` overrides some). With one tool
    turn, [R^T] of the paper. Returns ([R^T_1, ...], {component: unweighted score of
    the episode}, as logged: the fraction of calls that ran, and whether the first
    result has the answer)."""
    per_turn = [_weighted(turn_scores(r, aliases), TURN_WEIGHTS, weights)[0] for r in tool_results(messages)]
    return per_turn, {"tool_execution": tool_execution_reward(messages),
                      "search_has_answer": search_has_answer_reward(messages, aliases)}


def turn_reward(messages: list[dict], aliases: list[str], weights: dict | None = None) -> tuple[float, dict]:
    """R^T = the sum of the tool turns' rewards (turn_rewards); with one tool turn the
    paper's sum of TURN_WEIGHTS[c] x score c. Returns (R^T, {component: unweighted score})."""
    per_turn, scores = turn_rewards(messages, aliases, weights)
    return sum(per_turn), scores


def outcome_reward(messages: list[dict], aliases: list[str], weights: dict | None = None) -> tuple[float, dict]:
    """R^O = sum of OUTCOME_WEIGHTS[c] x score c (`weights` overrides some). Returns (R^O,
    {component: unweighted score})."""
    scores = {"exact_match": exact_match_reward(messages, aliases),
              "contains_answer": contains_answer_reward(messages, aliases),
              "format": format_reward(messages), "xml": xml_reward(messages)}
    return _weighted(scores, OUTCOME_WEIGHTS, weights)


# ---------------------------------------------------------------------------------
# The two-hop task (data.build_two_hop): hop 1 finds the bridge country, hop 2 the answer.
# Pure functions of one tool result and the task's row ({"answer": {"aliases"},
# "bridge": {"aliases"}}), so they plug into any reward layer.

TWO_HOP_TURN_WEIGHTS = {"tool_execution": 0.2, "bridge_found": 0.5, "search_has_answer": 0.5}


def _first_passage(result: str) -> str | None:
    """The first passage of a tool result, or None if the call failed."""
    return None if result.startswith(ERROR_PREFIX) else result.split(PASSAGE_SEP)[0]


def bridge_found(result: str, row: dict) -> float:
    """Hop 1's score: the call ran and the first passage of its result, title included
    ("Barbados - Geography - Elevation"), names the bridge (one of its aliases, whole words)."""
    passage = _first_passage(result)
    return float(passage is not None and contains_alias(passage, row["bridge"]["aliases"]))


def answer_found(result: str, row: dict) -> float:
    """Hop 2's score: the call ran and the first passage of its result holds a gold
    alias (turn_scores' search_has_answer)."""
    passage = _first_passage(result)
    return float(passage is not None and contains_alias(passage, row["answer"]["aliases"]))


def two_hop_turn_rewards(messages: list[dict], row: dict, weights: dict | None = None) -> tuple[list[float], dict]:
    """R^T_j of each tool turn j of a two-hop episode: turn 1 is
    0.2 tool_execution + 0.5 bridge_found, turn 2 (and any later one, a retry of hop 2)
    0.2 tool_execution + 0.5 answer_found, each from its own result (TWO_HOP_TURN_WEIGHTS;
    `weights` overrides some). Returns ([R^T_1, ...], components as logged: the fraction of
    calls that ran, whether search 1 found the bridge, whether search 2 found the answer)."""
    w = {**TWO_HOP_TURN_WEIGHTS, **(weights or {})}
    results = tool_results(messages)
    per_turn = [w["tool_execution"] * (not r.startswith(ERROR_PREFIX))
                + (w["bridge_found"] * bridge_found(r, row) if j == 0 else w["search_has_answer"] * answer_found(r, row))
                for j, r in enumerate(results)]
    return per_turn, {"tool_execution": tool_execution_reward(messages),
                      "bridge_found": bridge_found(results[0], row) if results else 0.0,
                      "search_has_answer": answer_found(results[1], row) if len(results) > 1 else 0.0}
