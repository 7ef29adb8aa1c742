"""Evaluation tasks read from local files, each with its reference prompt format.

    summary, records = run_task("boolq", params, config, tokenizer, "boolq_val.jsonl", limit=20)

| task       | data layout                                              | format (lm-eval)                         |
| ---------- | -------------------------------------------------------- | ---------------------------------------- |
| boolq      | SuperGLUE jsonl {question, passage, label}               | "{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes", 0-shot |
| mmlu       | data/{dev,val,test}/{subject}_{split}.csv, no header:     | "The following are multiple choice questions (with answers) about {subject}.\\n\\n" + k dev shots; " A".." D" |
|            | question,A,B,C,D,answer                                  |                                          |
| ceval      | {dev,val,test}/{subject}_{split}.csv with header         | "以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n" + k dev shots; "...\\n答案：" + " A".." D" |
|            | id,question,A,B,C,D,answer(,explanation)                 |                                          |
| gsm8k      | jsonl {question, answer ending "#### N"} (test.jsonl,     | "Question: {q}\\nAnswer:", greedy until "Question:", number extracted |
|            | shots from train.jsonl beside it)                        |                                          |
| perplexity | a text file                                              | rolling windows, BOS-conditioned         |

Few-shot examples are the first k rows of the dev (or train) split, as lm-eval's first_n
sampler does for MMLU and C-Eval; shots are joined by a blank line and precede the question.
`limit` counts rows per subject for MMLU and C-Eval (as lm-eval applies it per subtask).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from aquila_fn.evaluation.evaluate import encode_pair, greedy_generate, perplexity, score_continuations
from aquila_fn.core.files import read_text, utf8_errors
from aquila_fn.data.records import iter_jsonl_records
from parallel.cli import UserError

LETTERS = ("A", "B", "C", "D")
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
BOOLQ_KEYS = ("question", "passage", "label")
GSM8K_KEYS = ("question", "answer")

CEVAL_SUBJECTS = {  # C-Eval subject -> its Chinese name (the official subject_mapping.json)
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计",
    "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师",
    "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物",
    "middle_school_physics": "初中物理", "middle_school_chemistry": "初中化学",
    "veterinary_medicine": "兽医学", "college_economics": "大学经济学", "business_administration": "工商管理",
    "marxism": "马克思主义基本原理", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学", "teacher_qualification": "教师资格", "high_school_politics": "高中政治",
    "high_school_geography": "高中地理", "middle_school_politics": "初中政治",
    "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学",
    "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格",
    "high_school_chinese": "高中语文", "high_school_history": "高中历史", "middle_school_history": "初中历史",
    "civil_servant": "公务员", "sports_science": "体育学", "plant_protection": "植物保护",
    "basic_medicine": "基础医学", "clinical_medicine": "临床医学", "urban_and_rural_planner": "注册城乡规划师",
    "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师",
    "physician": "医师资格",
}


class TaskDataError(UserError, ValueError):
    """A task file that is missing or does not have the expected layout; names file and line."""


@dataclass
class MultipleChoice:
    """Score each choice as a continuation of `context`; the most likely one is the prediction."""
    id: str
    context: str
    choices: list[str]
    gold: int
    meta: dict = field(default_factory=dict)


@dataclass
class Generation:
    """Generate greedily after `prompt` until a stop string; compare the extracted answer."""
    id: str
    prompt: str
    answer: str
    stop: tuple[str, ...]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- file readers


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise TaskDataError(f"{what} not found: {path}")
    return path


def _jsonl_rows(path: Path, keys: Sequence[str]) -> list[dict]:
    """All rows of a task's jsonl file (the data package's reader, raising TaskDataError)."""
    return list(iter_jsonl_records(path, keys, error=TaskDataError))


def _answer_index(value: str, path: Path, line: int) -> int:
    value = value.strip()
    if value not in LETTERS:
        raise TaskDataError(f"{path}:{line}: answer {value!r} is not one of A/B/C/D")
    return LETTERS.index(value)


def read_choice_csv(path: Path, *, header: bool) -> list[dict]:
    """MMLU (no header: question,A,B,C,D,answer) or C-Eval (header id,question,A,B,C,D,answer
    [,explanation]) rows as {question, choices, answer index, id}."""
    rows = []
    with open(_need_file(path, "CSV file"), encoding="utf-8", newline="") as f, \
            utf8_errors(path, TaskDataError):
        reader = csv.reader(f)
        names = ["question", "A", "B", "C", "D", "answer"]
        if header:
            first = next(reader, None)
            if first is None:
                raise TaskDataError(f"{path}:1: empty file; expected a header id,question,A,B,C,D,answer")
            names = [c.strip().lstrip("\ufeff") for c in first]
            missing = [c for c in ("question", "A", "B", "C", "D", "answer") if c not in names]
            if missing:
                raise TaskDataError(f"{path}:1: header {names} lacks column(s) {missing}; "
                                    f"expected id,question,A,B,C,D,answer(,explanation)")
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(names):
                raise TaskDataError(f"{path}:{line}: {len(values)} columns, expected {len(names)} "
                                    f"({','.join(names)})")
            row = dict(zip(names, values))
            if not row["answer"].strip():
                raise TaskDataError(f"{path}:{line}: no answer (C-Eval's test split is unlabelled; "
                                    f"evaluate the val split)")
            rows.append({"id": row.get("id", str(len(rows))), "question": row["question"],
                         "choices": [row[c] for c in LETTERS],
                         "answer": _answer_index(row["answer"], path, line)})
    return rows


# ----------------------------------------------------------------------------- BoolQ


def _boolq_label(value, path: Path, i: int) -> int:
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise TaskDataError(f"{path}:{i}: label {value!r} is not true/false")


def boolq_text(row: dict) -> str:
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"


def load_boolq(data: str | Path, *, shots: int = 0, limit: int | None = None, **_) -> list[MultipleChoice]:
    """SuperGLUE BoolQ: choices " no"/" yes" (index = label). Shots come from train.jsonl beside
    the data file."""
    path = Path(data)
    rows = _jsonl_rows(_need_file(path, "data file"), BOOLQ_KEYS)[:limit]
    prefix = ""
    if shots:
        train = _jsonl_rows(_sibling(path, "train.jsonl", "BoolQ few-shot"), BOOLQ_KEYS)
        prefix = "".join(boolq_text(r) + TARGET_DELIMITER + ("yes" if _boolq_label(r["label"], path, i) else "no")
                         + FEWSHOT_DELIMITER for i, r in enumerate(train[:shots], 1))
    return [MultipleChoice(id=str(r.get("idx", i)), context=prefix + boolq_text(r), choices=[" no", " yes"],
                           gold=_boolq_label(r["label"], path, i + 1), meta={"question": r["question"]})
            for i, r in enumerate(rows)]


def _sibling(path: Path, name: str, what: str) -> Path:
    base = path if path.is_dir() else path.parent
    return _need_file(base / name, f"{what} file ({name} next to the data)")


# ----------------------------------------------------------------------------- MMLU / C-Eval


def _choice_text(row: dict, answer_prefix: str) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\n{answer_prefix}"


def _csv_layout(data: str | Path, split: str) -> tuple[Path, dict[str, Path]]:
    """(root holding dev/ and the split dir, {subject: split file}). `data` may be the root, a
    directory containing data/ (MMLU's tarball), or one {subject}_{split}.csv file."""
    p = Path(data)
    if p.is_file():
        m = re.fullmatch(r"(.+)_(dev|val|test)\.csv", p.name)
        if not m:
            raise TaskDataError(f"{p}: expected a file named {{subject}}_{{dev|val|test}}.csv")
        return p.parent.parent, {m.group(1): p}
    if not p.is_dir():
        raise TaskDataError(f"data path not found: {p}")
    if not (p / split).is_dir() and (p / "data" / split).is_dir():
        p = p / "data"
    split_dir = p / split
    if not split_dir.is_dir():
        raise TaskDataError(f"{p} has no {split}/ directory (expected {p}/{split}/{{subject}}_{split}.csv)")
    files = {f.name[: -len(f"_{split}.csv")]: f for f in sorted(split_dir.glob(f"*_{split}.csv"))}
    if not files:
        raise TaskDataError(f"no *_{split}.csv files in {split_dir}")
    return p, files


def _load_choice_task(data, *, split: str, shots: int, limit: int | None, subjects: Sequence[str] | None,
                      header: bool, description: Callable[[str], str], answer_prefix: str
                      ) -> list[MultipleChoice]:
    root, files = _csv_layout(data, split)
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise TaskDataError(f"subject(s) {unknown} not found under {root}/{split}; "
                                f"available: {sorted(files)[:10]}...")
        files = {s: files[s] for s in subjects}
    examples = []
    for subject, path in files.items():
        prefix = description(subject)
        if shots:
            dev = read_choice_csv(_need_file(root / "dev" / f"{subject}_dev.csv", "few-shot (dev) file"),
                                  header=header)
            if len(dev) < shots:
                raise TaskDataError(f"{root}/dev/{subject}_dev.csv has {len(dev)} rows; {shots} shots requested")
            prefix += "".join(_choice_text(r, answer_prefix) + TARGET_DELIMITER + LETTERS[r["answer"]]
                              + FEWSHOT_DELIMITER for r in dev[:shots])
        for r in read_choice_csv(path, header=header)[:limit]:
            examples.append(MultipleChoice(
                id=f"{subject}/{r['id']}", context=prefix + _choice_text(r, answer_prefix),
                choices=[TARGET_DELIMITER + x for x in LETTERS], gold=r["answer"],
                meta={"subject": subject, "question": r["question"]}))
    return examples


def load_mmlu(data, *, shots: int = 5, limit: int | None = None, split: str | None = None,
              subjects: Sequence[str] | None = None, **_) -> list[MultipleChoice]:
    return _load_choice_task(
        data, split=split or "test", shots=shots, limit=limit, subjects=subjects, header=False,
        description=lambda s: f"The following are multiple choice questions (with answers) about "
                              f"{s.replace('_', ' ')}.\n\n",
        answer_prefix="Answer:")


def load_ceval(data, *, shots: int = 5, limit: int | None = None, split: str | None = None,
               subjects: Sequence[str] | None = None, **_) -> list[MultipleChoice]:
    return _load_choice_task(
        data, split=split or "val", shots=shots, limit=limit, subjects=subjects, header=True,
        description=lambda s: f"以下是中国关于{CEVAL_SUBJECTS.get(s, s.replace('_', ' '))}"
                              f"的单项选择题，请选出其中的正确答案。\n\n",
        answer_prefix="答案：")


# ----------------------------------------------------------------------------- GSM8K

_GSM8K_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval's regexes_to_ignore
INVALID = "[invalid]"


def normalize_number(text: str) -> str:
    """lm-eval's exact_match normalisation for GSM8K: drop commas, dollars, '#### ' prefixes
    and a trailing period; case-insensitive."""
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def extract_strict(generation: str) -> str:
    """The number after '#### ' (the format the few-shot answers teach)."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", generation)
    return m.group(1) if m else INVALID


def extract_flexible(generation: str) -> str:
    """The last number-like string anywhere in the generation."""
    matches = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", generation)
    if not matches:
        return INVALID
    return next(g for g in matches[-1] if g)


def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip()


def load_gsm8k(data, *, shots: int = 5, limit: int | None = None, **_) -> list[Generation]:
    """GSM8K jsonl; `data` is test.jsonl or a directory holding it. Shots are the first k rows
    of train.jsonl beside it, with their full worked answers."""
    path = Path(data)
    if path.is_dir():
        path = path / "test.jsonl"
    rows = _jsonl_rows(_need_file(path, "data file"), GSM8K_KEYS)[:limit]
    prefix = ""
    if shots:
        train = _jsonl_rows(_sibling(path, "train.jsonl", "GSM8K few-shot"), GSM8K_KEYS)
        prefix = "".join(f"Question: {r['question']}\nAnswer:{TARGET_DELIMITER}{r['answer']}{FEWSHOT_DELIMITER}"
                         for r in train[:shots])
    return [Generation(id=str(i), prompt=f"{prefix}Question: {r['question']}\nAnswer:",
                       answer=gsm8k_gold(r["answer"]), stop=GSM8K_STOP, meta={"question": r["question"]})
            for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- running


def evaluate_multiple_choice(params, config, tokenizer, examples: Sequence[MultipleChoice], *,
                             batch_size: int = 8, max_len: int | None = None, progress: bool = False,
                             add_bos: bool = True) -> tuple[dict, list[dict]]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character, lm-eval's
    length normalisation) over the examples; one record per example."""
    requests = [encode_pair(tokenizer, ex.context, c, add_bos=add_bos) for ex in examples for c in ex.choices]
    scores = iter(score_continuations(params, config, requests, batch_size=batch_size,
                                      max_len=max_len, progress=progress))
    records = []
    for ex in examples:
        lps = [next(scores).logprob for _ in ex.choices]
        pred = max(range(len(lps)), key=lps.__getitem__)
        norm = max(range(len(lps)), key=lambda j: lps[j] / max(len(ex.choices[j]), 1))
        records.append({"id": ex.id, **ex.meta, "choices": ex.choices, "logprobs": lps, "pred": pred,
                        "gold": ex.gold, "correct": pred == ex.gold, "correct_norm": norm == ex.gold})
    summary = {"n": len(records), "acc": _mean(r["correct"] for r in records),
               "acc_norm": _mean(r["correct_norm"] for r in records)}
    subjects = sorted({r["subject"] for r in records if "subject" in r})
    if subjects:
        summary["subjects"] = {s: {"n": sum(r.get("subject") == s for r in records),
                                   "acc": _mean(r["correct"] for r in records if r.get("subject") == s)}
                               for s in subjects}
    return summary, records


def evaluate_generation(params, config, tokenizer, examples: Sequence[Generation], *, batch_size: int = 8,
                        max_new_tokens: int = 256, progress: bool = False, add_bos: bool = True,
                        decoder_options: dict | None = None) -> tuple[dict, list[dict]]:
    """GSM8K-style exact match: `exact_match` (strict '#### N') and `exact_match_flexible` (last
    number); `acc` is the strict score."""
    prompts = [tokenizer.encode(ex.prompt, bos=add_bos and tokenizer.bos_id is not None) for ex in examples]
    stop = examples[0].stop if examples else ()
    outputs = greedy_generate(params, config, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop,
                              batch_size=batch_size, progress=progress, decoder_options=decoder_options)
    records = []
    for ex, out in zip(examples, outputs):
        gold = normalize_number(ex.answer)
        strict, flexible = extract_strict(out), extract_flexible(out)
        records.append({"id": ex.id, **ex.meta, "answer": ex.answer, "generation": out,
                        "pred": strict, "pred_flexible": flexible,
                        "correct": normalize_number(strict) == gold,
                        "correct_flexible": normalize_number(flexible) == gold})
    em = _mean(r["correct"] for r in records)
    return ({"n": len(records), "acc": em, "exact_match": em,
             "exact_match_flexible": _mean(r["correct_flexible"] for r in records)}, records)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "generation" | "perplexity"
    load: Callable | None
    default_shots: int


TASKS = {
    "boolq": Task("boolq", "multiple_choice", load_boolq, 0),
    "mmlu": Task("mmlu", "multiple_choice", load_mmlu, 5),
    "ceval": Task("ceval", "multiple_choice", load_ceval, 5),
    "gsm8k": Task("gsm8k", "generation", load_gsm8k, 5),
    "perplexity": Task("perplexity", "perplexity", None, 0),
}


def find_task(name: str) -> Task | None:
    """The task a name or alias (c-eval, ppl, ...) stands for, or None."""
    key = name.lower().replace("-", "_")
    return TASKS.get({"c_eval": "ceval", "ppl": "perplexity"}.get(key, key))


def get_task(name: str) -> Task:
    task = find_task(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return task


def load_task(name: str, data, *, shots: int | None = None, limit: int | None = None,
              split: str | None = None, subjects: Sequence[str] | None = None) -> list:
    task = get_task(name)
    if task.load is None:
        raise ValueError(f"task {task.name!r} reads raw text, not examples")
    shots = task.default_shots if shots is None else shots
    if shots < 0 or (limit is not None and limit < 0):
        raise ValueError(f"shots and limit must be non-negative (got shots={shots}, limit={limit})")
    return task.load(data, shots=shots, limit=limit, split=split, subjects=subjects)


def run_task(name: str, params, config, tokenizer, data, *, limit: int | None = None,
             shots: int | None = None, batch_size: int = 8, split: str | None = None,
             subjects: Sequence[str] | None = None, max_new_tokens: int = 256, max_len: int | None = None,
             progress: bool = False, decoder_options: dict | None = None) -> tuple[dict, list[dict]]:
    """Evaluate one task; returns (summary with task, n and the metrics, per-example records).
    decoder_options: more `generate.Decoder` arguments for generative tasks (compile, cache_dir, log)."""
    task = get_task(name)
    if task.kind == "perplexity":
        text = read_text(_need_file(Path(data), "text file"), TaskDataError)
        if limit:
            text = text[:limit]  # limit = characters of the file, for quick runs
        if not text.strip():
            raise TaskDataError(f"{data}: no text to measure perplexity on")
        result = perplexity(params, config, tokenizer, text, max_len=max_len, batch_size=batch_size,
                            progress=progress)
        return {"task": task.name, "n": result["n_tokens"], **result}, [dict(result, data=str(data))]
    examples = load_task(task.name, data, shots=shots, limit=limit, split=split, subjects=subjects)
    if not examples:
        raise TaskDataError(f"{data}: no examples to evaluate")
    if task.kind == "generation":
        summary, records = evaluate_generation(params, config, tokenizer, examples, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens, progress=progress,
                                               decoder_options=decoder_options)
    else:
        summary, records = evaluate_multiple_choice(params, config, tokenizer, examples,
                                                    batch_size=batch_size, max_len=max_len,
                                                    progress=progress)
    shots = task.default_shots if shots is None else shots
    return {"task": task.name, "shots": shots, **summary}, records
