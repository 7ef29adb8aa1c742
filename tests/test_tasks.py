"""Task readers and prompt formats (aquila_fn.evaluation.tasks) on fixtures in the real MMLU / C-Eval / GSM8K /
BoolQ layouts, and scoring them with stories260K."""

from pathlib import Path

import pytest

from aquila_fn.evaluation import tasks
from aquila_fn.interop.llama2c import load_llama2c
from aquila_fn.data.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parent / "data" / "eval"


@pytest.fixture(scope="module")
def model(assets):
    config, params = load_llama2c(assets / "stories260K.bin")
    return config, params, load_tokenizer(assets / "tok512.model")


# ----------------------------------------------------------------------------- BoolQ


def test_boolq_prompt_is_lm_eval_format(assets):
    examples = tasks.load_task("boolq", assets / "boolq_val.jsonl", limit=5)
    assert len(examples) == 5
    ex = examples[0]
    assert ex.context.startswith("Ethanol fuel -- All biomass")
    assert ex.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert ex.choices == [" no", " yes"] and ex.gold == 0  # label "false"
    assert [e.gold for e in tasks.load_task("boolq", assets / "boolq_val.jsonl", limit=3)] == [0, 1, 1]


def test_boolq_few_shot_prefix_from_train_file(assets):
    (ex, *_) = tasks.load_task("boolq", DATA / "boolq" / "val.jsonl", shots=2)
    shots = ex.context.split("\n\n")
    assert len(shots) == 3
    assert shots[0].endswith("?\nAnswer: yes") or shots[0].endswith("?\nAnswer: no")
    with pytest.raises(tasks.TaskDataError, match="train.jsonl"):
        tasks.load_task("boolq", assets / "boolq_val.jsonl", shots=1)  # no train.jsonl beside it


def test_boolq_scores_with_stories260k(model, assets):
    config, params, tok = model
    summary, records = tasks.run_task("boolq", params, config, tok, assets / "boolq_val.jsonl", limit=6)
    assert summary["task"] == "boolq" and summary["n"] == 6 and len(records) == 6
    assert summary["acc"] == sum(r["correct"] for r in records) / 6
    for r in records:
        assert r["pred"] == max(range(2), key=r["logprobs"].__getitem__)


# ----------------------------------------------------------------------------- MMLU


def test_mmlu_prompt_format_with_shots():
    examples = tasks.load_task("mmlu", DATA / "mmlu", shots=2)
    assert len(examples) == 8
    ex = examples[0]
    assert ex.meta["subject"] == "abstract_algebra" and ex.gold == 1
    assert ex.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the order of the element 2 in the additive group Z_6.\nA. 1\nB. 2\nC. 3\nD. 6\nAnswer: C\n\n"
        "Which of the following is a field?\nA. Z_4\nB. Z_6\nC. Z_7\nD. Z_8\nAnswer: C\n\n"
        "How many elements does the symmetric group S_3 have?\nA. 3\nB. 6\nC. 9\nD. 27\nAnswer:")
    assert ex.choices == [" A", " B", " C", " D"]


def test_mmlu_layouts_limit_split_subjects():
    # the tarball's root (with data/), the data dir itself, and one subject file all work
    assert len(tasks.load_task("mmlu", DATA / "mmlu" / "data", shots=0, limit=1)) == 2  # per subject
    single = tasks.load_task("mmlu", DATA / "mmlu" / "data" / "test" / "high_school_geography_test.csv", shots=1)
    assert len(single) == 4 and single[0].context.count("\n\n") == 2
    assert len(tasks.load_task("mmlu", DATA / "mmlu", shots=0, split="val")) == 4
    picked = tasks.load_task("mmlu", DATA / "mmlu", shots=0, subjects=["high_school_geography"])
    assert {e.meta["subject"] for e in picked} == {"high_school_geography"}
    with pytest.raises(tasks.TaskDataError, match="has 3 rows; 5 shots"):
        tasks.load_task("mmlu", DATA / "mmlu")  # the fixture dev files are short of the default 5


def test_mmlu_scores_per_subject(model):
    config, params, tok = model
    summary, records = tasks.run_task("mmlu", params, config, tok, DATA / "mmlu", shots=1, limit=2)
    assert summary["n"] == 4 and summary["shots"] == 1
    assert set(summary["subjects"]) == {"abstract_algebra", "high_school_geography"}
    assert all(s["n"] == 2 for s in summary["subjects"].values())
    assert all(len(r["logprobs"]) == 4 and r["pred"] in range(4) for r in records)


def test_csv_errors_name_file_and_line(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q1,a,b,c,d,A\nq2,a,b,c,A\n")
    with pytest.raises(tasks.TaskDataError, match=r"x_test\.csv:2: 5 columns, expected 6"):
        tasks.load_task("mmlu", tmp_path, shots=0)
    (tmp_path / "test" / "x_test.csv").write_text("q1,a,b,c,d,E\n")
    with pytest.raises(tasks.TaskDataError, match=r"x_test\.csv:1: answer 'E'"):
        tasks.load_task("mmlu", tmp_path, shots=0)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "y_val.csv").write_text("id,question,A,B,C\n0,q,a,b,c\n")
    with pytest.raises(tasks.TaskDataError, match=r"y_val\.csv:1: header .* lacks column\(s\) \['D', 'answer'\]"):
        tasks.load_task("ceval", tmp_path, shots=0)
    with pytest.raises(tasks.TaskDataError, match="no test/ directory"):
        tasks.load_task("mmlu", DATA / "gsm8k", shots=0)


# ----------------------------------------------------------------------------- C-Eval


def test_ceval_prompt_format():
    examples = tasks.load_task("ceval", DATA / "ceval", shots=1)
    assert len(examples) == 5
    ex = examples[0]
    assert ex.meta["subject"] == "computer_network" and ex.gold == 1
    assert ex.context == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "在OSI参考模型中，负责路由选择的是____。\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案： C\n\n"
        "TCP协议属于OSI模型的____。\nA. 网络层\nB. 传输层\nC. 会话层\nD. 应用层\n答案：")
    assert examples[1].meta["question"] == "下列协议中,用于域名解析的是____。"  # quoted CSV field


def test_ceval_test_split_is_unlabelled():
    with pytest.raises(tasks.TaskDataError, match=r"computer_network_test\.csv:2: no answer"):
        tasks.load_task("ceval", DATA / "ceval", shots=0, split="test")


def test_ceval_scores(model):
    config, params, tok = model
    summary, records = tasks.run_task("ceval", params, config, tok, DATA / "ceval", shots=2)
    assert summary["n"] == 5 and len(records) == 5
    assert summary["subjects"]["high_school_physics"]["n"] == 2


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_answer_extraction():
    assert tasks.gsm8k_gold("3 + 5 = <<3+5=8>>8 apples.\n#### 8") == "8"
    assert tasks.extract_strict("so 1,200 in all.\n#### 1,200\n") == "1,200"
    assert tasks.extract_strict("the answer is 5") == tasks.INVALID
    assert tasks.extract_flexible("He has 3 + 5 = 8 apples, and $12.") == "$12."
    assert tasks.extract_flexible("no digits") == tasks.INVALID
    assert tasks.normalize_number("$1,200.") == "1200"
    assert tasks.normalize_number("The answer is 7.\n#### 7") == "7"


def test_gsm8k_prompt_format():
    examples = tasks.load_task("gsm8k", DATA / "gsm8k", shots=2)
    assert len(examples) == 4 and examples[0].answer == "5" and examples[3].answer == "750"
    blocks = examples[0].prompt.split("\n\n")
    assert blocks[0] == ("Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\n"
                         "Answer: Tom starts with 3 apples.\nHe buys 5 more, so he has 3 + 5 = <<3+5=8>>8 apples.\n#### 8")
    assert blocks[2] == ("Question: Lily has 7 balls. She gives 2 to her friend. How many balls does Lily have?\n"
                         "Answer:")
    assert examples[0].stop == ("Question:", "</s>", "<|im_end|>")
    # a test file given directly finds train.jsonl beside it
    assert tasks.load_task("gsm8k", DATA / "gsm8k" / "test.jsonl", shots=1, limit=1)[0].prompt.count("Question:") == 2


def test_gsm8k_scoring_of_generations(model, monkeypatch):
    config, params, tok = model
    fake = ["Lily has 5 balls.\n#### 5", "3 * 4 = 12 legs.", "#### 24", "1,000 - 250 = 750.\n#### 750"]
    monkeypatch.setattr(tasks, "greedy_generate", lambda *a, **k: fake)
    summary, records = tasks.run_task("gsm8k", params, config, tok, DATA / "gsm8k", shots=1)
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert [r["correct_flexible"] for r in records] == [True, True, False, True]
    assert summary["exact_match"] == summary["acc"] == 0.5 and summary["exact_match_flexible"] == 0.75


def test_gsm8k_generates_with_stories260k(model):
    config, params, tok = model
    summary, records = tasks.run_task("gsm8k", params, config, tok, DATA / "gsm8k", shots=1, limit=2,
                                      max_new_tokens=12)
    assert summary["n"] == 2 and all(isinstance(r["generation"], str) for r in records)
    assert all("Question:" not in r["generation"] for r in records)


# ----------------------------------------------------------------------------- registry


def test_unknown_task_and_missing_files():
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; available: boolq, mmlu"):
        tasks.get_task("hellaswag")
    assert tasks.get_task("C-Eval").name == "ceval"
    with pytest.raises(tasks.TaskDataError, match="data file not found"):
        tasks.load_task("boolq", DATA / "nope.jsonl")
    with pytest.raises(tasks.TaskDataError, match=r"test\.jsonl:1: missing key\(s\) \['passage', 'label'\]"):
        tasks.load_task("boolq", DATA / "gsm8k" / "test.jsonl")


def test_jsonl_field_errors(tmp_path):
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "label": true}\n{"question": "q"\n')
    with pytest.raises(tasks.TaskDataError, match=r"val\.jsonl:2: not valid JSON"):
        tasks.load_task("boolq", bad)
    bad.write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(tasks.TaskDataError, match="label 'maybe'"):
        tasks.load_task("boolq", bad)
