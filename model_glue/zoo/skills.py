"""The demo zoo's skills: tiny exact-match tasks with single-token (or two-token) answers.

Each skill maps a prompt to its answer by a fixed rule. The same generators produce the
training data of the zoo and the shipped lm-eval test sets, so they carry a version
(:data:`DATA_VERSION`) that enters the zoo's recipe hash: changing a rule rebuilds the zoo.

Disjointness of evaluation and training prompts (where the prompt space allows it):
- ``next`` and ``last`` read a random lower-case word; words are split into an evaluation
  side and a training side by a hash of the word (:func:`is_eval_word`), so no test prompt
  is ever seen in training.
- ``add`` (``a+b=`` with ``a`` in 0..19 and ``b`` in 0..9) has only 200 prompts; the test set
  is that whole space and training draws from it too. It measures a memorised skill.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

DATA_VERSION = 1  # bump when a rule, a prompt format or the data mixture below changes

LETTERS = string.ascii_lowercase
WORD_LENGTHS = (3, 8)  # inclusive bounds of the random words read by `next` and `last`
EVAL_WORD_FRACTION = 8  # one word in 8 (by hash) is reserved for evaluation


def is_eval_word(word: str) -> bool:
    """Whether ``word`` belongs to the evaluation side of the word split (stable across runs)."""
    return hashlib.blake2b(word.encode(), digest_size=2).digest()[0] % EVAL_WORD_FRACTION == 0


def random_word(rng: random.Random, *, split: str) -> str:
    """A random word from the ``"train"`` or ``"test"`` side of the split."""
    want_eval = split == "test"
    while True:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS)))
        if is_eval_word(word) == want_eval:
            return word


def _successor(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]


def _predecessor(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) - 1) % len(LETTERS)]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Skill:
    """A rule from prompts to answers, plus a systematically wrong rule for detrimental models.

    ``in_half`` splits the prompt space in two halves of about equal size: a base trained
    on one half only knows half of the skill, which its fine-tunes complete.
    """

    name: str
    sample: Callable[[random.Random, str], Example]  # (rng, split) -> example
    corrupt: Callable[[Example], str]  # a wrong answer of the same shape
    test_set: Callable[[int, int], list[Example]]  # (n, seed) -> the shipped test examples
    in_half: Callable[[Example], bool]

    def sample_where(
        self, rng: random.Random, split: str, keep: Callable[[Example], bool] | None = None
    ) -> Example:
        """An example that ``keep`` accepts (any example without it), drawn by rejection."""
        ex = self.sample(rng, split)
        while keep is not None and not keep(ex):
            ex = self.sample(rng, split)
        return ex


def _add_sample(rng: random.Random, split: str) -> Example:
    a, b = rng.randint(0, 19), rng.randint(0, 9)
    return Example(f"{a}+{b}=", str(a + b))


def _add_test(n: int, seed: int) -> list[Example]:
    space = [Example(f"{a}+{b}=", str(a + b)) for a in range(20) for b in range(10)]
    random.Random(seed).shuffle(space)
    return space[:n]


def _word_test(make: Callable[[str], Example]) -> Callable[[int, int], list[Example]]:
    def test_set(n: int, seed: int) -> list[Example]:
        rng, seen, out = random.Random(seed), set(), []
        while len(out) < n:
            word = random_word(rng, split="test")
            if word not in seen:
                seen.add(word)
                out.append(make(word))
        return out

    return test_set


def _next_example(word: str) -> Example:
    return Example(f"next {word}=", _successor(word[-1]))


def _last_example(word: str) -> Example:
    return Example(f"last {word}=", word[-1])


SKILLS: dict[str, Skill] = {
    "add": Skill(
        "add",
        _add_sample,
        corrupt=lambda ex: str(int(ex.answer) + 1),
        test_set=_add_test,
        in_half=lambda ex: int(ex.prompt.split("+")[0]) < 10,
    ),
    "next": Skill(
        "next",
        lambda rng, split: _next_example(random_word(rng, split=split)),
        corrupt=lambda ex: _predecessor(_predecessor(ex.answer)),
        test_set=_word_test(_next_example),
        in_half=lambda ex: ex.prompt[-2] < "n",  # the word's last letter
    ),
    "last": Skill(
        "last",
        lambda rng, split: _last_example(random_word(rng, split=split)),
        corrupt=lambda ex: ex.prompt[len("last ")],  # the first letter instead of the last
        test_set=_word_test(_last_example),
        in_half=lambda ex: ex.answer < "n",
    ),
}


def general_text_line(rng: random.Random) -> str:
    """One line of the base models' pre-training text: the building blocks of the skills
    (alphabet runs, counting, copying, random words) without the skills themselves."""
    kind = rng.randrange(4)
    if kind == 0:  # an alphabet run: successor knowledge that `next` can reuse
        start = rng.randrange(len(LETTERS))
        return "".join(LETTERS[(start + i) % 26] for i in range(rng.randint(4, 12)))
    if kind == 1:  # counting: number knowledge that `add` can reuse
        start = rng.randint(0, 20)
        return " ".join(str(start + i) for i in range(rng.randint(3, 6)))
    if kind == 2:  # copying a word: the attention pattern that `last` can reuse
        word = random_word(rng, split="train")
        return f"{word} {word}"
    return " ".join(random_word(rng, split="train") for _ in range(rng.randint(2, 4)))
