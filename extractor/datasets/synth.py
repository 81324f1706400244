"""Seeded synthetic job postings (Chinese and English) with gold `jd_requirements` labels.

Each posting states some of five requirements (degree, major, years, languages, pluses) in varied
phrasing and order, mixed with distractor sentences (company facts, salary, numbers that are not
requirements). Absent requirements are labelled with the task's absent marker. Phrase templates and
values are split into an `in` set and a disjoint `heldout` set, so a test split can hold templates and
values never seen in training (the honest measure of generalisation).

Values are always copied verbatim from the text, so a perfect extractor scores 1.0.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from extractor import jsonutil

ABSENT = "该JD未要求"
FIELDS = ("学历要求", "专业要求", "工作年限要求", "编程语言", "加分项")

# Values: (in-distribution, held-out). Chinese and English lists are separate.
VALUES = {
    "zh": {
        "学历要求": (["本科", "硕士", "博士", "大专", "统招本科", "985硕士"], ["211本科", "研究生", "中专"]),
        "专业要求": (["计算机", "软件工程", "电子信息", "数学", "统计学", "通信工程", "自动化"],
                 ["人工智能", "物理学", "信息安全"]),
        "工作年限要求": (["1年以上", "2年以上", "3年以上", "5年以上", "1-3年", "3-5年", "应届毕业生"],
                   ["8年以上", "10年以上", "2-4年"]),
        "编程语言": (["python", "java", "c++", "go", "javascript", "c", "scala", "sql", "php", "typescript"],
                 ["rust", "kotlin", "swift", "ruby"]),
        "加分项": (["自然语言处理获奖经历", "开源项目经验", "顶会论文发表", "大厂实习经历", "kaggle竞赛获奖",
                 "熟悉分布式系统", "有团队管理经验", "良好的英语读写能力"],
                ["acm竞赛奖牌", "github高星项目", "数据库内核开发经验"]),
    },
    "en": {
        "学历要求": (["Bachelor", "Master", "PhD", "Associate"], ["MBA", "Doctorate"]),
        "专业要求": (["Computer Science", "Software Engineering", "Mathematics", "Statistics",
                  "Electrical Engineering"], ["Physics", "Data Science"]),
        "工作年限要求": (["1+ years", "2+ years", "3+ years", "5+ years", "3-5 years"], ["7+ years", "10+ years"]),
        "编程语言": (["Python", "Java", "C++", "Go", "JavaScript", "Scala", "SQL", "TypeScript"],
                 ["Rust", "Kotlin", "Haskell"]),
        "加分项": (["open-source contributions", "publications at top conferences", "Kaggle medals",
                 "experience with distributed systems", "team leadership experience"],
                ["startup experience", "a patent portfolio"]),
    },
}

# Clause templates per field: (in-distribution, held-out); {v} is the joined values.
CLAUSES = {
    "zh": {
        "学历要求": (["{v}及以上学历", "学历要求{v}", "{v}学历", "需具备{v}学历"], ["最低{v}文凭", "学历：{v}"]),
        "专业要求": (["{v}相关专业", "{v}等相关专业毕业", "专业为{v}", "{v}专业背景"], ["所学专业：{v}", "主修{v}方向"]),
        "工作年限要求": (["{v}工作经验", "具有{v}相关开发经验", "工作经验{v}", "{v}经验优先考虑"],
                   ["从业{v}", "要求{v}行业经历"]),
        "编程语言": (["熟练掌握{v}", "精通{v}编程", "熟悉{v}语言", "能够使用{v}进行开发"], ["会用{v}写代码", "技术栈：{v}"]),
        "加分项": (["有{v}者优先", "{v}优先", "具备{v}者加分", "如有{v}更佳"], ["加分：{v}", "拥有{v}将被优先录用"]),
    },
    "en": {
        "学历要求": (["{v} degree or higher", "a {v} degree is required", "holds a {v} degree"], ["minimum education: {v}"]),
        "专业要求": (["a background in {v}", "majored in {v} or a related field", "{v} graduates welcome"],
                 ["studies in {v}"]),
        "工作年限要求": (["{v} of industry experience", "at least {v} of experience", "{v} in a similar role"],
                   ["experience: {v}"]),
        "编程语言": (["fluent in {v}", "strong {v} skills", "hands-on coding in {v}"], ["tech stack: {v}"]),
        "加分项": (["{v} is a plus", "bonus points for {v}", "{v} preferred"], ["nice to have: {v}"]),
    },
}

DISTRACTORS = {
    "zh": (["公司成立于{y}年，团队规模{n}人。", "薪资{n}k-{m}k，十三薪。", "办公地点位于北京海淀区。", "我们提供六险一金和带薪年假。",
            "团队负责搜索推荐系统的研发。", "每年组织{n}次团建活动。"],
           ["公司总部设在深圳南山区。", "产品日活用户超过{n}万。"]),
    "en": (["Founded in {y}, we have {n} employees.", "Salary {n}k-{m}k per year.", "We offer remote work.",
            "The team builds our search platform."], ["Our office is in Berlin.", "We serve {n} million users."]),
}
JOINERS = {"zh": ("，", "；", "。"), "en": (", ", "; ", ". ")}
LIST_SEP = {"zh": ("、", "/", "和"), "en": (", ", " and ", "/")}
HEADERS = {"zh": ["岗位要求：", "任职要求：", "【职位描述】", ""], "en": ["Requirements: ", "About you: ", ""]}


def _pick(rng: random.Random, pair: tuple, split: str):
    pool = pair[0] if split == "in" else pair[1] if split == "heldout" else pair[0] + pair[1]
    return pool[rng.randrange(len(pool))]


def _values(rng: random.Random, lang: str, fld: str, split: str) -> list[str]:
    pair = VALUES[lang][fld]
    pool = pair[0] if split == "in" else pair[1] if split == "heldout" else pair[0] + pair[1]
    many = fld in ("编程语言", "加分项", "专业要求") and rng.random() < 0.4
    k = min(len(pool), 2 if many else 1)
    return rng.sample(pool, k)


def requirement_clauses(rng: random.Random, clause) -> tuple[list[str], dict]:
    """Each field is absent (labelled with the absent marker) one time in five, else `clause(field)` gives
    its clause text and values."""
    gold: dict[str, list[str]] = {}
    clauses = []
    for fld in FIELDS:
        if rng.random() < 0.2:
            gold[fld] = [ABSENT]
            continue
        text, gold[fld] = clause(fld)
        clauses.append(text)
    return clauses, gold


def posting(rng: random.Random, lang: str, split: str = "in") -> tuple[str, dict]:
    """One posting text and its gold labels."""
    def clause(fld: str) -> tuple[str, list[str]]:
        vals = _values(rng, lang, fld, split)
        sep = LIST_SEP[lang][rng.randrange(len(LIST_SEP[lang]))]
        return _pick(rng, CLAUSES[lang][fld], split).format(v=sep.join(vals)), vals

    clauses, gold = requirement_clauses(rng, clause)
    for _ in range(rng.randrange(3)):
        text = _pick(rng, DISTRACTORS[lang], split)
        n = rng.randrange(2, 90)
        clauses.append(text.format(y=rng.randrange(1990, 2024), n=n, m=n + rng.randrange(5, 30)))
    rng.shuffle(clauses)
    joiner = JOINERS[lang][rng.randrange(2)]
    body = joiner.join(c.rstrip("。.") for c in clauses) + JOINERS[lang][2].strip() if clauses else ""
    header = HEADERS[lang][rng.randrange(len(HEADERS[lang]))]
    return header + body, gold


def generate(n: int, seed: int = 0, lang: str = "zh", split: str = "in", start: int = 0,
             prefix: str = "jd") -> Iterator[tuple[dict, dict]]:
    """Yield n ({"id", "text"}, {"id", "gold"}) pairs; the same seed gives the same corpus."""
    if lang not in ("zh", "en", "mix"):
        raise ValueError(f"lang must be zh, en or mix, not {lang!r}")
    rng = random.Random(f"{seed}:{lang}:{split}")
    width = max(7, len(str(start + n)))
    for i in range(start, start + n):
        this_lang = lang if lang != "mix" else ("zh" if rng.random() < 0.5 else "en")
        text, gold = posting(rng, this_lang, split)
        rid = f"{prefix}-{i:0{width}d}"
        yield {"id": rid, "text": text}, {"id": rid, "gold": gold}


def write_corpus(out: Path, gold_out: Path | None, n: int, seed: int = 0, lang: str = "zh",
                 split: str = "in", prefix: str = "jd") -> int:
    """Stream n postings to `out` (and gold labels to `gold_out`) in 64k-line chunks."""
    return write_pairs(out, gold_out, generate(n, seed, lang, split, prefix=prefix))


def write_pairs(out: Path, gold_out: Path | None, pairs) -> int:
    """Write ({"id", "text"}, {"id", "gold"}) pairs as a corpus and its gold file; returns the count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    gold_fh = open(gold_out, "w", encoding="utf-8") if gold_out else None
    count = 0
    try:
        with open(out, "w", encoding="utf-8") as fh:
            texts, golds = [], []
            for rec, gold in pairs:
                texts.append(jsonutil.dumps(rec))
                golds.append(jsonutil.dumps(gold))
                count += 1
                if len(texts) >= 65536:
                    _flush(fh, gold_fh, texts, golds)
            _flush(fh, gold_fh, texts, golds)
    finally:
        if gold_fh:
            gold_fh.close()
    return count


def _flush(fh, gold_fh, texts: list, golds: list) -> None:
    if texts:
        fh.write("\n".join(texts) + "\n")
        if gold_fh:
            gold_fh.write("\n".join(golds) + "\n")
    texts.clear()
    golds.clear()
