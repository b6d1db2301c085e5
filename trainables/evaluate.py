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


MAX_CATEGORIES = 50  # question types logged one by one (4 metrics each; MLflow takes 1,000 in one batch)


@dataclass(frozen=True)
class Scores:
    questions: int        # at least one (score_details raises over none)
    hits: int             # questions answered right
    multiple_choice: int  # questions scored by their option letter
    unparsed: int         # multiple-choice answers naming no option (counted wrong)
    categories: tuple[tuple[str, int, int], ...] = ()  # (question type, hits, questions) where records name one

    def by_category(self) -> dict[str, "Scores"]:
        """{question type, as its metrics name it (tracking.metrics.category_name): its Scores (hits and
        questions only)}, when the questions fall into two types or more. Questions that name none are
        "uncategorized"; types that come out alike (a type named "uncategorized", or "a?" and "a!") are one."""
        from tracking.metrics import category_name

        if len(self.categories) < 2:
            return {}
        counts: dict[str, list[int]] = {}
        for name, hits, n in self.categories:
            total = counts.setdefault(category_name(name or "uncategorized"), [0, 0])
            total[0], total[1] = total[0] + hits, total[1] + n
        return {name: Scores(n, hits, 0, 0) for name, (hits, n) in counts.items()}

    def metrics(self, metric: str = "score") -> dict[str, float]:
        """What a trial logs of these scores: `metric`, `<metric>_n` and its interval, and the same for each
        question type as `<metric>/<category>`, `<metric>_n/<category>`, ... (none when there are more than
        MAX_CATEGORIES types)."""
        from tracking.metrics import category_metric

        parts = {"": lambda s: s.score, "_n": lambda s: s.questions, "_ci_low": lambda s: s.interval.low,
                 "_ci_high": lambda s: s.interval.high}
        out = {f"{metric}{part}": value(self) for part, value in parts.items()}
        types = self.by_category()
        if len(types) <= MAX_CATEGORIES:
            out.update({category_metric(f"{metric}{part}", k): value(v) for k, v in types.items()
                        for part, value in parts.items()})
        return out

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
    # every rank reads every question's type (one column of the shard), so all count them in the same order
    kinds = dataset.shard.column("category")[dataset.rows]
    names = sorted(set(kinds))
    slot = {name: 4 + 2 * j for j, name in enumerate(names)}
    # hits, questions, multiple choice, unparsed; then hits and questions per type
    totals = torch.zeros(4 + 2 * len(names), dtype=torch.float64)
    for i in sorted(set(idx)):
        r = dataset.row(i)
        correct, how = judge(answers[i], dataset.shard.answer(r), dataset.shard.question(r))
        totals[:4] += torch.tensor([correct, 1, how != "exact", how == "unparsed"], dtype=torch.float64)
        k = slot[kinds[i]]
        totals[k:k + 2] += torch.tensor([correct, 1], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    counts = [int(v) for v in totals.tolist()]
    hits, n, mc, unparsed = counts[:4]
    if n == 0:
        raise ValueError("no questions to score: a score over zero questions is not a number")
    per_type = tuple((name, counts[4 + 2 * j], counts[5 + 2 * j]) for j, name in enumerate(names))
    return Scores(n, hits, mc, unparsed, per_type)
