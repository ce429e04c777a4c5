"""Tests of data.py: the embedded Factbook task and the TriviaQA code path."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

import corpus
import data
import tool_env
from rewards import contains_alias, normalize_answer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "triviaqa")


@pytest.fixture(scope="module")
def factbook():
    splits = {s: data.load_task("factbook", s) for s in data.SPLITS}
    passages = corpus.load_corpus("factbook")
    return splits, passages


@pytest.fixture(scope="module")
def index(factbook):
    return tool_env.SearchIndex(factbook[1])


def test_schema_and_size(factbook):
    splits, corpus = factbook
    for ds in splits.values():
        assert set(ds.column_names) == {"question_id", "question", "answer", "source"}
        assert set(ds[0]["answer"]) == {"value", "aliases", "normalized_aliases"}
    sizes = {s: len(ds) for s, ds in splits.items()}
    total = sum(sizes.values())
    assert total >= 1000
    # about 80/10/10
    assert 0.75 < sizes["train"] / total < 0.85 and 0.06 < sizes["test"] / total < 0.14
    ids = [q for ds in splits.values() for q in ds["question_id"]]
    assert len(ids) == len(set(ids))
    row = splits["train"][0]
    assert row["answer"]["normalized_aliases"] == sorted({normalize_answer(a) for a in row["answer"]["aliases"]})


def test_splits_disjoint_by_country(factbook):
    splits, _ = factbook
    # question ids are factbook-{country code}-{template}
    countries = {s: {q.split("-")[1] for q in ds["question_id"]} for s, ds in splits.items()}
    assert not countries["train"] & countries["validation"]
    assert not countries["train"] & countries["test"]
    assert not countries["validation"] & countries["test"]
    # also by the country name in the source title
    names = {s: {src.split(" - ")[0] for src in ds["source"]} for s, ds in splits.items()}
    assert not names["train"] & names["test"]


def test_every_answer_is_in_its_source_passage(factbook):
    splits, corpus = factbook
    by_title = {p["title"]: p["text"] for p in corpus}
    assert len(by_title) == len(corpus)  # titles are unique
    for ds in splits.values():
        for row in ds:
            assert contains_alias(by_title[row["source"]], row["answer"]["aliases"]), row


def test_no_answer_is_shared_by_many_countries(factbook):
    splits, _ = factbook
    rows = [r for ds in splits.values() for r in ds]
    shared = Counter((r["question_id"].split("-")[2], normalize_answer(a)) for r in rows for a in r["answer"]["aliases"])
    assert max(shared.values()) <= 3


@pytest.mark.parametrize("question, alias, title", [
    # the top passage need not be the source passage, but it must hold the answer
    ("What is the capital of Egypt?", "Cairo", "Egypt - People and Society - Major urban areas - population"),
    ("What is the highest point in Egypt?", "Mount Catherine", "Egypt - Geography - Elevation"),
    ("What is the lowest point in Jordan?", "Dead Sea", "Jordan - Geography - Elevation"),
    ("What is the name of the national anthem of Slovenia?", "Zdravljica", "Slovenia - Government - National anthem(s)"),
    ("What is the local short-form name of Egypt?", "Misr", "Egypt - Government - Country name"),
])
def test_retrieval_finds_known_passages(index, question, alias, title):
    top = index.retrieve(question, k=1)
    assert index.passages[top[0]]["title"] == title
    assert contains_alias(index.search(question, k=1), [alias])


def test_factbook_examples_from_the_data(factbook):
    splits, _ = factbook
    rows = {r["question_id"]: r for ds in splits.values() for r in ds}
    eg = rows["factbook-eg-highest_point"]
    assert eg["question"] == "What is the highest point in Egypt?"
    assert eg["answer"]["value"] == "Mount Catherine"
    assert "Mt. Catherine" in eg["answer"]["aliases"]
    aj = rows["factbook-aj-capital"]
    assert aj["answer"]["aliases"] == ["Baku", "Baki", "Baky"]


def _all_rows(factbook):
    return [r for ds in factbook[0].values() for r in ds]


def test_no_alias_is_a_fragment(factbook):
    """Splitting on parentheses, commas and slashes must not leave pieces:
    'merlion (mythical half-lion', 'and book', 'on Viti Levu', 'Lefkosia/Lefkosa'."""
    for r in _all_rows(factbook):
        for a in r["answer"]["aliases"]:
            assert a.count("(") == a.count(")") and a.count('"') % 2 == 0, (r["question"], a)
            assert not re.match(r"(and|or|on|of|located|in)\b", a), (r["question"], a)
            assert "/" not in a and a == a.strip(" ,;.“”"), (r["question"], a)


def test_no_alias_can_be_guessed_from_the_question(factbook):
    """No alias is a generic word ('Assembly', 'Hymn', 'city', 'commercial capital')
    or words of the question ('Djibouti' for its capital, 'National Anthem of Spain')."""
    for r in _all_rows(factbook):
        q = f" {normalize_answer(r['question'])} "
        for a in r["answer"]["aliases"]:
            assert normalize_answer(a) not in data.GENERIC_ALIASES, (r["question"], a)
            assert f" {normalize_answer(a)} " not in q, (r["question"], a)


@pytest.mark.parametrize("alias, country, guessable", [
    ("National Anthem of the Kyrgyz Republic", "Kyrgyzstan", True),  # anthem words and the country
    ("National Anthem of the Republic of China", "Taiwan", True),  # a description, not a title
    ("Himno Nacional Argentino", "Argentina", True), ("Hino Nacional Brasileiro", "Brazil", True),
    ("Himno Nacional Espanol", "Spain", True), ("The Hymn of Malta", "Malta", True), ("Himno Nacional", "Uruguay", True),
    ("Hymn to Freedom", "Greece", False), ("The Thunder Dragon Kingdom", "Bhutan", False),
    ("Independent, Neutral, Turkmenistan State Anthem", "Turkmenistan", False), ("Maamme", "Finland", False),
])
def test_anthem_titles_made_of_the_question_are_guessable(alias, country, guessable):
    question = f"What is the name of the national anthem of {country}?"
    assert data._guessable(alias, question, "anthem", country) is guessable
    assert not data._guessable(alias, question, "capital", country)  # the anthem rule is the anthem's alone


def test_no_gold_restates_the_question_and_the_plain_name_scores(factbook):
    """Anthem golds that restate the question ('National Anthem of the ... Republic') are
    gone, and answers kept with a leading 'near' ('near Raczki Elblaskie') are the plain name."""
    rows = {r["question_id"]: r for r in _all_rows(factbook)}
    for r in rows.values():
        for a in r["answer"]["aliases"]:
            assert not re.match(r"near\b", a, re.I), (r["question"], a)
            if r["question_id"].endswith("-anthem"):
                assert not re.search(r"^(the )?(national|state) anthem\b|\bnational anthem$", a, re.I), (r["question"], a)
                assert not re.search(r"\b(himno|hino|inno) nacional\b", a, re.I), (r["question"], a)
    assert rows["factbook-pl-lowest_point"]["answer"]["aliases"] == ["Raczki Elblaskie"]
    assert rows["factbook-kg-anthem"]["answer"]["aliases"] == ["Kyrgyz Respublikasynyn Mamlekettik Gimni"]
    assert "factbook-ar-anthem" not in rows  # 'Himno Nacional Argentino', 'Argentine National Anthem'


def test_currency_answers_accept_the_singular(factbook):
    """The Factbook names currencies in the plural; the plain answer is the singular,
    irregular plurals included (kroner -> krone, lei -> leu, zlotych -> zloty)."""
    rows = {r["question_id"]: r for r in _all_rows(factbook)}
    currencies = [r for r in rows.values() if r["question_id"].endswith("-currency")]
    assert len(currencies) > 100
    for r in currencies:
        value = r["answer"]["value"]
        assert not re.search(r"(?<!s)s$|kroner$|kronor$|kronur$|\blei$|\bleva$|zlotych$|koruny$|maloti$", value), value
        assert value in r["answer"]["aliases"]
    expected = {"da": "krone", "sw": "krona", "ro": "leu", "pl": "zloty", "cs": "colon", "ke": "shilling"}
    for code, unit in expected.items():
        aliases = rows[f"factbook-{code}-currency"]["answer"]["aliases"]
        assert any(a.split()[-1] == unit for a in aliases), aliases


def test_questions_with_several_right_answers_are_dropped(factbook):
    ids = {r["question_id"] for r in _all_rows(factbook)}
    # Burundi: 'Gitega (political capital), Bujumbura (commercial capital)'; Bolivia: La Paz; Sucre
    assert "factbook-by-capital" not in ids and "factbook-bl-capital" not in ids
    assert not any(i.endswith("-symbol") for i in ids)  # open-ended ('golden eagle' for Egypt)
    assert "factbook-by-urban_area" in ids  # the country's other questions stay


def test_triviaqa_local_fixture():
    train = data.load_task(f"triviaqa:{FIXTURE}", "train")
    assert len(train) == 3
    assert set(train.column_names) == {"question_id", "question", "answer", "source"}
    row = train[0]
    assert row["question_id"] == "tc_1" and row["source"] == "Florence"
    assert row["answer"]["normalized_aliases"] == ["firenze", "florence", "florence italy"]
    val = data.load_task(f"triviaqa:{FIXTURE}", "validation")
    assert val[0]["answer"]["value"] == "Japan"
    passages = corpus.load_corpus(os.path.join(FIXTURE, "corpus.jsonl"))
    tools = tool_env.make_tools(passages)
    out = tools["wiki_search"](query=row["question"])
    assert out.startswith("Florence\n") and contains_alias(out, row["answer"]["aliases"])


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no test.jsonl"):
        data.load_task(f"triviaqa:{FIXTURE}", "test")
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        data.load_task("squad", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_task("factbook", "dev")
    with pytest.raises(FileNotFoundError, match="search corpus 'nope.jsonl' not found"):
        corpus.load_corpus("nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{"title": "a"}\n')
    with pytest.raises(ValueError, match="passage 2 needs string fields"):
        corpus.load_corpus(str(bad))
    bad.write_text('{"title": "a", "text": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        corpus.load_corpus(str(bad))


def test_triviaqa_unreachable_says_how_to_provide_it(tmp_path):
    # offline and with an empty cache, as on a machine that never downloaded it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "import data; data.load_task('triviaqa', 'train')"
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: could not load TriviaQA")
    assert "--task triviaqa:PATH" in last


def test_default_corpus():
    assert corpus.default_corpus("factbook") == "factbook"
    assert corpus.default_corpus("triviaqa", "c.jsonl") == "c.jsonl"
    with pytest.raises(ValueError, match="task 'triviaqa' needs --corpus PATH"):
        corpus.default_corpus("triviaqa")


def test_prepared_wikipedia_index_is_saved_reloaded_and_searched(tmp_path, tiny):
    """The TriviaQA + Wikipedia path without the hub: a local dataset in DPR's wiki-18
    schema ("contents" = '"Title"\\ntext'), indexed once, reloaded memory-mapped by --corpus."""
    import datasets

    import tool_env
    from conftest import CORPUS

    rows = [{"id": str(i), "contents": f'"{p["title"]}"\n{p["text"]}'} for i, p in enumerate(CORPUS)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "wiki"))
    assert corpus.prepare_corpus(str(tmp_path / "wiki"), str(tmp_path / "index")) == len(CORPUS)
    loaded = corpus.load_corpus(str(tmp_path / "index"))
    assert loaded == str(tmp_path / "index")  # a prepared index is handed on as its folder
    search = tool_env.make_tools(loaded)["wiki_search"]
    assert search("highest point in Egypt").startswith("Egypt - Geography - Elevation\nhighest point: Mount Catherine")
    assert search("capital of Chad") == "Chad - Government - Capital\nname: N'Djamena"
    # the same results as an index built in memory from the same passages
    fresh = tool_env.make_tools(CORPUS)["wiki_search"]
    for q in ("capital of Egypt", "Lima", "Peru urban areas"):
        assert search(q, k=2) == fresh(q, k=2)
    # recall statistics of a task against it (the fixture has train and validation only)
    stats = corpus.task_stats(f"triviaqa:{FIXTURE}", str(tmp_path / "index"))
    assert stats.splitlines()[0] == f"task triviaqa:{FIXTURE}: 4 passages" and "validation" in stats
    # and trained on: one step of TriviaQA (the fixture) searching the prepared index
    import train

    run = tmp_path / "run"
    assert train.main(["--model", tiny[1], "--task", f"triviaqa:{FIXTURE}", "--corpus", str(tmp_path / "index"),
                       "--steps", "1", "--questions-per-step", "1", "--group-size", "2", "--max-turn-tokens", "8",
                       "--eval-every", "0", "--device", "cpu", "--output-dir", str(run)]) == 0
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == [0, 1]  # step 0: the probe of the initial policy
    # offline, a hub id fails in one line that says what to pass instead
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "corpus.py", "--prepare", "no-such-org/no-such-corpus", str(tmp_path / "x")],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: could not load corpus")
    assert "pass a dataset folder or a JSONL" in p.stderr and "Traceback" not in p.stderr

