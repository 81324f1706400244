"""The training loss: causal LM cross-entropy on the target tokens only."""
from __future__ import annotations

from extractor.training.data import IGNORE


def target_loss(model, batch: dict, method: str):
    """Causal LM loss on target tokens. For full and LoRA training the vocabulary projection runs only
    from the first target position on (prompts are most of each sequence, and the loss ignores them)."""
    if method not in ("full", "lora"):  # prompt learning prepends virtual tokens: plain path
        return model(**batch).loss
    import torch.nn.functional as F
    labels = batch["labels"]
    first = int((labels != IGNORE).float().argmax(dim=1).min())  # earliest target position in the batch
    keep = max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=labels.shape[1] - keep).logits  # positions keep .. end
    targets = labels[:, keep + 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE)
