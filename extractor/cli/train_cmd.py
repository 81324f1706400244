"""`extractor train`: fine-tune (full, LoRA, P-tuning, prefix) with F1-scored checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys

import click

from extractor.cli.options import complete_task_names, tasks_dir_option


@click.command()
@click.option("--model", required=True, type=click.Path(file_okay=False),
              help="Base model folder, or a hub id ORG/NAME[@revision] in the local Hugging Face cache.")
@click.option("--method", type=click.Choice(["lora", "ptuning", "prefix", "full"]), default="lora", show_default=True)
@click.option("--train", "train_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="{context, target} JSONL, or a corpus with --gold and --task.")
@click.option("--gold", type=click.Path(exists=True, dir_okay=False), default=None, help="Gold labels of --train.")
@click.option("--dev", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dev set (same kinds as --train).")
@click.option("--dev-gold", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--task", "task_name", default=None, help="Task: renders corpus prompts and scores dev F1.",
              shell_complete=complete_task_names)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for checkpoints.")
@click.option("--max-source-len", type=int, default=512, show_default=True)
@click.option("--max-target-len", type=int, default=256, show_default=True)
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--lora-target", "lora_targets", multiple=True, default=("q_proj", "v_proj"), show_default=True)
@click.option("--virtual-tokens", type=int, default=16, show_default=True, help="P-tuning virtual tokens.")
@click.option("--encoder-hidden", type=int, default=128, show_default=True, help="P-tuning encoder size.")
@click.option("--prefix-len", type=int, default=16, show_default=True, help="Prefix-tuning length.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warmup fraction of the steps.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Overrides --epochs.")
@click.option("--max-seconds", type=float, default=None, help="Stop (with a checkpoint) after this long.")
@click.option("--target-f1", type=float, default=None, help="Stop once dev micro F1 reaches this.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--logging-steps", type=int, default=10, show_default=True)
@click.option("--save-steps", type=int, default=100, show_default=True)
@click.option("--eval-limit", type=int, default=200, show_default=True, help="Dev records scored for F1.")
@click.option("--eval-max-new-tokens", type=int, default=None)
@click.option("--constrained-eval", is_flag=True, help="Score dev F1 with schema-constrained decoding.")
@click.option("--few-shot", type=click.IntRange(min=0), default=None,
              help="Use only the first N of the task's few-shot examples in prompts (default: all, as run).")
@click.option("--best-by", type=click.Choice(["f1", "loss"]), default="f1", show_default=True)
@click.option("--merge-lora", is_flag=True, help="Save `best` with LoRA merged into the base weights.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--processes", type=int, default=1, show_default=True,
              help="Data-parallel processes on this host (re-launched with torchrun; gloo on CPU).")
@click.option("-q", "--quiet", is_flag=True, help="No step lines, and no libraries' warnings (transformers, "
                                                  "matplotlib).")
@tasks_dir_option
def train(model, method, train_path, gold, dev, dev_gold, task_name, out, max_source_len, max_target_len, lora_r,
          lora_alpha, lora_dropout, lora_targets, virtual_tokens, encoder_hidden, prefix_len, batch_size, grad_accum,
          lr, weight_decay, warmup, epochs, max_steps, max_seconds, target_f1, precision, gradient_checkpointing,
          seed, logging_steps, save_steps, eval_limit, eval_max_new_tokens, constrained_eval, few_shot, best_by, merge_lora,
          resume, processes, quiet, tasks_dirs):
    """Fine-tune MODEL; every --save-steps, score dev loss and the task's F1 and keep the best checkpoint.

    \b
    Examples:
      extractor train --model ./base --method lora --train train.jsonl --dev dev.jsonl --task spo --out runs/lora
      extractor train --model ./base --method full --train corpus.jsonl --gold gold.jsonl \\
          --dev dev.jsonl --dev-gold dev_gold.jsonl --task jd_requirements --out runs/full --processes 2
    """
    _check_inputs(train_path, gold, dev, dev_gold, task_name, tasks_dirs)
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        _relaunch(processes)
        return
    if quiet:
        _silence_libraries()
    from extractor.hub import resolve
    from extractor.training.config import TrainConfig
    from extractor.training.loop import Trainer
    model, source = resolve(model)
    hub = {"hub": source.as_dict()} if source else {}
    cfg = TrainConfig(model=model, out=out, method=method, task=task_name, train=train_path, gold=gold, dev=dev,
                      dev_gold=dev_gold, max_source_len=max_source_len, max_target_len=max_target_len, lora_r=lora_r,
                      lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=tuple(lora_targets),
                      virtual_tokens=virtual_tokens, encoder_hidden=encoder_hidden, prefix_len=prefix_len,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      epochs=epochs, max_steps=max_steps, max_seconds=max_seconds, target_f1=target_f1,
                      precision=precision, grad_checkpointing=gradient_checkpointing, seed=seed,
                      logging_steps=logging_steps, save_steps=save_steps, eval_limit=eval_limit,
                      eval_max_new_tokens=eval_max_new_tokens, constrained_eval=constrained_eval, few_shot=few_shot, best_by=best_by,
                      merge_lora=merge_lora, resume=resume, quiet=quiet, extra={"tasks_dirs": tasks_dirs, **hub})
    summary = Trainer(cfg, log=lambda m: click.echo(m, err=True)).train()
    best = summary.get("best") or {}
    if best.get("checkpoint") is None:
        kept = f"no best checkpoint (no --dev to score checkpoints by); the last one is in {out}"
    else:
        kept = f"best: {best.get('checkpoint')} ({best.get('by')} {best.get('score')})"
    click.echo(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s on {summary['processes']} process(es); "
               f"{kept}", err=True)


def _check_inputs(train_path, gold, dev, dev_gold, task_name, tasks_dirs) -> None:
    """What fails without the model fails before it loads: the task, --gold without --task, and a --train or
    --dev given without its gold that holds no {context, target} lines (a corpus whose --gold was left out)."""
    from pathlib import Path
    from extractor.errors import InputError
    from extractor.training.data import seed_examples
    if task_name:
        from extractor.tasks.task import load_task
        load_task(task_name, tuple(tasks_dirs))
    elif gold or dev_gold:
        raise InputError("--gold needs --task: the task's prompt renders the corpus")
    for path, its_gold in ((train_path, gold), (dev, dev_gold)):
        if path and not its_gold:
            seed_examples(Path(path))


def _silence_libraries() -> None:
    """--quiet: the libraries' own warnings (transformers' FutureWarnings, matplotlib's legend warning) and
    info logs off; the command's errors still reach stderr."""
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(matplotlib|transformers|peft|torch)")
    warnings.filterwarnings("ignore", message="No artists with labels found")  # raised at our call site
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _relaunch(processes: int) -> None:
    """Run the same command under torchrun with N processes (accelerate reads torchrun's environment)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--processes")]
    if "--processes" in sys.argv:
        i = sys.argv.index("--processes")
        args = sys.argv[1:i] + sys.argv[i + 2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "extractor", *args]
    raise SystemExit(subprocess.call(cmd))
