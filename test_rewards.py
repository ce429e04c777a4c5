"""Tests of rewards.py on crafted episodes, with hand-computed expectations."""

import pytest

from conftest import chat
from rewards import (
    PAPER_RUBRIC,
    TWO_HOP_RUBRIC,
    Reward,
    Rubric,
    _format_score,
    _xml_score,
    answer_found,
    bridge_found,
    contains_answer_reward,
    exact_match,
    format_reward,
    normalize_answer,
    tool_execution_reward,
    xml_reward,
)
from sampler import Episode
from tool_env import final_answer

ALIASES = ["Mount Catherine", "Mt. Catherine"]
CALL = '<reasoning>search</reasoning>\n<tool>{"name": "wiki_search", "args": {"query": "Egypt highest point"}}</tool>'
GOOD_RESULT = "<result>\nEgypt - Geography - Elevation\nhighest point: Mount Catherine 2,629 m\n</result>"
BAD_RESULT = "<result>\nEgypt - Geography - Coastline\n2,450 km\n</result>"
ERROR_RESULT = "<result>\nError: invalid JSON inside <tool>: Expecting value at character 0\n</result>"


ROW = {"question_id": "q", "question": "highest point in Egypt?", "answer": {"aliases": ALIASES}}
TURN, OUTCOME = ("tool_execution", "search_has_answer"), ("exact_match", "contains_answer", "format", "xml")


def episode(*turns):
    return chat(*turns, question="highest point in Egypt?")


def scored(msgs, rubric=PAPER_RUBRIC, row=ROW) -> Episode:
    """An episode of these messages, scored by `rubric` (its turn_rewards, outcome_reward, components)."""
    ep = Episode(row, msgs)
    rubric.score(ep)
    return ep


def parts(ep, names):
    return {k: ep.components[k] for k in names}


def answer(a):
    return f"<reasoning>found it</reasoning>\n<answer>{a}</answer>"


@pytest.mark.parametrize("s, expected", [
    ("The Beatles", "beatles"),
    ("  Mt. Catherine ", "mt catherine"),
    ("rock_and_roll", "rock and roll"),
    ("O'Brien", "o brien"),
    ("\u2018quoted\u2019 `x\u00b4", "quoted x"),
    ("A Tale of Two Cities", "tale of two cities"),
    ("theatre an anthem", "theatre anthem"),  # articles only as whole words
    ("U.S.A.", "u s"),  # "a" left alone by the dots becomes an article and is removed, as in TriviaQA
    ("Bilady, Bilady, Bilady", "bilady bilady bilady"),
    ("", ""),
])
def test_normalize_answer(s, expected):
    assert normalize_answer(s) == expected


def test_exact_match():
    assert exact_match("mt catherine", ALIASES) == 1.0
    assert exact_match("The Mount Catherine.", ALIASES) == 1.0
    assert exact_match("Mount Sinai", ALIASES) == 0.0
    assert exact_match("Catherine", ALIASES) == 0.0
    assert exact_match("", ["", "the"]) == 0.0  # empty aliases never match


def test_correct_episode():
    ep = scored(episode(CALL, GOOD_RESULT, answer("Mount Catherine")))
    assert parts(ep, TURN) == {"tool_execution": 1.0, "search_has_answer": 1.0}  # scores, unweighted
    assert ep.turn_rewards == pytest.approx([0.2 * 1 + 0.5 * 1])
    assert parts(ep, OUTCOME) == {"exact_match": 1.0, "contains_answer": 1.0, "format": 1.0, "xml": 1.0}
    assert ep.outcome_reward == pytest.approx(1.0 + 0.5 + 0.2 + 0.2)


def test_wrong_answer_after_useless_search():
    ep = scored(episode(CALL, BAD_RESULT, answer("Mount Sinai")))
    assert parts(ep, TURN) == {"tool_execution": 1.0, "search_has_answer": 0.0}
    assert ep.turn_reward == pytest.approx(0.2)
    assert ep.components["exact_match"] == 0.0 and ep.components["contains_answer"] == 0.0
    assert ep.outcome_reward == pytest.approx(0.2 + 0.2)  # format and xml only


def test_error_result_is_a_failed_call():
    # the error text quotes nothing useful, and an error never counts as the search result
    msgs = episode("<tool>{oops}</tool>", ERROR_RESULT, answer("Mount Catherine"))
    assert tool_execution_reward(msgs) == 0.0
    assert parts(scored(msgs), TURN) == {"tool_execution": 0.0, "search_has_answer": 0.0}
    msgs = episode("<tool>x</tool>", "<result>\nError: Mount Catherine not found\n</result>", answer("x"))
    assert scored(msgs).components["search_has_answer"] == 0.0 and scored(msgs).turn_rewards == [0.0]


def test_two_calls_one_failed():
    msgs = episode(CALL, ERROR_RESULT, CALL, GOOD_RESULT, answer("Mt Catherine"))
    assert tool_execution_reward(msgs) == pytest.approx(0.5)  # 1 of 2 calls ran
    # each tool turn is scored on its own call and result: turn 1 failed, turn 2 ran and found it
    ep = scored(msgs)
    assert ep.turn_rewards == pytest.approx([0.0, 0.2 + 0.5])
    assert parts(ep, TURN) == {"tool_execution": 0.5, "search_has_answer": 0.5}  # logged: the mean over the turns
    assert ep.turn_reward == pytest.approx(0.7)  # R^T: the sum over the tool turns
    # one tool turn: the paper's R^T, one value
    assert scored(episode(CALL, GOOD_RESULT, answer("x"))).turn_rewards == pytest.approx([0.7])
    assert scored(episode(CALL, BAD_RESULT, answer("x"))).turn_rewards == pytest.approx([0.2])
    assert scored(episode(answer("x"))).turn_rewards == []  # no tool turn


def test_no_tool_call():
    ep = scored(episode(answer("Mount Catherine")))
    assert ep.turn_reward == 0.0 and parts(ep, TURN) == {"tool_execution": 0.0, "search_has_answer": 0.0}
    assert ep.outcome_reward == pytest.approx(1.9)


def test_pasted_passage_earns_no_contains():
    paste = "Egypt - Geography - Elevation highest point: Mount Catherine 2,629 m lowest point: Qattara Depression"
    msgs = episode(CALL, GOOD_RESULT, answer(paste))
    assert contains_answer_reward(msgs, ALIASES) == 0.0
    assert contains_answer_reward(episode(answer("It is Mount Catherine")), ALIASES) == 1.0
    # whole words only: "Catherine" alone is not "Mount Catherine", and "Mt. Catherineville" is not either
    assert contains_answer_reward(episode(answer("Catherine")), ALIASES) == 0.0
    assert contains_answer_reward(episode(answer("Mt. Catherineville")), ALIASES) == 0.0


def test_final_answer_is_the_last_one_and_skips_fewshot():
    demo = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Question: demo"},
        {"role": "assistant", "content": "<reasoning>r</reasoning><answer>Mount Catherine</answer>"},
        {"role": "user", "content": "Question: real"},
        {"role": "assistant", "content": "no tags at all"},
    ]
    assert final_answer(demo) is None
    assert parts(scored(demo), OUTCOME) == {"exact_match": 0.0, "contains_answer": 0.0, "format": 0.0, "xml": 0.0}
    msgs = episode("<answer>a</answer> <answer>b</answer>")
    assert final_answer(msgs) == "b"


def test_malformed_format_and_xml():
    # starts with reasoning, has reasoning, one action after it, ends right: 4/4
    assert _format_score(CALL) == 1.0
    # no reasoning: only "ends with an action tag" passes -> 1/4
    assert _format_score("<answer>x</answer>") == pytest.approx(1 / 4)
    # writes a <result> itself: 0, whatever else is right
    assert _format_score("<reasoning>r</reasoning><answer>x</answer><result>y</result>") == 0.0
    assert _format_score("<reasoning>r</reasoning><result>y</result><answer>x</answer>") == 0.0
    # both tool and answer -> the one-action check fails -> 3/4
    assert _format_score("<reasoning>r</reasoning><tool>{}</tool><answer>x</answer>") == pytest.approx(3 / 4)
    # the action must come after the reasoning -> 3/4
    assert _format_score("<reasoning><answer>x</answer></reasoning></answer>") == pytest.approx(3 / 4)
    # plain text -> 0
    assert _format_score("Cairo") == 0.0

    assert _xml_score("<reasoning>a</reasoning><answer>b</answer>") == 1.0
    assert _xml_score("<reasoning>a<reasoning></reasoning><answer>b") == pytest.approx((0.5 + 0.5) / 2)
    assert _xml_score("no tags") == 0.0
    msgs = episode(CALL, GOOD_RESULT, "Cairo")
    assert format_reward(msgs) == pytest.approx((1 + 0) / 2)
    assert xml_reward(msgs) == pytest.approx((1 + 0) / 2)


def test_a_rubric_is_its_weighted_callables():
    msgs = episode(CALL, GOOD_RESULT, answer("Mount Catherine"))
    heavier = Rubric([Reward(r.name, 2.0 if r.name == "search_has_answer" else r.weight, r.fn) for r in PAPER_RUBRIC.turn],
                     [r for r in PAPER_RUBRIC.outcome if r.name == "exact_match"])
    ep = scored(msgs, heavier)
    assert ep.turn_rewards == pytest.approx([0.2 * 1 + 2.0 * 1])  # the weight replaces 0.5
    assert ep.outcome_reward == 1.0 and set(ep.components) == {"tool_execution", "search_has_answer", "exact_match"}
    # a reward reads the whole row, not only the aliases: here a column of the user's own
    row = {**ROW, "max_words": 2}
    short = Rubric([], [Reward("short", 0.5, lambda ep, row: float(len(final_answer(ep.messages).split()) <= row["max_words"]))])
    assert scored(msgs, short, row).outcome_reward == 0.5
    assert scored(episode(answer("the Mount of Saint Catherine")), short, row).outcome_reward == 0.0


def test_a_reward_that_misbehaves_scores_0_and_is_reported_once(capsys):
    def broken(ep, row):
        raise KeyError("gold")
    rubric = Rubric([Reward("turn_boom", 1.0, lambda ep, row, j: 1 / 0)],
                    [Reward("boom", 1.0, broken), Reward("big", 1.0, lambda ep, row: 3.0),
                     Reward("nan", 1.0, lambda ep, row: float("nan")), Reward("text", 1.0, lambda ep, row: "1"),
                     Reward("ok", 0.5, lambda ep, row: True)])
    for _ in range(2):
        ep = scored(episode(CALL, GOOD_RESULT, answer("x")), rubric)
        assert ep.turn_rewards == [0.0] and ep.outcome_reward == 0.5
        assert ep.components == {"turn_boom": 0.0, "boom": 0.0, "big": 0.0, "nan": 0.0, "text": 0.0, "ok": 1.0}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5  # once each, not once per episode
    assert "reward 'boom' raised KeyError" in err[1] and "'big' returned 3.0, not a score in [0, 1]" in err[2]


def test_search_has_answer_reads_the_first_passage_only():
    two = "<result>\nEgypt - Geography - Coastline\n2,450 km\n\nEgypt - Geography - Elevation\nhighest point: Mount Catherine\n</result>"
    assert scored(episode(CALL, two, answer("x"))).components["search_has_answer"] == 0.0  # in the second passage: no
    first = "<result>\nEgypt - Geography - Elevation\nhighest point: Mount Catherine\n\nEgypt - Geography - Coastline\n2,450 km\n</result>"
    assert scored(episode(CALL, first, answer("x"))).components["search_has_answer"] == 1.0


def test_search_results_keep_passages_apart():
    from tool_env import PASSAGE_SEP, SearchIndex

    index = SearchIndex([{"title": "A", "text": "alpha beta\n\n\ngamma"}, {"title": "B", "text": "beta delta"}])
    out = index.search("beta", k=2)
    assert out.count(PASSAGE_SEP) == 1  # the blank lines inside passage A were collapsed
    assert sorted(p.split("\n")[0] for p in out.split(PASSAGE_SEP)) == ["A", "B"]


@pytest.mark.parametrize("ans, aliases, expected", [
    ("Gitega", ["Gitega"], 1.0),
    ("Gitega or Bujumbura", ["Gitega"], 0.0),  # a hedge
    ("Cairo, Giza, Alexandria", ["Cairo"], 0.0),  # a list
    ("Cairo / Giza", ["Cairo"], 0.0),
    ("either Cairo", ["Cairo"], 1.0),  # one candidate: "either" alone splits off nothing
    ("Washington, D.C.", ["Washington, D.C."], 1.0),  # an exact alias with a comma is not a list
    ("Port of Spain, Trinidad and Tobago", ["Port of Spain"], 0.0),
    ("the capital is Port of Spain", ["Port of Spain"], 1.0),
    ("Trinidad and Tobago", ["Trinidad and Tobago"], 1.0),  # "and" is not a list separator
    ("The population is 870,000 Libreville.", ["Libreville"], 1.0),  # nor a comma inside a number
    ("870, Libreville", ["Libreville"], 0.0),
])
def test_contains_answer_pays_nothing_for_hedges_and_lists(ans, aliases, expected):
    assert contains_answer_reward(episode(answer(ans)), aliases) == expected


def test_ending_on_a_second_tool_call_scores_below_answering():
    loop = episode(CALL, GOOD_RESULT, CALL)  # the second call is not executed: the episode ends
    wrong = episode(CALL, GOOD_RESULT, answer("Mount Sinai"))
    ro_loop, parts_loop = scored(loop).outcome_reward, scored(loop).components
    ro_wrong = scored(wrong).outcome_reward
    # format: the last message did not answer -> (1 + 0) / 2; xml is right in both messages
    assert parts_loop["format"] == pytest.approx(0.5) and parts_loop["xml"] == pytest.approx(1.0)
    assert ro_loop == pytest.approx(0.2 * 0.5 + 0.2 * 1.0) and ro_wrong == pytest.approx(0.2 + 0.2)
    # a turn cut off by the budget did not answer either
    cut = episode(CALL, GOOD_RESULT, "<reasoning>the result says")
    assert format_reward(cut) == pytest.approx((1 + 0) / 2)


def test_xml_counts_missing_required_tags():
    assert _xml_score("<answer>x</answer>") == pytest.approx(0.5)  # reasoning missing
    assert _xml_score('<tool>{"name": "wiki_search"}</tool>') == pytest.approx(0.5)
    assert _xml_score("<reasoning>r</reasoning>") == pytest.approx(0.5)  # no action: answer missing
    assert _xml_score("<reasoning>r</reasoning><tool>{}</tool><answer>x</answer>") == 1.0  # all used once
    assert _xml_score(answer("x")) == 1.0


# ---------------------------------------------------------------------------------
# The two-hop task's turn rewards

ROW_2HOP = {"answer": {"aliases": ["Barbadian dollar", "Barbadian dollars", "BBD"]},
            "bridge": {"value": "Barbados", "aliases": ["Barbados"]}}
HOP1 = "<result>\nBarbados - Geography - Elevation\nhighest point: Mount Hillaby 340 m\n</result>"
HOP1_WRONG = "<result>\nJamaica - Geography - Elevation\nhighest point: Blue Mountain Peak 2,256 m\n</result>"
HOP2 = "<result>\nBarbados - Economy - Exchange rates\nCurrency: Barbadian dollars (BBD) per US dollar -\n</result>"
# the answer is there, but only in the second passage
HOP2_SECOND = ("<result>\nBarbados - Government - Capital\nname: Bridgetown\n\n"
               "Barbados - Economy - Exchange rates\nCurrency: Barbadian dollars (BBD) per US dollar -\n</result>")


def two_hop(*turns):
    return chat(*turns, question="What is the currency of the country whose highest point is Mount Hillaby?")


def _result(message):
    return message.removeprefix("<result>\n").removesuffix("\n</result>")


def test_bridge_found_and_answer_found_read_one_result():
    assert bridge_found(_result(HOP1), ROW_2HOP) == 1.0  # the title names the bridge
    assert bridge_found(_result(HOP1_WRONG), ROW_2HOP) == 0.0
    assert bridge_found("Error: Barbados", ROW_2HOP) == 0.0  # a failed call finds nothing
    assert bridge_found(_result(HOP2_SECOND).replace("Barbados - Government", "Jamaica - Government"), ROW_2HOP) == 0.0
    assert answer_found(_result(HOP2), ROW_2HOP) == 1.0 and answer_found(_result(HOP1), ROW_2HOP) == 0.0
    assert answer_found(_result(HOP2_SECOND), ROW_2HOP) == 0.0  # the first passage only
    assert answer_found("Error: Barbadian dollar", ROW_2HOP) == 0.0


def test_two_hop_turn_rewards():
    def score(*turns):
        ep = scored(two_hop(*turns), TWO_HOP_RUBRIC, ROW_2HOP)
        return ep.turn_rewards, parts(ep, ("tool_execution", "bridge_found", "search_has_answer"))

    # both hops found: [0.2 + 0.5, 0.2 + 0.5]
    r, p = score(CALL, HOP1, CALL, HOP2, answer("Barbadian dollar"))
    assert r == pytest.approx([0.7, 0.7])
    assert p == {"tool_execution": 1.0, "bridge_found": 1.0, "search_has_answer": 1.0}
    # the wrong country, then its currency: search 1 ran but found no bridge; search 2 ran
    r, p = score(CALL, HOP1_WRONG, CALL, HOP2_SECOND, answer("x"))
    assert r == pytest.approx([0.2, 0.2]) and p["bridge_found"] == 0.0 and p["search_has_answer"] == 0.0
    # one search that found the bridge, then an answer: one tool turn
    r, p = score(CALL, HOP1, answer("BBD"))
    assert r == pytest.approx([0.7]) and p == {"tool_execution": 1.0, "bridge_found": 1.0, "search_has_answer": 0.0}
    # the answer in search 1's result pays hop 1 nothing beyond the bridge (its title names Barbados)
    assert score(CALL, HOP2, answer("BBD"))[0] == pytest.approx([0.7])
    # a failed first call, then the bridge: hop 2's score is the answer's, not the bridge's
    r, p = score(CALL, ERROR_RESULT, CALL, HOP1, answer("x"))
    assert r == pytest.approx([0.0, 0.2]) and p["tool_execution"] == 0.5
    # no call
    assert score(answer("BBD")) == ([], {"tool_execution": 0.0, "bridge_found": 0.0, "search_has_answer": 0.0})
    # a third search is scored as hop 2 (a retry of it); logged: the mean over the hop-2 turns
    r, p = score(CALL, HOP1, CALL, HOP1, CALL, HOP2)
    assert r == pytest.approx([0.7, 0.2, 0.7]) and p["search_has_answer"] == 0.5
    # the outcome is the paper's: the same rewards and weights, the same R^O
    assert [(r.name, r.weight) for r in TWO_HOP_RUBRIC.outcome] == [(r.name, r.weight) for r in PAPER_RUBRIC.outcome]
    msgs = episode(CALL, GOOD_RESULT, answer("It is Mount Catherine"))
    assert scored(msgs, TWO_HOP_RUBRIC).outcome_reward == scored(msgs).outcome_reward == pytest.approx(0.5 + 0.4)


@pytest.mark.parametrize("ans, expected", [
    ("Mt. Catherine", 1.0),  # the alias itself
    ("Mount Catherine volcano", 1.0),  # 1 extra word: the limit
    ("The Mount Catherine", 1.0),  # articles are not words (TriviaQA's normalization)
    ("It is Mount Catherine", 0.0),  # 2 extra
    ("The answer is Mount Catherine", 0.0),  # 2 extra ("the" dropped)
    ("The result says the code is Mt. Catherine.", 0.0),  # recipe v2's trap: 4 extra
    ("Catherine", 0.0),  # no alias
])
def test_contains_answer_with_a_length_limit_relative_to_the_alias(ans, expected):
    """max_extra_words = 1: at most 1 normalized word more than the alias the answer
    contains. Without the limit (10-word cap only) all but "Catherine" score 1."""
    msgs = episode(answer(ans))
    assert contains_answer_reward(msgs, ALIASES, max_extra_words=1) == expected
    assert contains_answer_reward(msgs, ALIASES) == float(ans != "Catherine")


def test_the_length_limit_is_measured_against_the_alias_the_answer_holds():
    """An answer holding a 3-word alias (and the 1-word one inside it) gets the 3-word
    alias's room; one holding only the 1-word alias gets that alias's room."""
    aliases = ["Fogo", "Pico do Fogo"]
    assert contains_answer_reward(episode(answer("peak Pico do Fogo")), aliases, max_extra_words=1) == 1.0
    assert contains_answer_reward(episode(answer("peak of Fogo")), aliases, max_extra_words=1) == 0.0
    assert contains_answer_reward(episode(answer("Fogo peak")), aliases, max_extra_words=1) == 1.0


def test_the_rubric_option_reaches_the_outcome_reward():
    """tasks.build's contains_max_extra_words gives the paper's rubric (and the two-hop one)
    that limit: the trap answer's R^O loses the 0.5 of contains_answer, nothing else."""
    import tasks

    msgs = episode(CALL, GOOD_RESULT, answer("The result says the code is Mt. Catherine."))
    plain, limited = scored(msgs), scored(msgs, tasks.build({"task": "factbook", "contains_max_extra_words": 1}).rubric)
    assert plain.components["contains_answer"] == 1.0 and limited.components["contains_answer"] == 0.0
    assert plain.outcome_reward - limited.outcome_reward == pytest.approx(0.5)
    two_hop = tasks.build({"task": "factbook-2hop", "contains_max_extra_words": 1}).rubric
    assert [r.name for r in two_hop.turn] == [r.name for r in TWO_HOP_RUBRIC.turn]
    assert scored(msgs, two_hop).components["contains_answer"] == 0.0
