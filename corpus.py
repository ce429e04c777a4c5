"""The search corpus: the passages the wiki_search tool searches, loaded or prepared once.

    load_corpus       "factbook" (embedded), a JSONL of {title, text}, or a prepared index's folder
    prepare_corpus    index a large corpus (a Hugging Face dataset such as the 21M DPR Wikipedia
                      passages, a dataset folder, or a JSONL) once; --corpus FOLDER memory-maps it
    task_stats        how often the first passages hold the answer (BM25 recall@1/@5)

    python corpus.py                                    # the factbook task's statistics
    python corpus.py --task factbook-2hop               # the two-hop task's, with each hop's oracle recall
    python corpus.py --prepare PeterJinGo/wiki-18-corpus wiki18-index   # configs/triviaqa.md
"""

from __future__ import annotations

import os

from data import SPLITS, UNKNOWN_TASK, _factbook_cache, _read_jsonl, first_hop, load_task
from rewards import contains_alias
from tool_env import SearchIndex


def load_corpus(name: str):
    """The searchable passages ({"title", "text"}): "factbook", the path of a JSONL file
    with one {"title": ..., "text": ...} object per line, or the folder of an index that
    prepare_corpus saved (returned as its path: tool_env.make_tools memory-maps it)."""
    if name == "factbook":
        return _read_jsonl(_factbook_cache() / "passages.jsonl")
    if os.path.isfile(os.path.join(name, "params.index.json")):
        return name
    if not os.path.exists(name):
        raise FileNotFoundError(
            f"search corpus {name!r} not found: use 'factbook' or the path of a JSONL file "
            'with one {"title": ..., "text": ...} object per line'
        )
    rows = _read_jsonl(name)
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("title"), str) or not isinstance(r.get("text"), str):
            raise ValueError(f"{name}: passage {i + 1} needs string fields 'title' and 'text'")
    if not rows:
        raise ValueError(f"{name}: the corpus is empty")
    return rows


def _passage(row: dict) -> dict:
    """{"title", "text"} of a corpus row: already so (JSONL, facebook/wiki_dpr), or DPR's
    wiki-18 "contents" ('"Title"\ntext', PeterJinGo/wiki-18-corpus)."""
    if isinstance(row.get("title"), str) and isinstance(row.get("text"), str):
        return {"title": row["title"], "text": row["text"]}
    if isinstance(row.get("contents"), str):
        title, _, text = row["contents"].partition("\n")
        return {"title": title.strip().strip('"'), "text": text.strip()}
    raise ValueError(f"a corpus row needs 'title' and 'text', or 'contents'; got {sorted(row)}")


def prepare_corpus(source: str, out: str, limit: int | None = None) -> int:
    """Build the BM25 index of a passage corpus once and save it to `out` (then
    `--corpus OUT`; loading memory-maps it). source: a Hugging Face dataset id (e.g.
    PeterJinGo/wiki-18-corpus, the 21M DPR passages Search-R1 used), a dataset folder
    saved with `datasets`, or a JSONL of {title, text}. Returns the number of passages."""
    import datasets


    if source.endswith(".jsonl"):
        ds = datasets.Dataset.from_list(load_corpus(source))
    elif os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as e:  # offline hub errors come in many types
            raise RuntimeError(f"could not load corpus {source!r} ({type(e).__name__}): the hub is not reachable "
                               "and it is not in the local cache; pass a dataset folder or a JSONL") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.map(_passage, remove_columns=ds.column_names)
    SearchIndex(ds).save(out)
    return len(ds)


def default_corpus(task: str, corpus: str | None = None) -> str:
    """The search corpus for a task: `corpus` if given, else "factbook" for the
    factbook tasks (one-hop and two-hop); TriviaQA has no embedded corpus, so it must be given."""
    if task not in ("factbook", "factbook-2hop", "triviaqa") and not task.startswith("triviaqa:"):
        raise ValueError(UNKNOWN_TASK.format(task))
    if corpus:
        return corpus
    if task in ("factbook", "factbook-2hop"):
        return "factbook"
    raise ValueError(f'task {task!r} needs --corpus PATH, a JSONL of {{"title", "text"}} passages')


def task_stats(name: str = "factbook", corpus: str = "factbook", examples: int = 3) -> str:
    """Questions per split, BM25 recall@1/@5 with the question text as query (a gold
    alias inside a retrieved passage, as the search tool returns it), and examples."""
    from collections import Counter

    passages = load_corpus(corpus)
    index = SearchIndex.load(passages) if isinstance(passages, str) else SearchIndex(passages)
    if name == "factbook-2hop":
        return two_hop_stats(index)
    lines = [f"task {name}: {len(index.passages)} passages",
             "split        questions  recall@1  recall@5"]
    per_kind = Counter()
    kind_hits = Counter()
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = load_task(name, split)
        except ValueError:  # a local TriviaQA copy may lack a split
            continue
    for split, ds in splits.items():
        r1 = r5 = 0
        for row in ds:
            hits = [contains_alias(index.format(i), row["answer"]["aliases"])
                    for i in index.retrieve(row["question"], 5)]
            r1 += bool(hits and hits[0])
            r5 += any(hits)
            kind = row["question_id"].rsplit("-", 1)[-1]
            per_kind[kind] += 1
            kind_hits[kind] += bool(hits and hits[0])
        lines.append(f"{split:<12} {len(ds):>9}  {r1 / max(len(ds), 1):>8.3f}  {r5 / max(len(ds), 1):>8.3f}")
    lines.append("recall@1 by template (all splits): " + ", ".join(
        f"{k} {kind_hits[k] / per_kind[k]:.2f} (n={per_kind[k]})" for k in sorted(per_kind)))
    if "test" not in splits or not isinstance(passages, list):
        return "\n".join(lines)
    test = splits["test"]
    by_title = {p["title"]: p["text"] for p in passages}
    for row in [test[i] for i in range(0, len(test), max(1, len(test) // examples))][:examples]:
        lines.append(f"\nQ: {row['question']}\nA: {row['answer']['value']}  (aliases: {row['answer']['aliases']})"
                     f"\npassage [{row['source']}]: {by_title.get(row['source'], '')[:300]}")
    return "\n".join(lines)


# The words of an oracle query for each template's passage: the template's own words,
# and for the currency the field's name too ("currency Burundi" finds no exchange-rate
# table: recall@1 0.00, as for the one-hop question); "major urban areas" is the field.
ORACLE_WORDS = {"highest_point": "highest point", "lowest_point": "lowest point", "legislature": "legislature name",
                "anthem": "national anthem", "capital": "capital", "currency": "currency exchange rates",
                "urban_area": "major urban areas"}


def two_hop_stats(index: SearchIndex) -> str:
    """The two-hop task's questions per split and BM25 recall@1/@5 of each hop with an
    oracle query: hop 1 "<first-hop words> <value>" ("highest point Mount Hillaby"),
    found if a passage's title is the bridge's; hop 2 "<second-hop words> <bridge>"
    ("currency exchange rates Barbados"), found if a passage (as the tool returns it)
    holds a gold alias; and one search with the whole question as the query (does a
    passage hold the answer; and, in parentheses, is the first passage the bridge's)."""
    def recall(query, hit):
        hits = [hit(i) for i in index.retrieve(query, 5)]
        return bool(hits and hits[0]), any(hits)

    lines = [f"task factbook-2hop: {len(index.passages)} passages",
             "split        questions  hop1@1  hop1@5  hop2@1  hop2@5  question@1  question@5  (bridge@1)"]
    for split in SPLITS:
        ds = load_task("factbook-2hop", split)
        sums = [0] * 7
        for row in ds:
            kind1, value1 = first_hop(row)
            kind2 = row["question_id"].split("-")[3]
            bridge = lambda i: index.passages[i]["title"].split(" - ")[0] == row["bridge"]["value"]  # noqa: E731
            answer = lambda i: contains_alias(index.format(i), row["answer"]["aliases"])  # noqa: E731
            got = (recall(f"{ORACLE_WORDS[kind1]} {value1}", bridge)
                   + recall(f"{ORACLE_WORDS[kind2]} {row['bridge']['value']}", answer) + recall(row["question"], answer)
                   + recall(row["question"], bridge)[:1])
            sums = [s + g for s, g in zip(sums, got)]
        n = max(len(ds), 1)
        lines.append(f"{split:<12} {len(ds):>9}" + "".join(f"  {s / n:>{w}.3f}" for s, w in zip(sums, (6, 6, 6, 6, 10, 10, 10))))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Task statistics, or build a search corpus's index once.")
    p.add_argument("--prepare", nargs=2, metavar=("SOURCE", "OUT"),
                   help="index SOURCE (HF dataset id, dataset folder or JSONL) into folder OUT, for --corpus OUT")
    p.add_argument("--limit", type=int, default=None, help="with --prepare: the first N passages only")
    p.add_argument("--task", default="factbook", help="factbook, factbook-2hop, triviaqa or triviaqa:PATH")
    p.add_argument("--corpus", default="factbook")
    a = p.parse_args()
    try:
        if a.prepare:
            print(f"indexed {prepare_corpus(*a.prepare, limit=a.limit)} passages into {a.prepare[1]}")
        else:
            print(task_stats(a.task, a.corpus))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
