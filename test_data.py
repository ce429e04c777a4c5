"""Tests of data.py: the embedded Factbook task and the TriviaQA code path."""

import hashlib
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


def _assert_no_fragments(rows):
    for r in rows:
        for a in r["answer"]["aliases"]:
            assert a.count("(") == a.count(")") and a.count('"') % 2 == 0, (r["question"], a)
            assert not re.match(r"(and|or|on|of|located|in)\b", a), (r["question"], a)
            assert "/" not in a and a == a.strip(" ,;.“”"), (r["question"], a)


def test_no_alias_is_a_fragment(factbook):
    """Splitting on parentheses, commas and slashes must not leave pieces:
    'merlion (mythical half-lion', 'and book', 'on Viti Levu', 'Lefkosia/Lefkosa'."""
    _assert_no_fragments(_all_rows(factbook))


def _assert_not_guessable(rows):
    for r in rows:
        q = f" {normalize_answer(r['question'])} "
        for a in r["answer"]["aliases"]:
            assert normalize_answer(a) not in data.GENERIC_ALIASES, (r["question"], a)
            assert f" {normalize_answer(a)} " not in q, (r["question"], a)


def test_no_alias_can_be_guessed_from_the_question(factbook):
    """No alias is a generic word ('Assembly', 'Hymn', 'city', 'commercial capital')
    or words of the question ('Djibouti' for its capital, 'National Anthem of Spain')."""
    _assert_not_guessable(_all_rows(factbook))


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


def _digest(rows):
    return hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()).hexdigest()


def test_the_one_hop_task_is_unchanged():
    """The builder's output is byte for byte the one that FACTBOOK_VERSION 3 caches
    (adding the two-hop task changed nothing in it); a change must bump the version."""
    passages, questions = data.build_factbook()
    assert data.FACTBOOK_VERSION == 3
    assert _digest(questions) == "5ca7dc8c3107e916002c5f7766b2e7ccd0e428073c6e3c7553e563f2f2fb9183"
    assert _digest(passages) == "bfa129d58bb8cac07331404e8d97feeff952e81c5d80b563e229b576e2d1fa55"


# ----------------------------------------------------------------------------------
# The two-hop task: the same scans, for both hops


@pytest.fixture(scope="module")
def two_hop():
    return {s: data.load_task("factbook-2hop", s) for s in data.SPLITS}


def _two_hop_rows(two_hop):
    return [r for ds in two_hop.values() for r in ds]


def test_two_hop_schema_and_size(two_hop, factbook):
    for ds in two_hop.values():
        assert set(ds.column_names) == {"question_id", "question", "answer", "source", "bridge", "hop_sources"}
        assert set(ds[0]["bridge"]) == {"value", "aliases"}
    sizes = {s: len(ds) for s, ds in two_hop.items()}
    assert 400 <= sum(sizes.values()) <= 800 and sizes["validation"] >= 40 and sizes["test"] >= 40
    rows = _two_hop_rows(two_hop)
    ids = [r["question_id"] for r in rows]
    assert len(ids) == len(set(ids)) and all(re.match(r"factbook2-[a-z]{2}-[a-z_]+-[a-z_]+$", i) for i in ids)
    per_bridge = Counter(i.split("-")[1] for i in ids)
    assert max(per_bridge.values()) <= data.TWO_HOP_PER_BRIDGE and len(per_bridge) >= 150
    assert "ja" not in per_bridge  # Japan is the demonstration's bridge
    pairs = Counter(tuple(i.split("-")[2:]) for i in ids)
    assert len(pairs) >= 15 and {k for k, _ in pairs} == set(data.FIRST_HOPS)  # spread over template pairs
    for r in rows:
        kind1, kind2 = r["question_id"].split("-")[2:]
        assert kind1 in data.FIRST_HOPS and kind2 in data.SECOND_HOPS and kind1 != kind2
        assert r["hop_sources"][1] == r["source"] and r["hop_sources"][0] != r["source"]
        assert r["answer"]["normalized_aliases"] == sorted({normalize_answer(a) for a in r["answer"]["aliases"]})


def test_two_hop_rows_reuse_the_one_hop_questions(two_hop, factbook):
    """Both hops are cleaned one-hop questions of the bridge country: the first hop's
    value is its one-hop answer, the answer's aliases are among its one-hop aliases."""
    one = {r["question_id"]: r for r in _all_rows(factbook)}
    for r in _two_hop_rows(two_hop):
        _, code, kind1, kind2 = r["question_id"].split("-")
        assert data.first_hop(r) == (kind1, one[f"factbook-{code}-{kind1}"]["answer"]["value"])
        assert set(r["answer"]["aliases"]) <= set(one[f"factbook-{code}-{kind2}"]["answer"]["aliases"])
        assert r["hop_sources"] == [one[f"factbook-{code}-{k}"]["source"] for k in (kind1, kind2)]
        assert r["bridge"]["value"] == r["source"].split(" - ")[0]


def test_two_hop_splits_are_the_one_hop_splits_by_country(two_hop, factbook):
    one = {s: {q.split("-")[1] for q in ds["question_id"]} for s, ds in factbook[0].items()}
    two = {s: {q.split("-")[1] for q in ds["question_id"]} for s, ds in two_hop.items()}
    for s in data.SPLITS:
        assert two[s] <= one[s]  # the bridge's split is the question's
    assert not two["train"] & (two["validation"] | two["test"]) and not two["validation"] & two["test"]
    names = {s: {r["bridge"]["value"] for r in ds} for s, ds in two_hop.items()}
    assert not names["train"] & (names["validation"] | names["test"])


def test_two_hop_answers_and_first_hop_values_are_in_their_passages(two_hop, factbook):
    by_title = {p["title"]: p["text"] for p in factbook[1]}
    for r in _two_hop_rows(two_hop):
        assert contains_alias(by_title[r["hop_sources"][1]], r["answer"]["aliases"]), r
        assert contains_alias(by_title[r["hop_sources"][0]], [data.first_hop(r)[1]]), r


def test_two_hop_aliases_are_no_fragments_and_not_guessable(two_hop):
    rows = _two_hop_rows(two_hop)
    _assert_no_fragments(rows)
    _assert_not_guessable(rows)
    for r in rows:
        kind2 = r["question_id"].split("-")[3]
        assert not any(data._guessable(a, r["question"], kind2, r["bridge"]["value"]) for a in r["answer"]["aliases"])


def test_the_bridge_is_the_only_country_with_its_first_hop_value(two_hop, factbook):
    """No other country has the first-hop value as an alias of the same template, or in
    its passage of the same field; and the bridge's aliases name no other country (a
    passage about "Equatorial Guinea" must not count as finding Guinea)."""
    owners = {}  # (template, normalized alias) -> the countries that have it
    for q in _all_rows(factbook):
        _, code, kind = q["question_id"].split("-")
        for a in q["answer"]["normalized_aliases"]:
            owners.setdefault((kind, a), set()).add(code)
    first_fields = {s.split(" - ", 1)[1] for r in _two_hop_rows(two_hop) for s in r["hop_sources"][:1]}
    fields = {}  # field -> [(title, normalized text)]
    for p in factbook[1]:
        if p["title"].split(" - ", 1)[-1] in first_fields:
            fields.setdefault(p["title"].split(" - ", 1)[1], []).append((p["title"], f" {normalize_answer(p['text'])} "))
    names = data._country_names(factbook[1])
    for r in _two_hop_rows(two_hop):
        kind1, value = data.first_hop(r)
        code, country = r["question_id"].split("-")[1], r["bridge"]["value"]
        v = normalize_answer(value)
        assert owners[kind1, v] == {code}, r
        assert [t for t, text in fields[r["hop_sources"][0].split(" - ", 1)[1]] if f" {v} " in text] == [r["hop_sources"][0]], r
        assert country in r["bridge"]["aliases"] and set(r["bridge"]["aliases"]) <= set(names[country])
    norm = {c: [f" {normalize_answer(n)} " for n in ns] for c, ns in names.items()}
    for country, aliases in {r["bridge"]["value"]: r["bridge"]["aliases"] for r in _two_hop_rows(two_hop)}.items():
        for a in map(normalize_answer, aliases):
            assert not any(f" {a} " in n for c, ns in norm.items() if c != country for n in ns), (country, a)


def test_two_hop_questions_do_not_name_the_bridge(two_hop):
    for r in _two_hop_rows(two_hop):
        assert not contains_alias(r["question"], r["bridge"]["aliases"]), r
        assert not data._names_country(data.first_hop(r)[1], r["bridge"]["aliases"]), r


@pytest.mark.parametrize("value, aliases, names", [
    ("Mount Kenya", ["Kenya", "Republic of Kenya"], True), ("La Tchadienne", ["Chad"], True),
    ("Kyrgyz Respublikasynyn Mamlekettik Gimni", ["Kyrgyzstan", "Kyrgyz Republic"], True),
    ("Hellenic Parliament", ["Greece", "Hellenic Republic"], True), ("UK Parliament", ["United Kingdom"], True),
    ("Mount Catherine", ["Egypt", "Arab Republic of Egypt"], False), ("Knesset", ["Israel", "State of Israel"], False),
    ("Republic Assembly", ["Kenya", "Republic of Kenya"], False),  # "Republic" names no country
])
def test_names_country(value, aliases, names):
    assert data._names_country(value, aliases) is names


def test_two_hop_example_and_determinism(two_hop, factbook):
    rows = {r["question_id"]: r for r in _two_hop_rows(two_hop)}
    r = rows["factbook2-bb-highest_point-currency"]
    assert r["question"] == "What is the currency of the country whose highest point is Mount Hillaby?"
    assert r["answer"]["aliases"] == ["Barbadian dollar", "Barbadian dollars", "BBD"]
    assert r["bridge"] == {"value": "Barbados", "aliases": ["Barbados"]}
    assert r["hop_sources"] == ["Barbados - Geography - Elevation", "Barbados - Economy - Exchange rates"]
    # the cache holds what the builder gives now (a change must bump FACTBOOK_2HOP_VERSION)
    built = data.build_two_hop(factbook[1], data._read_jsonl(data._factbook_cache() / "questions.jsonl"))
    assert built == data._read_jsonl(data._factbook_2hop_cache())


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
    assert corpus.default_corpus("factbook-2hop") == "factbook"
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

