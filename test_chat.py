"""chat.py: questions from a file, every turn shown, the answer last."""

import json

import chat
from conftest import CORPUS


def test_chat_shows_every_turn(tiny, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in CORPUS))
    questions = tmp_path / "q.txt"
    questions.write_text("What is the capital of Egypt?\n\nWhat is the capital of Chad?\n")
    assert chat.main(["--model", tiny[1], "--corpus", str(corpus), "--questions", str(questions),
                      "--max-turn-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # two questions (the blank line is skipped), each with at least one agent line and a final line
    assert out.count("\nQuestion: ") == 2 and "Question: What is the capital of Chad?" in out
    blocks = out.split("\nQuestion: ")[1:]
    assert all("\nagent | " in b and "\n=> " in b for b in blocks)


def test_transcript_of_a_two_turn_episode():
    from sampler import Episode

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Question: q?"},
            {"role": "assistant", "content": "<reasoning>r</reasoning><tool>{}</tool>"},
            {"role": "user", "content": "<result>\nEgypt - Capital\nCairo\n</result>"},
            {"role": "assistant", "content": "<reasoning>found</reasoning><answer>Cairo</answer>"}]
    ep = Episode({"question_id": "user", "question": "q?"}, msgs, end_reason="answer")
    assert chat.transcript(ep).splitlines() == [
        "agent | <reasoning>r</reasoning><tool>{}</tool>",
        "tool  | <result>", "tool  | Egypt - Capital", "tool  | Cairo", "tool  | </result>",
        "agent | <reasoning>found</reasoning><answer>Cairo</answer>",
        "=> Cairo",
    ]
