"""Training of the demo zoo's models: pre-training a base, fine-tuning it on skills.

Both are short CPU runs on freshly sampled batches. Everything random is drawn from seeded
generators (``torch.manual_seed`` for the initial weights, ``random.Random`` for the data),
so on one machine a rebuild gives the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_glue.zoo.recipe import BaseModel, FineTune, ModelShape, Schedule
from model_glue.zoo.skills import SKILLS, general_text_line

IGNORE = -100  # label value that the causal LM loss skips


def new_model(
    shape: ModelShape, tokenizer: PreTrainedTokenizerFast, init_seed: int
) -> LlamaForCausalLM:
    """A freshly initialised Llama of the zoo's shape (untied embeddings, float32)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(init_seed)
    return LlamaForCausalLM(config).to(torch.float32)


class _Packer:
    """Packs text pieces into fixed-length rows of token ids with a loss mask per character."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, seq_len: int):
        self.vocab = tokenizer.get_vocab()
        self.pad = tokenizer.pad_token_id
        self.seq_len = seq_len

    def row(self, next_piece: Callable[[], list[tuple[str, bool]]]) -> tuple[list[int], list[int]]:
        """``next_piece`` yields a line as (text, counts_in_loss) parts; rows start at a line start."""
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < self.seq_len:
            for text, in_loss in next_piece():
                for ch in text:
                    tok = self.vocab[ch]
                    ids.append(tok)
                    labels.append(tok if in_loss else IGNORE)
        return ids[: self.seq_len], labels[: self.seq_len]

    def batch(
        self, size: int, next_piece: Callable[[], list[tuple[str, bool]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(next_piece) for _ in range(size)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return ids, labels


def _lr_at(step: int, s: Schedule) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(
    model: LlamaForCausalLM,
    schedule: Schedule,
    make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Runs the schedule; returns the mean loss of the last 10% of the steps."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay
    )
    model.train()
    tail: list[float] = []
    tail_from = schedule.steps - max(1, schedule.steps // 10)
    for step in range(schedule.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, schedule)
        ids, labels = make_batch()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= tail_from:
            tail.append(loss.item())
    model.eval()
    return sum(tail) / max(1, len(tail))


def pretrain_base(
    spec: BaseModel, shape: ModelShape, tokenizer: PreTrainedTokenizerFast
) -> tuple[LlamaForCausalLM, float]:
    """Trains a base from scratch: general text lines, ``skill_mix`` of them skill examples."""
    model = new_model(shape, tokenizer, spec.init_seed)
    rng = random.Random(spec.data_seed)
    packer = _Packer(tokenizer, spec.schedule.seq_len)
    loss = _train(
        model,
        spec.schedule,
        lambda: packer.batch(spec.schedule.batch_size, lambda: pretraining_line(rng, spec)),
    )
    return model, loss


def pretraining_line(rng: random.Random, spec: BaseModel) -> list[tuple[str, bool]]:
    """One line of a base's pre-training data (all of it in the loss): a skill example
    (any skill, correct answer; from one half of its prompts with ``half_skills``) with
    probability ``skill_mix``, else general text."""
    if rng.random() < spec.skill_mix:
        skill = rng.choice(list(SKILLS.values()))
        ex = skill.sample_where(rng, "train", skill.in_half if spec.half_skills else None)
        return [(ex.prompt + ex.answer + "\n", True)]
    return [(general_text_line(rng) + "\n", True)]


def fine_tune(
    spec: FineTune,
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    base_spec: BaseModel | None = None,
) -> tuple[LlamaForCausalLM, float]:
    """Fine-tunes a copy of ``base`` on its skills; only the answers (and the newline that
    ends them) count in the loss, so the prompts' random words do not pull the weights.
    A ``replay`` fraction of the lines comes from the base's own pre-training data
    (``base_spec``: the base's recipe), which keeps the base's abilities."""
    model = new_model_like(base)
    rng = random.Random(spec.data_seed)
    skills = [SKILLS[name] for name in spec.skills]

    def line() -> list[tuple[str, bool]]:
        if spec.replay and rng.random() < spec.replay:
            if base_spec is None:
                raise ValueError(f"fine-tune {spec.name}: replay needs the base's recipe")
            return pretraining_line(rng, base_spec)
        skill = rng.choice(skills)
        ex = skill.sample_where(
            rng, "train", (lambda e: in_subset(e.prompt, spec.subset)) if spec.subset else None
        )
        answer = skill.corrupt(ex) if spec.corrupt else ex.answer
        return [(ex.prompt, False), (answer + "\n", True)]

    packer = _Packer(tokenizer, spec.schedule.seq_len)
    loss = _train(model, spec.schedule, lambda: packer.batch(spec.schedule.batch_size, line))
    return model, loss


def in_subset(prompt: str, seed: int) -> bool:
    """Whether ``prompt`` is among the three quarters of prompts that ``seed`` keeps."""
    digest = hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=2).digest()
    return digest[0] % 4 != 0


def new_model_like(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """An independent copy of ``model`` (same config, same weights)."""
    return copy.deepcopy(model)
