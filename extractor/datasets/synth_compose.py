"""Compositional synthetic job postings: the demo's corpus, built so that copying spans is what pays.

`synth.py`'s postings draw a few values from short lists and a few fixed clause templates, so a model can
memorise them (and does: it scores ~0.98 on them and 0.0 on unseen ones). Here every value is composed
from parts (a degree with a qualifier, a major from a stem and a suffix, a year count in one of several
forms, a language from a list of real names plus seeded made-up ones, a plus from a domain and a kind),
so each pool holds hundreds to thousands of entries; every clause is a cue before the value and a cue
after it, chosen from a dozen each. Each value and each (cue before, cue after) pair belongs to the `in`
or the `heldout` split by a stable hash, so a held-out posting's values and clause phrasings never occur
in training, while the words a field is recognised by (学历, 专业, 经验, 熟悉, 优先 …) are shared, as they
are in real postings. Values are copied verbatim into the text, so a perfect extractor scores 1.0.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from functools import lru_cache

from extractor.datasets.synth import requirement_clauses

HELDOUT_SHARE = 30  # percent of values and clause phrasings kept out of training

DEGREES = ["大专", "本科", "硕士", "博士", "研究生", "中专", "专科", "学士", "高中"]
DEGREE_QUALIFIERS = ["", "统招", "全日制", "985", "211", "双一流", "重点院校", "一本", "海外", "统招全日制",
                     "知名高校", "名校", "二本", "公办"]
MAJOR_STEMS = ["计算机", "软件", "电子", "通信", "信息", "数据", "网络", "人工智能", "机械", "自动化", "金融",
               "经济", "管理", "测控", "光电", "材料", "能源", "智能", "控制", "电气", "土木", "数字媒体",
               "航空", "航天", "船舶", "交通", "环境", "地理", "微电子", "集成电路", "信号", "网络安全",
               "密码", "机器人", "遥感", "生物医学", "工业设计", "物联网", "电信", "仪器"]
MAJOR_SUFFIXES = ["工程", "科学", "技术", "科学与技术", "工程与技术", "学", "技术与应用"]
MAJOR_PLAIN = ["数学", "统计学", "物理学", "化学", "应用数学", "运筹学", "心理学", "语言学", "哲学", "会计学"]
CN_NUMBERS = ["一", "两", "三", "四", "五", "六", "七", "八", "九", "十"]
YEAR_FORMS = ["{n}年以上", "{n}年及以上", "{a}-{b}年", "{a}~{b}年", "{n}年+", "{n}年左右", "不少于{n}年",
              "{c}年以上", "{c}年及以上", "{n}年以内"]
YEAR_PLAIN = ["应届毕业生", "应届生", "在校生", "经验不限"]
LANGUAGES = ["python", "java", "c++", "go", "rust", "kotlin", "swift", "scala", "ruby", "php", "perl", "lua",
             "r", "matlab", "julia", "haskell", "erlang", "elixir", "dart", "typescript", "javascript", "c#",
             "objective-c", "shell", "bash", "sql", "fortran", "cobol", "groovy", "clojure", "f#", "ocaml", "zig",
             "nim", "solidity", "verilog", "vhdl", "delphi", "pascal", "lisp", "scheme", "prolog", "ada", "tcl",
             "powershell", "c", "assembly", "cuda", "hive", "spark"]
SYLLABLES = ["ka", "lo", "mi", "zen", "tor", "vex", "qu", "ra", "sil", "bo", "dra", "fin", "gel", "ho", "jun", "ky",
             "lum", "nox", "pi", "so", "tu", "wy", "xi", "zo", "ar", "el", "on", "ux"]
LANG_SUFFIXES = ["", "", "", "script", "lang", "++", "#", "ql", "2", "3"]
PLUS_DOMAINS = ["推荐系统", "搜索引擎", "分布式存储", "大模型", "计算机视觉", "语音识别", "自然语言处理", "数据库内核",
                "编译器", "操作系统", "云原生", "微服务", "高并发", "广告投放", "风控", "量化交易", "自动驾驶",
                "嵌入式", "图形渲染", "游戏引擎", "区块链", "知识图谱", "多模态", "强化学习", "实时计算", "数据仓库",
                "芯片验证", "网络协议", "信息检索", "图神经网络", "边缘计算", "异构计算", "隐私计算", "智能客服",
                "机器翻译", "用户增长", "支付系统", "即时通讯", "视频编解码", "容器编排"]
PLUS_KINDS = ["开发经验", "项目经验", "研发经历", "落地经验", "实习经历", "相关论文", "竞赛获奖经历", "相关专利",
              "优化经验", "架构设计经验", "开源贡献"]
PLUS_OTHER = ["{x}竞赛获奖", "{x}比赛奖牌"]
COMPETITIONS = ["ACM", "Kaggle", "天池", "数学建模", "挑战杯", "蓝桥杯", "ICPC", "CCPC", "KDD Cup", "信息学奥赛"]
SOFT_SKILLS = ["良好的沟通能力", "良好的英语读写能力", "较强的团队协作能力", "优秀的文档写作能力", "较强的学习能力",
               "出色的抗压能力", "独立解决问题的能力", "良好的产品意识"]
INTERNSHIPS = ["大厂实习经历", "头部互联网公司实习经历", "外企工作经历", "独角兽公司工作经历", "创业经历",
               "海外留学经历", "团队管理经验", "技术博客写作经验"]

# (cue before the value, cue after it); at least one side names the field.
CUES = {
    "学历要求": (["", "学历要求", "学历：", "需", "要求", "须具备", "最低", "学历不低于", "具有", "拥有", "至少"],
             ["", "及以上学历", "学历", "以上学历", "或以上学历", "及以上", "学位", "文凭", "及以上文凭", "毕业"]),
    "专业要求": (["", "专业要求", "专业：", "专业为", "主修", "所学专业为", "毕业于", "来自", "具备"],
             ["相关专业", "等相关专业", "专业", "专业背景", "相关专业毕业", "方向", "类专业", "或相关专业", "等专业",
              "专业方向"]),
    "工作年限要求": (["", "具有", "拥有", "需", "工作经验", "工作年限", "要求", "相关工作经验", "从业", "开发经验"],
               ["工作经验", "相关经验", "开发经验", "工作经历", "经验", "行业经验", "研发经验", "", "从业经历"]),
    "编程语言": (["熟练掌握", "精通", "熟悉", "掌握", "会使用", "能够使用", "擅长", "至少熟悉", "熟练使用",
              "技术栈：", "编程语言：", "开发语言为", "具备"],
             ["", "编程", "语言", "开发", "编程语言", "进行开发", "等语言", "及相关框架", "编程能力"]),
    "加分项": (["有", "具备", "拥有", "如有", "加分项：", "加分：", "", "若有", "有过"],
            ["者优先", "优先", "者加分", "更佳", "优先考虑", "将被优先录用", "是加分项", "", "者优先考虑"]),
}
NAMING_BEFORE = {"学历要求": {"学历要求", "学历：", "学历不低于"}, "专业要求": {"专业要求", "专业：", "专业为", "所学专业为"},
                 "工作年限要求": {"工作经验", "工作年限", "相关工作经验", "开发经验"},
                 "编程语言": set(CUES["编程语言"][0]), "加分项": {"加分项：", "加分："}}
DISTRACTORS = ["公司成立于{y}年", "团队规模{n}人", "薪资{n}k-{m}k", "十三薪", "办公地点位于{city}", "提供六险一金",
               "带薪年假{k}天", "每年组织{k}次团建", "团队负责{domain}系统的研发", "产品日活用户超过{n}万",
               "弹性工作制", "总部位于{city}", "入职即签{k}年合同", "我们正在建设{domain}平台", "年终奖{k}个月",
               "业务覆盖{n}个国家", "{domain}团队诚聘", "周末双休"]
CITIES = ["北京海淀区", "上海浦东新区", "深圳南山区", "杭州余杭区", "成都高新区", "广州天河区", "南京江宁区", "武汉光谷"]
HEADERS = ["", "", "岗位要求：", "任职要求：", "【任职资格】", "职位要求：", "我们希望你：", "【岗位职责与要求】"]
JOINERS = ["，", "；", "。", "\n"]
LIST_SEPS = ["、", "/", "和", "或", "以及"]


def split_of(item) -> str:
    """'in' or 'heldout', stable across runs and Python versions (crc32 of the item's text)."""
    return "heldout" if zlib.crc32(repr(item).encode("utf-8")) % 100 < HELDOUT_SHARE else "in"


def _made_up_languages() -> list[str]:
    rng = random.Random("languages")
    names = set()
    while len(names) < 600:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        names.add(word + rng.choice(LANG_SUFFIXES))
    return sorted(names - set(LANGUAGES))


@lru_cache(maxsize=None)
def value_pools() -> dict[str, dict[str, list[str]]]:
    """Every field's values, split into 'in' and 'heldout' (disjoint)."""
    pools = {
        "学历要求": [q + d for q in DEGREE_QUALIFIERS for d in DEGREES],
        "专业要求": [s + x for s in MAJOR_STEMS for x in MAJOR_SUFFIXES] + MAJOR_PLAIN
        + [a + b + "工程" for a in MAJOR_STEMS[:20] for b in MAJOR_STEMS[:20] if a != b],
        "工作年限要求": sorted({f.format(n=n, c=CN_NUMBERS[n - 1], a=n, b=n + d) for f in YEAR_FORMS
                          for n in range(1, 11) for d in (1, 2, 3, 5)}) + YEAR_PLAIN,
        "编程语言": LANGUAGES + _made_up_languages(),
        "加分项": [d + k for d in PLUS_DOMAINS for k in PLUS_KINDS]
        + [f.format(x=c) for f in PLUS_OTHER for c in COMPETITIONS] + SOFT_SKILLS + INTERNSHIPS,
    }
    out = {}
    for fld, values in pools.items():
        values = list(dict.fromkeys(values))
        out[fld] = {"in": [v for v in values if split_of(v) == "in"],
                    "heldout": [v for v in values if split_of(v) == "heldout"]}
    return out


@lru_cache(maxsize=None)
def cue_pools() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Every field's (before, after) clause phrasings that name the field, split like the values."""
    out = {}
    for fld, (befores, afters) in CUES.items():
        pairs = [(b, a) for b in befores for a in afters if _names_field(fld, b, a)]
        out[fld] = {"in": [p for p in pairs if split_of((fld, p)) == "in"],
                    "heldout": [p for p in pairs if split_of((fld, p)) == "heldout"]}
    return out


def _names_field(fld: str, before: str, after: str) -> bool:
    if fld == "加分项":  # a plus is recognised by its cue (优先, 加分 …), never by its value alone
        return bool(after) or before in NAMING_BEFORE[fld]
    if fld in ("学历要求", "工作年限要求"):  # the value itself says what it is (本科, 3年以上)
        return True
    return bool(after) or before in NAMING_BEFORE[fld]


def _clause(rng: random.Random, fld: str, split: str) -> tuple[str, list[str]]:
    pool = value_pools()[fld][split]
    k = 2 if fld in ("专业要求", "编程语言", "加分项") and rng.random() < 0.35 else 1
    values = rng.sample(pool, k)
    if fld == "编程语言":  # casing varies as in real postings; the label is the span as written
        values = [v.capitalize() if rng.random() < 0.25 else v.upper() if rng.random() < 0.1 else v for v in values]
    before, after = rng.choice(cue_pools()[fld][split])
    return before + rng.choice(LIST_SEPS).join(values) + after, values


def _distractor(rng: random.Random, split: str) -> str:
    pool = [d for d in DISTRACTORS if split_of(d) == split] or DISTRACTORS
    n = rng.randrange(2, 90)
    return rng.choice(pool).format(y=rng.randrange(1990, 2024), n=n, m=n + rng.randrange(5, 30), k=rng.randrange(2, 16),
                                   city=rng.choice(CITIES), domain=rng.choice(PLUS_DOMAINS))


def posting(rng: random.Random, split: str = "in") -> tuple[str, dict]:
    """One posting text and its gold labels; `split` is 'in' or 'heldout'."""
    clauses, gold = requirement_clauses(rng, lambda fld: _clause(rng, fld, split))
    clauses += [_distractor(rng, split) for _ in range(rng.randrange(3))]
    rng.shuffle(clauses)
    if clauses and rng.random() < 0.25:
        clauses = [f"{i}、{c}" for i, c in enumerate(clauses, 1)]
    body = rng.choice(JOINERS).join(clauses) + ("。" if clauses else "")
    return rng.choice(HEADERS) + body, gold


def generate(n: int, seed: int = 0, split: str = "in", prefix: str = "jd") -> Iterator[tuple[dict, dict]]:
    """Yield n ({"id", "text"}, {"id", "gold"}) pairs; the same seed gives the same corpus."""
    if split not in ("in", "heldout"):
        raise ValueError(f"split must be in or heldout, not {split!r}")
    rng = random.Random(f"compose:{seed}:{split}")
    for i in range(n):
        text, gold = posting(rng, split)
        rid = f"{prefix}-{i:07d}"
        yield {"id": rid, "text": text}, {"id": rid, "gold": gold}
