"""Training examples: prompt tokens (no loss) + target tokens and EOS (loss), from either the seed's
{context, target} lines or (corpus, gold, task) rendered exactly as `extractor run` renders prompts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extractor.store.corpus import CorpusReader
from extractor.errors import InputError
from extractor.tasks.prompting import PromptBuilder
from extractor.scoring.join import iter_gold
from extractor.store.writers import iter_rows

IGNORE = -100


@dataclass
class Example:
    id: str
    prompt: str
    target: str


def seed_examples(path: Path) -> list[Example]:
    out = []
    for line, row in iter_rows(path):
        if not isinstance(row.get("context"), str) or not isinstance(row.get("target"), str):
            raise InputError(f"{path}:{line}: expected {{context, target}} strings; "
                             "or pass --gold and --task to train on a corpus with gold labels")
        out.append(Example(str(row.get("id", line)), row["context"], row["target"]))
    return out


def task_examples(corpus: Path, gold: Path, task, tokenizer, few_shot: int | None = None
                  ) -> tuple[list[Example], list[dict], dict]:
    """Examples plus the corpus records and gold objects (the F1 evaluation needs them)."""
    builder = PromptBuilder(task, tokenizer, few_shot)
    golds = {g.id: g.obj for g in iter_gold(gold)}
    records, examples = [], []
    for batch in CorpusReader(corpus, task.spec.input_fields):
        for rec in batch:
            if rec["id"] not in golds:
                raise InputError(f"{corpus}:{rec['line']}: record {rec['id']} has no gold label in {gold}")
            records.append(rec)
            examples.append(Example(rec["id"], builder.build(rec["values"]), task.format_output(golds[rec["id"]])))
    return examples, records, golds


def encode(example: Example, tokenizer, max_source: int, max_target: int) -> dict:
    """input_ids and labels: prompt positions are IGNORE so the loss covers the target only."""
    bos = tokenizer.bos_token
    special = not (bos and example.prompt.startswith(bos))
    prompt = tokenizer(example.prompt, add_special_tokens=special)["input_ids"][-max_source:]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"][: max_target - 1]
    target = target + [tokenizer.eos_token_id]
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target}


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right padding: positions stay 0..n-1 without passing position ids."""
    import torch
    width = max(len(b["input_ids"]) for b in batch)
    ids = [b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]
    labels = [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
    mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
