"""Tests of rewards.py on crafted episodes, with hand-computed expectations."""

import pytest

from conftest import chat
from rewards import (
    _format_score,
    _xml_score,
    answer_found,
    bridge_found,
    contains_answer_reward,
    exact_match,
    format_reward,
    normalize_answer,
    outcome_reward,
    search_has_answer_reward,
    tool_execution_reward,
    turn_reward,
    turn_rewards,
    two_hop_turn_rewards,
    xml_reward,
)
from tool_env import final_answer

ALIASES = ["Mount Catherine", "Mt. Catherine"]
CALL = '<reasoning>search</reasoning>\n<tool>{"name": "wiki_search", "args": {"query": "Egypt highest point"}}</tool>'
GOOD_RESULT = "<result>\nEgypt - Geography - Elevation\nhighest point: Mount Catherine 2,629 m\n</result>"
BAD_RESULT = "<result>\nEgypt - Geography - Coastline\n2,450 km\n</result>"
ERROR_RESULT = "<result>\nError: invalid JSON inside <tool>: Expecting value at character 0\n</result>"


def episode(*turns):
    return chat(*turns, question="highest point in Egypt?")


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
    msgs = episode(CALL, GOOD_RESULT, answer("Mount Catherine"))
    rt, parts = turn_reward(msgs, ALIASES)
    assert parts == {"tool_execution": 1.0, "search_has_answer": 1.0}  # scores, unweighted
    assert rt == pytest.approx(0.2 * 1 + 0.5 * 1)
    ro, parts = outcome_reward(msgs, ALIASES)
    assert parts == {"exact_match": 1.0, "contains_answer": 1.0, "format": 1.0, "xml": 1.0}
    assert ro == pytest.approx(1.0 + 0.5 + 0.2 + 0.2)


def test_wrong_answer_after_useless_search():
    msgs = episode(CALL, BAD_RESULT, answer("Mount Sinai"))
    rt, parts = turn_reward(msgs, ALIASES)
    assert parts == {"tool_execution": 1.0, "search_has_answer": 0.0}
    assert rt == pytest.approx(0.2)
    ro, parts = outcome_reward(msgs, ALIASES)
    assert parts["exact_match"] == 0.0 and parts["contains_answer"] == 0.0
    assert ro == pytest.approx(0.2 + 0.2)  # format and xml only


def test_error_result_is_a_failed_call():
    # the error text quotes nothing useful, and an error never counts as the search result
    msgs = episode("<tool>{oops}</tool>", ERROR_RESULT, answer("Mount Catherine"))
    assert tool_execution_reward(msgs) == 0.0
    assert search_has_answer_reward(msgs, ALIASES) == 0.0
    msgs = episode("<tool>x</tool>", "<result>\nError: Mount Catherine not found\n</result>", answer("x"))
    assert search_has_answer_reward(msgs, ALIASES) == 0.0


def test_two_calls_one_failed():
    msgs = episode(CALL, ERROR_RESULT, CALL, GOOD_RESULT, answer("Mt Catherine"))
    assert tool_execution_reward(msgs) == pytest.approx(0.5)  # 1 of 2 calls ran
    assert search_has_answer_reward(msgs, ALIASES) == 0.0  # the logged component: the first result
    # each tool turn is scored on its own call and result: turn 1 failed, turn 2 ran and found it
    per_turn, parts = turn_rewards(msgs, ALIASES)
    assert per_turn == pytest.approx([0.0, 0.2 + 0.5])
    assert parts == {"tool_execution": 0.5, "search_has_answer": 0.0}
    assert turn_reward(msgs, ALIASES)[0] == pytest.approx(0.7)  # R^T: the sum over the tool turns
    # one tool turn: the paper's R^T, one value
    assert turn_rewards(episode(CALL, GOOD_RESULT, answer("x")), ALIASES)[0] == pytest.approx([0.7])
    assert turn_rewards(episode(CALL, BAD_RESULT, answer("x")), ALIASES)[0] == pytest.approx([0.2])
    assert turn_rewards(episode(answer("x")), ALIASES)[0] == []  # no tool turn


def test_no_tool_call():
    msgs = episode(answer("Mount Catherine"))
    rt, parts = turn_reward(msgs, ALIASES)
    assert rt == 0.0 and parts == {"tool_execution": 0.0, "search_has_answer": 0.0}
    ro, _ = outcome_reward(msgs, ALIASES)
    assert ro == pytest.approx(1.9)


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
    assert outcome_reward(demo, ALIASES)[1] == {"exact_match": 0.0, "contains_answer": 0.0, "format": 0.0, "xml": 0.0}
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


def test_weights():
    msgs = episode(CALL, GOOD_RESULT, answer("Mount Catherine"))
    rt, parts = turn_reward(msgs, ALIASES, weights={"search_has_answer": 2.0})
    assert rt == pytest.approx(0.2 * 1 + 2.0 * 1)  # the override replaces 0.5
    ro, _ = outcome_reward(msgs, ALIASES, weights={"format": 0.0, "xml": 0.0, "contains_answer": 0.0})
    assert ro == 1.0


def test_search_has_answer_reads_the_first_passage_only():
    two = "<result>\nEgypt - Geography - Coastline\n2,450 km\n\nEgypt - Geography - Elevation\nhighest point: Mount Catherine\n</result>"
    assert search_has_answer_reward(episode(CALL, two, answer("x")), ALIASES) == 0.0  # in the second passage: no
    first = "<result>\nEgypt - Geography - Elevation\nhighest point: Mount Catherine\n\nEgypt - Geography - Coastline\n2,450 km\n</result>"
    assert search_has_answer_reward(episode(CALL, first, answer("x")), ALIASES) == 1.0


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
    ro_loop, parts_loop = outcome_reward(loop, ALIASES)
    ro_wrong, parts_wrong = outcome_reward(wrong, ALIASES)
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
    # both hops found: [0.2 + 0.5, 0.2 + 0.5]
    r, parts = two_hop_turn_rewards(two_hop(CALL, HOP1, CALL, HOP2, answer("Barbadian dollar")), ROW_2HOP)
    assert r == pytest.approx([0.7, 0.7])
    assert parts == {"tool_execution": 1.0, "bridge_found": 1.0, "search_has_answer": 1.0}
    # the wrong country, then its currency: search 1 ran but found no bridge; search 2 ran
    r, parts = two_hop_turn_rewards(two_hop(CALL, HOP1_WRONG, CALL, HOP2_SECOND, answer("x")), ROW_2HOP)
    assert r == pytest.approx([0.2, 0.2]) and parts["bridge_found"] == 0.0 and parts["search_has_answer"] == 0.0
    # one search that found the bridge, then an answer: one tool turn
    r, parts = two_hop_turn_rewards(two_hop(CALL, HOP1, answer("BBD")), ROW_2HOP)
    assert r == pytest.approx([0.7]) and parts == {"tool_execution": 1.0, "bridge_found": 1.0, "search_has_answer": 0.0}
    # the answer in search 1's result pays hop 1 nothing beyond the bridge (its title names Barbados)
    r, _ = two_hop_turn_rewards(two_hop(CALL, HOP2, answer("BBD")), ROW_2HOP)
    assert r == pytest.approx([0.7])
    # a failed first call, then the bridge: hop 2's score is the answer's, not the bridge's
    r, parts = two_hop_turn_rewards(two_hop(CALL, ERROR_RESULT, CALL, HOP1, answer("x")), ROW_2HOP)
    assert r == pytest.approx([0.0, 0.2]) and parts["tool_execution"] == 0.5
    # no call; weights override
    assert two_hop_turn_rewards(two_hop(answer("BBD")), ROW_2HOP) == ([], {"tool_execution": 0.0, "bridge_found": 0.0,
                                                                          "search_has_answer": 0.0})
    r, _ = two_hop_turn_rewards(two_hop(CALL, HOP1, CALL, HOP2), ROW_2HOP, {"bridge_found": 1.0, "tool_execution": 0.0})
    assert r == pytest.approx([1.0, 0.5])
    # a third search is scored as hop 2 (a retry of it)
    r, _ = two_hop_turn_rewards(two_hop(CALL, HOP1, CALL, HOP1, CALL, HOP2), ROW_2HOP)
    assert r == pytest.approx([0.7, 0.2, 0.7])
