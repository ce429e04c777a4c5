"""The tool environment of MT-GRPO: prompt, tool-call parsing, the search tool,
the episode rules, and the readers of the episode format they write.

An episode (docs/paper.md §1) is a chat:

    system     instructions + the tool list (rendered from the tools' signatures)
    user       Question: {question}
    assistant  <reasoning>...</reasoning> <tool>{"name": "wiki_search", "args": {...}}</tool>
    user       <result> ...top passage... </result>          <- written by `env_step`
    assistant  <reasoning>...</reasoning> <answer>...</answer>

The environment's markers are constants (QUESTION_PREFIX, RESULT_OPEN / RESULT_CLOSE,
ERROR_PREFIX), used both to write an episode and to read it back.

Everything here is plain Python and needs no language model, so each rule can be
tested on hand-written messages:

- `parse_tool_call`  the first <tool>...</tool> of a message, JSON-decoded, or ValueError;
- `run_tool_call`    parse + validate + execute; every failure becomes a string that
                     starts with "Error:" (ERROR_PREFIX; the rewards count those as
                     failed calls);
- `env_step`         the episode rules as a pure function of the messages so far;
- `tool_results` / `final_answer`  read an episode back (the rewards use these);
- `SearchIndex`      BM25 (the `bm25s` package) over passages, results cut to a budget;
                     `make_tools` builds the search tool over a corpus.

The tasks (the Factbook task, TriviaQA) are in data.py, the corpora in corpus.py.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import types
import typing
from dataclasses import dataclass
from typing import Callable

TOOL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_QUERY_CHARS = 1000  # longer "queries" are pasted text, not searches
SEARCH_MAX_CHARS = 600  # the reference returned whole articles; one result could fill the budget
PASSAGE_SEP = "\n\n"  # between the passages of one search result; never inside one (SearchIndex.format)

# The markers of the episode format, written here and read back by the readers below
QUESTION_PREFIX = "Question:"  # starts the user message that asks the question
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"  # around a tool's output (a user message)
ERROR_PREFIX = "Error:"  # starts a tool result that is a failure, and no other result


def is_error(result: str) -> bool:
    """Whether a tool result (as run_tool_call returns it) is a failure: the one test
    the rewards and the logs use."""
    return result.startswith(ERROR_PREFIX)


# ----------------------------------------------------------------------------------
# The search tool


def fold_plurals(words: list[str]) -> list[str]:
    """A minimal stemmer: "areas" -> "area", so a question about the "largest urban
    area" finds the field "Major urban areas" (on the factbook validation questions
    it raised BM25 recall@1 from 0.62 to 0.72)."""
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


class SearchIndex:
    """BM25 over `passages` (dicts with "title" and "text"), via the `bm25s` package.

    The title is indexed together with the text, so "capital of Egypt" finds the
    passage titled "Egypt - Government - Capital". `search` returns the top-k
    passages as one string, each cut to `max_chars` characters.
    """

    def __init__(self, passages, max_chars: int = SEARCH_MAX_CHARS, bm25=None):
        """passages: a list of dicts, or anything indexable like one (a memory-mapped
        datasets.Dataset); bm25: an index already built over them (SearchIndex.load)."""
        import bm25s  # imported here so that parsing and rewards work without it
        from bm25s.stopwords import STOPWORDS_EN

        # bm25s's English list keeps question words; "what" in a passage is no evidence
        STOPWORDS = list(STOPWORDS_EN) + ["what", "which", "who", "whom", "whose", "where", "when", "how", "name"]

        if not len(passages):
            raise ValueError("SearchIndex needs at least one passage")
        self.passages = passages
        self.max_chars = max_chars
        self._tokenize = lambda texts: bm25s.tokenize(
            texts, stopwords=STOPWORDS, return_ids=False, show_progress=False, stemmer=fold_plurals
        )
        self.bm25 = bm25
        if bm25 is None:
            self.bm25 = bm25s.BM25()
            texts = [f"{p['title']}\n{p['text']}" for p in passages]
            tokens = self._tokenize(texts)
            if not any(tokens):
                raise ValueError("the passages have no searchable words (only stop words or single letters)")
            self.bm25.index(tokens, show_progress=False)

    def save(self, folder: str) -> None:
        """The index (bm25s's arrays) and the passages (an Arrow table), both memory-mapped by load."""
        import datasets

        self.bm25.save(folder, show_progress=False)
        table = (datasets.Dataset.from_list([{"title": p["title"], "text": p["text"]} for p in self.passages])
                 if isinstance(self.passages, list) else self.passages.select_columns(["title", "text"]))
        table.save_to_disk(os.path.join(folder, "passages"))

    @classmethod
    def load(cls, folder: str, max_chars: int = SEARCH_MAX_CHARS) -> "SearchIndex":
        """A saved index, memory-mapped: a run starts in seconds whatever the corpus size."""
        import bm25s
        import datasets

        bm25 = bm25s.BM25.load(folder, mmap=True, show_progress=False)
        return cls(datasets.load_from_disk(os.path.join(folder, "passages")), max_chars, bm25)

    def retrieve(self, query: str, k: int = 1) -> list[int]:
        """Indices of the top-k passages with a positive BM25 score, best first."""
        tokens = self._tokenize([query])
        if not tokens[0]:
            return []
        k = min(k, len(self.passages))
        docs, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]

    def format(self, i: int) -> str:
        """Title and text, cut to max_chars, with blank lines collapsed (a blank line
        separates passages in a result, and the rewards read the first passage)."""
        p = self.passages[i]
        text = re.sub(r"\n\s*\n", "\n", f"{p['title']}\n{p['text']}")
        if len(text) > self.max_chars:
            text = text[: self.max_chars].rsplit(" ", 1)[0] + " ..."
        return text

    def search(self, query: str, k: int = 1) -> str:
        return PASSAGE_SEP.join(self.format(i) for i in self.retrieve(query, k))


def make_wiki_search(index: SearchIndex) -> Callable[..., str]:
    """The paper's `wiki_search` tool bound to a search index."""

    def wiki_search(query: str, k: int = 1) -> str:
        """Searches the encyclopedia for passages that match the query.

        Args:
            query: what to search for, e.g. "capital of Egypt"
            k: how many passages to return (1 to 5)

        Returns:
            The title and text of the best matching passages.
        """
        if not 1 <= k <= 5:
            raise ValueError("k must be between 1 and 5")
        return index.search(query, k)

    return wiki_search


def make_tools(corpus, max_chars: int = SEARCH_MAX_CHARS) -> dict[str, Callable]:
    """The tool registry of the task: {"wiki_search": ...} over `corpus`, a list of
    passages or a saved index's folder (corpus.prepare_corpus)."""
    if isinstance(corpus, str):
        index = SearchIndex.load(corpus, max_chars)
    else:
        index = SearchIndex(corpus, max_chars)
    return {"wiki_search": make_wiki_search(index)}


# ----------------------------------------------------------------------------------
# The prompt


def tool_schema(fn: Callable) -> dict:
    """The tool's JSON schema, from its signature and its Google-style docstring, by
    transformers' own function (what chat templates take as `tools=`)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)["function"]


def describe_tool(fn: Callable) -> str:
    """A tool's entry in the system prompt, rendered from its schema (tool_schema):

        wiki_search(query: string, k: integer = 1)
        Searches the encyclopedia for passages that match the query.
          query: what to search for, e.g. "capital of Egypt"
          k: how many passages to return (1 to 5)

    Defaults are not in a JSON schema; they come from the signature."""
    schema, params = tool_schema(fn), inspect.signature(fn).parameters
    args, lines = [], []
    for name, p in schema["parameters"].get("properties", {}).items():
        default = params[name].default
        args.append(f"{name}: {p.get('type', 'any')}" + ("" if default is inspect.Parameter.empty else f" = {default!r}"))
        if p.get("description"):
            lines.append(f"  {name}: {p['description']}")
    return "\n".join([f"{schema['name']}({', '.join(args)})", schema.get("description", ""), *lines])


def system_prompt(tools: dict[str, Callable]) -> str:
    """The system prompt in the paper's format (docs/paper.md §1); each tag is
    explained exactly once."""
    tool_docs = "\n\n".join(describe_tool(fn) for fn in tools.values())
    example, arg = "tool_name", "argument"
    if tools:  # the example call is the first tool's, with its own first argument
        example, fn = next(iter(tools.items()))
        arg = next(iter(inspect.signature(fn).parameters), arg)
    return (
        "You answer questions. You have access to these tools:\n\n"
        f"{tool_docs}\n\n"
        "Work in steps. In each step, first think inside <reasoning>...</reasoning>.\n"
        "Then either call one tool by writing a JSON object inside <tool>...</tool>, like\n"
        f'{{"name": "{example}", "args": {{"{arg}": "..."}}}}\n'
        f"and you will get its output inside {RESULT_OPEN}...{RESULT_CLOSE}, or, when you know it,\n"
        "give the final short answer inside <answer>...</answer>."
    )


# A one-shot demonstration placed before the question (fewshot=True). Small models
# almost never call the tool from instructions alone. The demo asks something that
# no task template asks (an internet country code), so it leaks no answer. Its answer
# ".jp" is copied by trained agents as a leading dot (".LIMA"; TriviaQA's normalization
# removes it, so it scores). Demonstrations with a plain-name answer (a lake, a space
# agency) were tried and kept out: the base model then calls the tool less and answers
# from memory more, and MT-GRPO stopped calling the tool by step 6
# (results/diagnostics/demo_variants.md). Followed by a plain-name one (--demo jp+lake,
# FEWSHOT_LAKE below), the base model calls the tool more and answers "."-style less
# (results/diagnostics/answer_prior.md).
FEWSHOT = [
    {"role": "user", "content": f"{QUESTION_PREFIX} What is the internet country code of Japan?"},
    {
        "role": "assistant",
        "content": "<reasoning>I should look up Japan's internet country code.</reasoning>\n"
        '<tool>{"name": "wiki_search", "args": {"query": "Japan internet country code"}}</tool>',
    },
    {
        "role": "user",
        "content": f"{RESULT_OPEN}\nJapan - Communications - Internet country code\n.jp\n{RESULT_CLOSE}",
    },
    {
        "role": "assistant",
        "content": "<reasoning>The result says the code is .jp.</reasoning>\n<answer>.jp</answer>",
    },
]


# A second one-search demonstration for `--demo jp+lake` (FEWSHOT, then this): its answer is
# a plain name copied from the tool result, so the answer's form is no longer only ".jp"
# (issue 20: recipe v4's MT-GRPO seed 2 answered ".jp" and ".js" to every test question).
# The result is what the tool returns for the query (test_tool_env checks); no task
# template asks for lakes.
FEWSHOT_LAKE = [
    {"role": "user", "content": f"{QUESTION_PREFIX} What are the major lakes of Japan?"},
    {
        "role": "assistant",
        "content": "<reasoning>I should look up Japan's major lakes.</reasoning>\n"
        '<tool>{"name": "wiki_search", "args": {"query": "Japan major lakes"}}</tool>',
    },
    {"role": "user",
     "content": f"{RESULT_OPEN}\nJapan - Geography - Major lakes (area sq km)\nfresh water lake(s): Biwa-ko 688 sq km\n{RESULT_CLOSE}"},
    {"role": "assistant",
     "content": "<reasoning>The result says the major lake is Biwa-ko.</reasoning>\n<answer>Biwa-ko</answer>"},
]

# The demonstrations of the one-search tasks, by the name --demo takes. The default is
# recipe v5's; runs saved before --demo existed used DEMO_BEFORE_THE_FLAG (evaluate.run_config
# evaluates them, and train.py resumes them, with it).
DEMOS = {"jp": FEWSHOT, "jp+lake": FEWSHOT + FEWSHOT_LAKE}
DEFAULT_DEMO = "jp+lake"
DEMO_BEFORE_THE_FLAG = "jp"

# The demonstration of the two-hop task (data.build_two_hop): two searches, the first for
# the country (Japan, which is no bridge of the task), the second about it; same style as
# FEWSHOT, each result what the tool really returns for its query (test_tool_env checks).
FEWSHOT_2HOP = [
    {"role": "user", "content": f"{QUESTION_PREFIX} What is the largest lake of the country whose highest point is Mount Fuji?"},
    {
        "role": "assistant",
        "content": "<reasoning>I should first find the country whose highest point is Mount Fuji.</reasoning>\n"
        '<tool>{"name": "wiki_search", "args": {"query": "highest point Mount Fuji"}}</tool>',
    },
    {
        "role": "user",
        "content": f"{RESULT_OPEN}\nJapan - Geography - Elevation\nhighest point: Mount Fuji 3,776 m; lowest point: "
        f"Hachiro-gata -4 m; mean elevation: 438 m\n{RESULT_CLOSE}",
    },
    {
        "role": "assistant",
        "content": "<reasoning>The result says the country is Japan. I should look up the major lakes of Japan.</reasoning>\n"
        '<tool>{"name": "wiki_search", "args": {"query": "Japan major lakes"}}</tool>',
    },
    {"role": "user",
     "content": f"{RESULT_OPEN}\nJapan - Geography - Major lakes (area sq km)\nfresh water lake(s): Biwa-ko 688 sq km\n{RESULT_CLOSE}"},
    {"role": "assistant",
     "content": "<reasoning>The result says the largest lake is Biwa-ko.</reasoning>\n<answer>Biwa-ko</answer>"},
]

# ----------------------------------------------------------------------------------
# Tool calls


def parse_tool_call(text: str) -> tuple[str, dict]:
    """(name, args) of the first <tool>...</tool> in an assistant message.

    Raises ValueError saying what is wrong: no tag, unclosed tag, tag inside <answer>,
    invalid JSON, not an object, missing or ill-typed "name" or "args".
    """
    start = text.find("<tool>")
    if start < 0:
        raise ValueError("no <tool> tag found; write <tool>{...}</tool>")
    end = text.find("</tool>", start)
    if end < 0:
        raise ValueError("the <tool> tag is not closed with </tool>")
    before = text[:start]
    if before.rfind("<answer>") > before.rfind("</answer>"):
        raise ValueError("the <tool> tag is inside <answer>; a tool call goes outside it")
    body = text[start + len("<tool>") : end].strip()
    if not body:
        raise ValueError("the <tool> tag is empty")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON inside <tool>: {e.msg} at character {e.pos}") from None
    except RecursionError:
        raise ValueError("invalid JSON inside <tool>: nested too deeply") from None
    if not isinstance(call, dict):
        raise ValueError(f"the tool call must be a JSON object, got {type(call).__name__}")
    if "name" not in call:
        raise ValueError('the tool call has no "name"')
    name = call["name"]
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise ValueError('"name" must be a tool name string')
    args = call.get("args", {})
    if not isinstance(args, dict):
        raise ValueError('"args" must be a JSON object')
    extra = set(call) - {"name", "args"}
    if extra:
        raise ValueError(f"unexpected keys in the tool call: {sorted(extra)}")
    return name, args


def _check_value(name: str, value, want):
    """`value` (decoded JSON) checked against the annotation `want`, and returned as the
    tool should get it (an int where a float is asked: JSON writes 2.0 as 2). Knows
    str, int, float, bool, list[X], dict[str, X], Literal[...], X | None and Any (or no
    annotation); raises ValueError saying what is wrong."""
    origin, targs = typing.get_origin(want), typing.get_args(want)
    if want is inspect.Parameter.empty or want is typing.Any:
        return value
    if origin is typing.Literal:
        if value not in targs or isinstance(value, bool) != any(isinstance(t, bool) for t in targs if t == value):
            raise ValueError(f"argument {name!r} must be one of {list(targs)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in targs:
            return None
        errors = []
        for t in (t for t in targs if t is not type(None)):
            try:
                return _check_value(name, value, t)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"argument {name!r} has the wrong type ({type(value).__name__})")
    if origin is list or want is list:
        if not isinstance(value, list):
            raise ValueError(f"argument {name!r} must be a list, got {type(value).__name__}")
        return [_check_value(f"{name}[{i}]", v, targs[0]) for i, v in enumerate(value)] if targs else value
    if origin is dict or want is dict:
        if not isinstance(value, dict):
            raise ValueError(f"argument {name!r} must be an object, got {type(value).__name__}")
        return {k: _check_value(f"{name}[{k!r}]", v, targs[1]) for k, v in value.items()} if targs else value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"argument {name!r} must be a number, got {type(value).__name__}")
        return float(value)
    if want in (str, int, bool):
        # bool is a subclass of int in Python, but true is not a number of passages
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"argument {name!r} must be {want.__name__}, got {type(value).__name__}")
        if want is str and not value.strip():
            raise ValueError(f"argument {name!r} is empty")
        if want is str and len(value) > MAX_QUERY_CHARS:
            raise ValueError(f"argument {name!r} is too long ({len(value)} > {MAX_QUERY_CHARS} characters)")
        return value
    if isinstance(want, type) and not isinstance(value, want):  # any other plain class
        raise ValueError(f"argument {name!r} must be {want.__name__}, got {type(value).__name__}")
    return value


def _check_args(fn: Callable, args: dict) -> dict:
    """Missing, unexpected and ill-typed arguments, judged by the signature's real
    annotations (list[str], Literal, Optional...); returns the arguments to call with."""
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except (NameError, TypeError, ValueError) as e:  # a tool whose annotations cannot be read
        raise ValueError(f"the tool's signature cannot be read ({type(e).__name__})") from None
    unexpected = sorted(set(args) - set(params))
    if unexpected:
        raise ValueError(f"unexpected argument(s) {unexpected}; expected {list(params)}")
    out = {}
    for name, p in params.items():
        if name not in args:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"missing argument {name!r}")
            continue
        out[name] = _check_value(name, args[name], p.annotation)
    return out


TOOL_TIMEOUT_S = 10.0  # a tool that takes longer is answered with an error (a hung tool must not stop training)


def call_with_timeout(fn: Callable, args: dict, timeout: float = TOOL_TIMEOUT_S):
    """fn(**args) in a daemon thread, waiting at most `timeout` seconds. Python cannot
    kill a thread: a tool that hangs keeps its thread until it returns (or the process
    ends), but the episode goes on with an error result. Raises TimeoutError, or what
    fn raised."""
    box: dict = {}

    def target():
        try:
            box["out"] = fn(**args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, whatever it is
            box["err"] = e

    t = threading.Thread(target=target, daemon=True, name="tool-call")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no result after {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def run_tool_call(text: str, tools: dict[str, Callable], timeout: float = TOOL_TIMEOUT_S) -> str:
    """Parse, validate and execute the tool call in `text`. Never raises: every
    failure (parse, validation, the tool's exception, a time-out, an empty result) is
    returned as a string starting with "Error:" (and a successful result never
    does), which is how the rewards count failed executions."""
    try:
        name, args = parse_tool_call(text)
    except ValueError as e:
        return f"{ERROR_PREFIX} {e}"
    if name not in tools:
        return f"{ERROR_PREFIX} unknown tool {name!r}; available: {', '.join(tools)}"
    fn = tools[name]
    try:
        args = _check_args(fn, args)
    except ValueError as e:
        return f"{ERROR_PREFIX} {e}"
    try:
        out = call_with_timeout(fn, args, timeout)
    except TimeoutError as e:
        return f"{ERROR_PREFIX} {name} timed out: {e}"
    except Exception as e:  # a tool's own failure is the agent's feedback, not a crash
        return f"{ERROR_PREFIX} {name} failed: {type(e).__name__}: {e}"
    try:
        out = "" if out is None else str(out)
    except Exception as e:  # a result whose str() fails
        return f"{ERROR_PREFIX} {name} returned an unprintable result: {type(e).__name__}"
    if not out.strip():
        return f"{ERROR_PREFIX} {name} returned nothing for these arguments"
    if is_error(out):  # keep the convention unambiguous
        out = " " + out
    return out


# ----------------------------------------------------------------------------------
# Episode rules


@dataclass
class EnvStep:
    done: bool
    reason: str  # "answer", "tool", "tool_limit", "budget", "no_action"
    message: dict | None = None  # the user message to append, if the episode goes on
    prefill: str = ""  # text the environment writes at the start of the next assistant turn (not trained on)


ANSWER_PREFILL = "<answer>"  # force_answer's start of the turn after the last allowed call


def is_tool_attempt(text: str) -> bool:
    """An assistant message that tries to call a tool (even a malformed one)."""
    return "<tool>" in text or "</tool>" in text


def has_answer(text: str) -> bool:
    return re.search(r"<answer>.*?</answer>", text, re.S) is not None


def count_tool_results(messages: list[dict]) -> int:
    """Tool results of this episode (a few-shot demonstration's result does not
    count against the limit): the same reading of an episode as the rewards'."""
    return len(tool_results(messages))


def env_step(
    messages: list[dict],
    tools: dict[str, Callable],
    max_tool_calls: int = 1,
    truncated: bool = False,
    timeout: float = TOOL_TIMEOUT_S,
    force_answer: bool = False,
) -> EnvStep:
    """The episode rules (docs/paper.md §1) as a function of the messages so far,
    the last of which is the assistant turn just sampled.

    The episode ends when the turn gives an <answer>, when it calls a tool beyond
    `max_tool_calls` (that call is not executed), when the sampler ran out of token
    budget (`truncated`), or when the turn neither answers nor calls a tool.
    Otherwise the tool runs and its output comes back as a user message
    "<result>\\n...\\n</result>".

    force_answer: after the last allowed call's result, the next assistant turn starts
    with "<answer>" written by the environment (EnvStep.prefill), so the episode ends
    with an answer rather than a call beyond the limit. Off in the paper's setting; the
    two-hop task needs it (docs/task.md, "The forced answer").
    """
    text = messages[-1]["content"]
    if truncated:
        return EnvStep(True, "budget")
    if has_answer(text) and text.rfind("</answer>") > text.rfind("</tool>"):
        return EnvStep(True, "answer")
    if not is_tool_attempt(text):
        return EnvStep(True, "no_action")
    if count_tool_results(messages) >= max_tool_calls:
        return EnvStep(True, "tool_limit")
    result = run_tool_call(text, tools, timeout)
    last_call = count_tool_results(messages) + 1 >= max_tool_calls
    return EnvStep(False, "tool", {"role": "user", "content": f"{RESULT_OPEN}\n{result}\n{RESULT_CLOSE}"},
                   ANSWER_PREFILL if force_answer and last_call else "")


class Environment(typing.Protocol):
    """What the sampler needs from a task's environment (sampler.sample_episodes): the
    conversation before the first assistant turn, and the rules after each one. Any
    object with these two methods plugs in; ToolEnv is the paper's."""

    def initial_messages(self, row: dict) -> list[dict]: ...

    def step(self, messages: list[dict], truncated: bool = False) -> EnvStep: ...


@dataclass
class ToolEnv:
    """The paper's environment: a system prompt that lists `tools` (typed Python
    functions), an optional demonstration before the question (`demo`, a list of
    messages), and env_step's rules with at most `max_tool_calls` tool results per
    episode, each call answered within `timeout` seconds, and, with `force_answer`, an
    answer forced after the last one. A row needs a "question"; the rest of it is the
    rubric's business."""

    tools: dict[str, Callable]
    demo: list[dict] | None = None
    max_tool_calls: int = 1
    timeout: float = TOOL_TIMEOUT_S
    force_answer: bool = False

    def __post_init__(self):
        for name, fn in self.tools.items():  # a tool the prompt cannot describe fails here, not mid-run
            if not TOOL_NAME_RE.match(name):
                raise ValueError(f"tool name {name!r}: use letters, digits and _")
            try:
                describe_tool(fn)
            except Exception as e:  # transformers' TypeHintParsingException, DocstringParsingException
                raise ValueError(f"tool {name!r}: its schema comes from its type hints and its docstring, "
                                 f"which must describe every argument (Args: section): {e}") from None

    def initial_messages(self, row: dict) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt(self.tools)}]
        msgs += [dict(m) for m in self.demo or []]
        return msgs + [{"role": "user", "content": f"{QUESTION_PREFIX} {row['question']}"}]

    def step(self, messages: list[dict], truncated: bool = False) -> EnvStep:
        return env_step(messages, self.tools, self.max_tool_calls, truncated, self.timeout, self.force_answer)


# ----------------------------------------------------------------------------------
# Reading an episode (the format written above; the rewards read it with these)


def assistant_messages(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def tool_results(messages: list[dict]) -> list[str]:
    """Texts of the environment's <result> messages, in order. Only the first
    assistant turn's result counts as "the" search result, but all are returned.
    The few-shot demonstration, if any, comes before the first "Question:" message
    and is skipped."""
    out = []
    for m in episode_messages(messages):
        c = m["content"]
        if m["role"] == "user" and c.startswith(RESULT_OPEN):
            out.append(c[len(RESULT_OPEN) :].removesuffix(RESULT_CLOSE).strip())
    return out


def episode_messages(messages: list[dict]) -> list[dict]:
    """The messages from the last "Question:" user message on (skips a few-shot demo)."""
    start = 0
    for i, m in enumerate(messages):
        if m["role"] == "user" and m["content"].startswith(QUESTION_PREFIX):
            start = i
    return messages[start:]


def final_answer(messages: list[dict]) -> str | None:
    """The content of the last <answer>...</answer> of the episode, or None."""
    for text in reversed(assistant_messages(episode_messages(messages))):
        found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
        if found:
            return found[-1].strip()
    return None
