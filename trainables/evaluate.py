"""Greedy-decoding evaluation, 0-100, sharded over ranks (DESIGN.md, "Evaluation").

Short answers are scored by normalized exact match; a question that lists lettered
options is scored by the letter the answer picks, parsed as benchmarks write it
(trainables.answers); an answer that names no option clearly is wrong and counted as
`unparsed`, never guessed. Prompts stream from the split's shard through the same
loader as training (left-padded), so evaluation memory does not grow with the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tracking.intervals import wilson
from trainables.answers import judge
from trainables.data.loader import Collate, eval_indices, eval_loader


@dataclass(frozen=True)
class Scores:
    questions: int        # at least one (score_details raises over none)
    hits: int             # questions answered right
    multiple_choice: int  # questions scored by their option letter
    unparsed: int         # multiple-choice answers naming no option (counted wrong)

    @property
    def score(self) -> float:
        """0-100 over every question."""
        return 100.0 * self.hits / self.questions

    @property
    def interval(self):
        """The score's 95% Wilson interval (tracking.intervals.Interval, percent)."""
        return wilson(self.hits, self.questions)


@torch.no_grad()
def generate_answers(model, loader, tokenizer, max_new_tokens: int, device, synced: bool = False) -> dict[int, str]:
    """{dataset index: greedy answer} for every batch of `loader` (left-padded prompts). The same answers at
    any batch size: the attention mask hides the padding and generate derives position ids from it."""
    model.eval()
    dtype = next(model.parameters()).dtype
    answers: dict[int, str] = {}
    for batch in loader:
        index = batch.pop("index").tolist()
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced)
        new = out[:, batch["input_ids"].shape[1]:]
        answers.update(zip(index, (t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))))
    return answers


def score_details(model, dataset, collate: Collate, tokenizer, max_new_tokens: int, device, rank: int = 0,
                  world: int = 1, synced: bool = False, batch_size: int = 32, workers: int = 0) -> Scores:
    """Accuracy over all of `dataset` (a SplitDataset of prompts; each rank answers a strided share),
    with how many questions were multiple choice and how many of their answers named no option.
    The question (where options are listed) and the reference answer come from the shard."""
    idx = eval_indices(len(dataset), rank, world, synced)
    answers = generate_answers(model, eval_loader(dataset, idx, batch_size, collate, workers), tokenizer,
                               max_new_tokens, device, synced)
    totals = torch.zeros(4, dtype=torch.float64)  # hits, questions, multiple choice, unparsed
    for i in sorted(set(idx)):
        r = dataset.row(i)
        correct, how = judge(answers[i], dataset.shard.answer(r), dataset.shard.question(r))
        totals += torch.tensor([correct, 1, how != "exact", how == "unparsed"], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    hits, n, mc, unparsed = totals.tolist()
    if n == 0:
        raise ValueError("no questions to score: a score over zero questions is not a number")
    return Scores(int(n), int(hits), int(mc), int(unparsed))
