import json
from pathlib import Path

from sparse_merge.tasks import mt_bench
from sparse_merge.tasks.generation import cut_at_stop
from sparse_merge.tasks.mt_bench import chat_prompt, generate_answers, load_questions, write_answers

FIXTURE = Path(__file__).parent / "fixtures" / "mt_bench_questions.jsonl"


def test_multi_turn_answers_in_fastchat_format(tmp_path, tokenizer):
    questions = load_questions(FIXTURE)
    seen = []

    def echo(model, tok, prompts, n):  # answers "A<turn>" and records the prompts it saw
        seen.append(list(prompts))
        return [f" A{len(seen)} " for _ in prompts]

    answers = generate_answers(None, tokenizer, questions, "toy", generate=echo)
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 2, 1]
    assert answers[0]["choices"][0]["turns"] == ["A1", "A2"]
    assert len(seen[0]) == 3 and len(seen[1]) == 2  # turn 2 only for two-turn questions
    assert "A1" in seen[1][0] and questions[0]["turns"][0] in seen[1][0]  # history carried over
    path = write_answers(answers, tmp_path / "model_answer" / "toy.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 101, 120]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rows[0]["choices"][0]["index"] == 0 and rows[0]["model_id"] == "toy"


def test_plain_transcript_without_chat_template(tokenizer):
    prompt = chat_prompt(
        tokenizer,
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"},
        ],
    )
    assert prompt == "User: hi\nAssistant: yo\nUser: ok?\nAssistant:"


def test_real_generation_on_tiny_model(tiny_llama, tokenizer):
    answers = generate_answers(
        tiny_llama, tokenizer, load_questions(FIXTURE), "tiny", max_new_tokens=5
    )
    assert all(isinstance(t, str) for a in answers for t in a["choices"][0]["turns"])


def test_plain_transcript_answers_end_before_the_next_user_turn(monkeypatch, tokenizer):
    def run_on(model, tok, prompts, max_new_tokens, batch_size=64, stop=(), **kwargs):
        return [cut_at_stop(" paris.\nUser: and spain?\nAssistant: madrid.", stop) for _ in prompts]

    monkeypatch.setattr(mt_bench, "greedy_generate", run_on)
    questions = [{"question_id": 1, "category": "x", "turns": ["capital of france?"]}]
    answers = generate_answers(None, tokenizer, questions, "toy")
    assert answers[0]["choices"][0]["turns"] == ["paris."]
