"""Tests of tool_env: parsing, tool execution errors, episode rules, search (the data: test_data.py)."""

import json

import typing

import pytest

import tool_env
from conftest import chat
from tool_env import env_step, parse_tool_call, run_tool_call


def good_call(query="capital of Egypt", **extra):
    return f'<reasoning>look it up</reasoning>\n<tool>{json.dumps({"name": "wiki_search", "args": {"query": query, **extra}})}</tool>'


# ------------------------------------------------------------------ parse_tool_call

def test_parse_tool_call_valid():
    assert parse_tool_call(good_call("x y")) == ("wiki_search", {"query": "x y"})
    # the first of two calls is taken
    two = good_call("first") + good_call("second")
    assert parse_tool_call(two) == ("wiki_search", {"query": "first"})
    # whitespace and newlines inside the tag are fine
    assert parse_tool_call('<tool>\n {"name": "t", "args": {}} \n</tool>') == ("t", {})
    # missing "args" means no arguments
    assert parse_tool_call('<tool>{"name": "t"}</tool>') == ("t", {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("I will just answer.", "no <tool> tag"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x"}}', "not closed"),
        ("<tool></tool>", "empty"),
        ("<tool>   </tool>", "empty"),
        ("<tool>{'name': 'wiki_search', 'args': {'query': 'x'}}</tool>", "invalid JSON"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x",},}</tool>', "invalid JSON"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x"}</tool>', "invalid JSON"),
        ('<tool>wiki_search("x")</tool>', "invalid JSON"),
        ('<tool>["wiki_search", "x"]</tool>', "must be a JSON object, got list"),
        ('<tool>"wiki_search"</tool>', "must be a JSON object, got str"),
        ('<tool>{"args": {"query": "x"}}</tool>', 'no "name"'),
        ('<tool>{"name": 3, "args": {}}</tool>', '"name" must be'),
        ('<tool>{"name": "wiki search!", "args": {}}</tool>', '"name" must be'),
        ('<tool>{"name": "wiki_search", "args": "x"}</tool>', '"args" must be a JSON object'),
        ('<tool>{"name": "wiki_search", "args": {}, "k": 2}</tool>', "unexpected keys"),
        ('<answer>see <tool>{"name": "wiki_search", "args": {"query": "x"}}</tool>', "inside <answer>"),
        ('<tool><tool>{"name": "wiki_search", "args": {"query": "x"}}</tool></tool>', "invalid JSON"),
        ('</tool>{"name": "wiki_search"}', "no <tool> tag"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x\u0001"}}</tool>', "invalid JSON"),
    ],
)
def test_parse_tool_call_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_tool_call(text)


# ------------------------------------------------------------------ run_tool_call

@pytest.mark.parametrize(
    "text, message",
    [
        ("no call at all", "Error: no <tool> tag"),
        ("<tool>{'name': 'wiki_search'}</tool>", "Error: invalid JSON"),
        ('<tool>{"name": "google", "args": {"query": "x"}}</tool>', "Error: unknown tool 'google'"),
        ('<tool>{"name": "wiki_search", "args": {}}</tool>', "Error: missing argument 'query'"),
        ('<tool>{"name": "wiki_search", "args": {"q": "x"}}</tool>', "Error: unexpected argument(s) ['q']"),
        ('<tool>{"name": "wiki_search", "args": {"query": 42}}</tool>', "Error: argument 'query' must be str, got int"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x", "k": "2"}}</tool>', "Error: argument 'k' must be int"),
        ('<tool>{"name": "wiki_search", "args": {"query": "x", "k": true}}</tool>', "Error: argument 'k' must be int, got bool"),
        ('<tool>{"name": "wiki_search", "args": {"query": "   "}}</tool>', "Error: argument 'query' is empty"),
        ('<tool>{"name": "wiki_search", "args": {"query": "Egypt", "k": 9}}</tool>', "Error: wiki_search failed: ValueError: k must be between 1 and 5"),
        ('<tool>{"name": "wiki_search", "args": {"query": "the of and"}}</tool>', "Error: wiki_search returned nothing"),
        ('<tool>{"name": "wiki_search", "args": {"query": "zzzqqq"}}</tool>', "Error: wiki_search returned nothing"),
        (good_call("x" * 100_000), "Error: argument 'query' is too long (100000 > 1000"),
    ],
)
def test_run_tool_call_errors(tools, text, message):
    out = run_tool_call(text, tools)
    assert out.startswith(message), out


def test_run_tool_call_tool_that_raises_or_returns_nothing():
    def boom(query: str) -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    def silent(query: str) -> str:
        """Returns nothing."""
        return None

    tools = {"boom": boom, "silent": silent}
    call = '<tool>{"name": "%s", "args": {"query": "x"}}</tool>'
    assert run_tool_call(call % "boom", tools) == "Error: boom failed: RuntimeError: disk on fire"
    assert run_tool_call(call % "silent", tools) == "Error: silent returned nothing for these arguments"


def _typed_tools():
    from typing import Literal

    def convert(amount: float, currency: Literal["EUR", "USD"], tags: list[str] | None = None) -> str:
        """Converts an amount."""
        return f"{amount!r} {currency} {tags!r}"

    def weights(w: dict[str, float]) -> str:
        """Takes named weights."""
        return repr(w)

    return {"convert": convert, "weights": weights}


@pytest.mark.parametrize("args, out", [
    # an int where a float is asked is accepted, as a float (JSON writes 2.0 as 2)
    ('{"amount": 2, "currency": "EUR"}', "2.0 EUR None"),
    ('{"amount": 2.5, "currency": "USD", "tags": ["a", "b"]}', "2.5 USD ['a', 'b']"),
    ('{"amount": 1, "currency": "EUR", "tags": null}', "1.0 EUR None"),
    ('{"amount": "2", "currency": "EUR"}', "Error: argument 'amount' must be a number, got str"),
    ('{"amount": true, "currency": "EUR"}', "Error: argument 'amount' must be a number, got bool"),
    ('{"amount": 1, "currency": "GBP"}', "Error: argument 'currency' must be one of ['EUR', 'USD'], got 'GBP'"),
    ('{"amount": 1, "currency": "EUR", "tags": "a"}', "Error: argument 'tags' must be a list, got str"),
    ('{"amount": 1, "currency": "EUR", "tags": ["a", 3]}', "Error: argument 'tags[1]' must be str, got int"),
    ('{"amount": 1, "currency": ["EUR"]}', "Error: argument 'currency' must be one of ['EUR', 'USD'], got ['EUR']"),
])
def test_arguments_are_checked_against_real_annotations(args, out):
    """list[str], Literal, X | None and float annotations: an error result, never a
    TypeError from isinstance (which refuses subscripted generics)."""
    assert run_tool_call(f'<tool>{{"name": "convert", "args": {args}}}</tool>', _typed_tools()) == out


def test_dict_arguments_and_their_values():
    tools = _typed_tools()
    assert run_tool_call('<tool>{"name": "weights", "args": {"w": {"a": 1, "b": 0.5}}}</tool>', tools) == "{'a': 1.0, 'b': 0.5}"
    assert run_tool_call('<tool>{"name": "weights", "args": {"w": {"a": "x"}}}</tool>', tools) == \
        "Error: argument \"w['a']\" must be a number, got str"


def test_a_hanging_tool_times_out_and_the_episode_goes_on():
    import threading
    import time

    release = threading.Event()

    def hang(query: str) -> str:
        """Never answers (until released).

        Args:
            query: anything
        """
        release.wait(30)
        return "late"

    t = time.time()
    out = run_tool_call('<tool>{"name": "hang", "args": {"query": "x"}}</tool>', {"hang": hang}, timeout=0.2)
    assert out == "Error: hang timed out: no result after 0.2 s"
    assert time.time() - t < 5
    # the environment's own limit: the episode goes on with the error as its result
    step = tool_env.ToolEnv({"hang": hang}, timeout=0.2).step(chat('<tool>{"name": "hang", "args": {"query": "x"}}</tool>'))
    assert not step.done and step.message["content"] == "<result>\nError: hang timed out: no result after 0.2 s\n</result>"
    release.set()  # let the threads end


def test_a_tool_that_raises_anything_is_an_error_result():
    class Weird(Exception):
        def __str__(self):
            return "odd"

    def bad(query: str) -> str:
        """Raises."""
        raise Weird()

    def unprintable(query: str):
        """Returns something whose str() raises."""
        class X:
            def __str__(self):
                raise RuntimeError("no")
        return X()

    def unreadable(query: "NoSuchType") -> str:  # noqa: F821 - an annotation that cannot be evaluated
        """Has a broken signature."""
        return "x"

    tools = {"bad": bad, "unprintable": unprintable, "unreadable": unreadable}
    call = '<tool>{"name": "%s", "args": {"query": "x"}}</tool>'
    assert run_tool_call(call % "bad", tools) == "Error: bad failed: Weird: odd"
    assert run_tool_call(call % "unprintable", tools) == "Error: unprintable returned an unprintable result: RuntimeError"
    assert run_tool_call(call % "unreadable", tools) == "Error: the tool's signature cannot be read (NameError)"


def test_run_tool_call_success_and_unicode(tools):
    out = run_tool_call(good_call("capital of Egypt"), tools)
    assert out.startswith("Egypt - Government - Capital\nname: Cairo")
    # unicode and control characters (escaped in JSON) do not break anything
    out = run_tool_call(good_call("Égypte capitale \u4e2d\u6587 \t\n Egypt"), tools)
    assert not out.startswith("Error:") and "Egypt" in out
    out = run_tool_call(good_call("N'Djamena"), tools)
    assert out.startswith("Chad - Government - Capital")


def test_search_budget_and_k():
    long = [{"title": "T", "text": "word " * 1000}, {"title": "U", "text": "word other"}]
    index = tool_env.SearchIndex(long, max_chars=100)
    top = index.search("word", k=1)
    assert len(top) <= 100 + len(" ...") and top.endswith(" ...")
    assert index.search("word", k=2).count("\n\n") == 1
    assert index.search("other", k=5).startswith("U\n")  # only matching passages come back


# ------------------------------------------------------------------ prompt

def test_system_prompt_renders_tools_and_tags(tools):
    prompt = tool_env.system_prompt(tools)
    assert "wiki_search(query: string, k: integer = 1)" in prompt and "  k: how many passages to return (1 to 5)" in prompt
    assert "Searches the encyclopedia" in prompt
    for tag in ("<reasoning>", "<tool>", "<result>", "<answer>"):
        assert prompt.count(tag) == 1, tag
    msgs = tool_env.ToolEnv(tools).initial_messages({"question": "Q?"})
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[-1]["content"] == "Question: Q?"
    msgs = tool_env.ToolEnv(tools, tool_env.FEWSHOT).initial_messages({"question": "Q?"})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    # the demonstration's tool call is well-formed
    assert parse_tool_call(msgs[2]["content"]) == ("wiki_search", {"query": "Japan internet country code"})


# ------------------------------------------------------------------ episode rules

convo = chat


def test_env_step_rules(tools):
    step = env_step(convo(good_call("capital of Egypt")), tools)
    assert not step.done and step.reason == "tool"
    assert step.message["role"] == "user"
    assert step.message["content"].startswith("<result>\nEgypt - Government - Capital")
    assert step.message["content"].endswith("\n</result>")

    # a malformed call still gets a turn back, with the error as the result
    step = env_step(convo("<tool>{bad}</tool>"), tools)
    assert not step.done and step.message["content"].startswith("<result>\nError: invalid JSON")

    # the answer ends the episode
    step = env_step(convo(good_call(), "<result>\nx\n</result>", "<answer>Cairo</answer>"), tools)
    assert step.done and step.reason == "answer" and step.message is None

    # a second call is not executed: the episode ends
    step = env_step(convo(good_call(), "<result>\nx\n</result>", good_call("again")), tools)
    assert step.done and step.reason == "tool_limit"
    # ... unless the limit allows it
    step = env_step(convo(good_call(), "<result>\nx\n</result>", good_call("again")), tools, max_tool_calls=2)
    assert not step.done and step.reason == "tool"

    # force_answer: the result of the last allowed call, and only that one, comes with "<answer>"
    # to start the next turn
    assert env_step(convo(good_call()), tools).prefill == ""
    assert env_step(convo(good_call()), tools, force_answer=True).prefill == "<answer>"
    assert env_step(convo(good_call()), tools, max_tool_calls=2, force_answer=True).prefill == ""
    step = env_step(convo(good_call(), "<result>\nx\n</result>", good_call("again")), tools, max_tool_calls=2,
                    force_answer=True)
    assert not step.done and step.prefill == "<answer>"
    assert tool_env.ToolEnv(tools, max_tool_calls=2, force_answer=True).step(
        convo(good_call(), "<result>\nx\n</result>", good_call("again"))).prefill == "<answer>"

    # budget ran out, or neither tool nor answer
    assert env_step(convo(good_call()), tools, truncated=True).reason == "budget"
    step = env_step(convo("I think it is Cairo."), tools)
    assert step.done and step.reason == "no_action"
    # a tag inside an unclosed answer is a (failed) call, not an answer
    step = env_step(convo('<answer>x <tool>{"name": "wiki_search", "args": {"query": "x"}}</tool>'), tools)
    assert not step.done and "inside <answer>" in step.message["content"]


@pytest.mark.parametrize("junk", [
    "", "<tool>", "</tool>", "<tool></tool><tool>", "<answer><tool>", "\x00\x01\x02<tool>\x7f</tool>",
    "<tool>" + "{" * 5000 + "</tool>", "<tool>" + "[" * 100_000 + "</tool>",
    '<tool>{"name": "wiki_search", "args": {"query": "' + "é" * 100_000 + '"}}</tool>',
    '<tool>{"name": "wiki_search", "args": {"query": NaN}}</tool>',
    '<tool>{"name": "wiki_search", "args": {"query": ["a", "b"]}}</tool>',
    '<tool>{"name": "wiki_search", "args": {"query": null}}</tool>',
    '<tool>{"name": "wiki_search", "args": {"query": "x", "k": 1e400}}</tool>',
    '<tool>{"name": "__import__", "args": {"name": "os"}}</tool>',
])
def test_env_never_raises(tools, junk):
    step = env_step(convo(junk), tools)
    if not step.done:
        assert step.message["content"].startswith("<result>\nError: "), step.message


def test_fewshot_demo_result_does_not_count_against_the_limit(tools):
    msgs = tool_env.ToolEnv(tools, tool_env.FEWSHOT).initial_messages({"question": "What is the capital of Egypt?"})
    msgs.append({"role": "assistant", "content": good_call("capital of Egypt")})
    step = env_step(msgs, tools)
    assert not step.done and step.reason == "tool"
    msgs += [step.message, {"role": "assistant", "content": good_call("again")}]
    assert env_step(msgs, tools).reason == "tool_limit"


def test_two_hop_demonstration_shows_two_real_searches():
    """FEWSHOT_2HOP: two well-formed calls, each followed by what the real tool returns for
    its query over the Factbook corpus, then a plain-name answer; in FEWSHOT's style."""
    import corpus

    search = tool_env.make_tools(corpus.load_corpus("factbook"))["wiki_search"]
    demo = tool_env.FEWSHOT_2HOP
    assert [m["role"] for m in demo] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    for call, result in ((demo[1], demo[2]), (demo[3], demo[4])):
        name, args = parse_tool_call(call["content"])
        assert name == "wiki_search" and set(args) == {"query"}
        assert result["content"] == f"{tool_env.RESULT_OPEN}\n{search(**args)}\n{tool_env.RESULT_CLOSE}"
    assert demo[2]["content"].startswith("<result>\nJapan - Geography - Elevation\n")  # search 1 finds the bridge
    assert "Japan" in demo[3]["content"] and demo[-1]["content"].endswith("<answer>Biwa-ko</answer>")
    assert all(m["content"].startswith("<reasoning>") for m in demo if m["role"] == "assistant")
    # the two-hop task's environment shows it (tasks.build); the one-hop task the one-search demo
    import tasks
    msgs = tasks.build({"task": "factbook-2hop", "fewshot": True}).env.initial_messages({"question": "Q?"})
    assert msgs[1:-1] == demo and msgs[-1]["content"] == "Question: Q?"
    one = tasks.build({"task": "factbook", "fewshot": True}).env
    assert one.initial_messages({"question": "Q?"})[1:-1] == tool_env.DEMOS[tool_env.DEFAULT_DEMO] and one.max_tool_calls == 1
    import rewards
    two = tasks.build({"task": "factbook-2hop"})
    assert two.env.max_tool_calls == 2 and two.rubric is rewards.TWO_HOP_RUBRIC  # a reward per hop
    assert tasks.build({"task": "factbook"}).rubric is rewards.PAPER_RUBRIC


def test_the_plain_name_demonstration_shows_what_the_tool_returns():
    """--demo jp+lake: FEWSHOT, then FEWSHOT_LAKE, whose result is the real tool's for its
    query and whose answer is copied from that result; the two-hop task keeps its own
    demonstration, an unknown name is refused with the choices."""
    import corpus
    import tasks

    search = tool_env.make_tools(corpus.load_corpus("factbook"))["wiki_search"]
    lake = tool_env.FEWSHOT_LAKE
    name, args = parse_tool_call(lake[1]["content"])
    assert name == "wiki_search" and lake[2]["content"] == f"{tool_env.RESULT_OPEN}\n{search(**args)}\n{tool_env.RESULT_CLOSE}"
    assert lake[-1]["content"].endswith("<answer>Biwa-ko</answer>") and "Biwa-ko" in lake[2]["content"]
    env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp+lake"}).env
    assert env.initial_messages({"question": "Q?"})[1:-1] == tool_env.FEWSHOT + lake
    assert tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env.demo == tool_env.FEWSHOT
    assert tasks.build({"task": "factbook-2hop", "fewshot": True, "demo": "jp+lake"}).env.demo == tool_env.FEWSHOT_2HOP
    with pytest.raises(ValueError, match="jp, jp\\+lake"):
        tasks.build({"task": "factbook", "demo": "lake"})


def test_the_prompt_describes_each_tool_from_its_schema():
    """transformers' get_json_schema reads the signature and the docstring; the example call
    in the system prompt is the first tool's, with its own first argument; a tool whose
    schema cannot be read is refused when the environment is built, with the reason."""
    def convert(amount: float, unit: typing.Literal["km", "mi"] = "km") -> str:
        """Converts a distance.

        Args:
            amount: the distance
            unit: its unit
        """
        return str(amount)

    assert tool_env.tool_schema(convert)["parameters"]["properties"]["unit"] == {
        "type": "string", "enum": ["km", "mi"], "description": "its unit"}
    prompt = tool_env.ToolEnv({"convert": convert}).initial_messages({"question": "Q?"})[0]["content"]
    assert "convert(amount: number, unit: string = 'km')\nConverts a distance.\n  amount: the distance\n" in prompt
    assert '{"name": "convert", "args": {"amount": "..."}}' in prompt and "query" not in prompt

    def undocumented(x: str) -> str:
        return x
    with pytest.raises(ValueError, match="tool 'undocumented': .*no docstring"):
        tool_env.ToolEnv({"undocumented": undocumented})
    with pytest.raises(ValueError, match="no searchable words"):
        tool_env.make_tools([{"title": "a", "text": "the"}])


def test_a_tool_whose_text_starts_like_an_error_is_not_one():
    """is_error is the one test of a failed call: a successful tool whose own text begins
    with "Error:" gets a leading space, so it is not counted as a failure."""
    tools = {"echo": lambda query: f"Error: {query} is a song title"}
    out = run_tool_call('<tool>{"name": "echo", "args": {"query": "Trial"}}</tool>', tools)
    assert out == " Error: Trial is a song title" and not tool_env.is_error(out)
    assert tool_env.is_error(run_tool_call('<tool>{"name": "nope", "args": {}}</tool>', tools))
