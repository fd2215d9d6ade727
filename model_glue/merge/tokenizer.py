"""Merged vocabularies: a merge's output tokenizer, and which row of each input every
output token takes. The semantics are mergekit 0.1.5's (``tokenizer_source`` and
``tokenizer: {source, pad_to_multiple_of}``; ``mergekit/tokenizer/build.py`` and
``embed.py``).

The *reference* is the base, else the first model (mergekit's ``base_model``, else its
first referenced model); its tokenizer is stripped of tokens at ids >= its config's
``vocab_size``. The output vocabulary (``source``):

- ``union``: the reference's tokens, then the tokens of the other inputs that it lacks,
  inputs in order: first their ordinary (model) tokens, then their added tokens (with
  their own flags: special, normalized...), each input's by id;
- ``base``: the reference's vocabulary;
- an input's name: that input's tokenizer, as it is.

How rows are filled (:meth:`MergedVocabulary.permute`, mergekit's ``PermutedVocabulary``):
every input keeps its own row for each token it has (its tokenizer's id, if below its
``vocab_size``). For a token that some inputs lack, those inputs all get one same row:

1. the row of the only input that has the token;
2. else the *preferred* input's row when it has the token (mergekit's base model, when
   the base is one of the merged tensors: the base of task-vector methods, or a linear
   merge's ``base_model``);
3. else the mean of the rows of the inputs that have it;
4. zeros when no input has it.

The merge method then runs over these rows like over any tensor. So a token only one
input has keeps that input's row in a linear merge (weights normalised), and with a base,
where the base also gets that row, its task vectors are zero and the base's (= the
owner's) row comes out. Rows past the last token (``pad_to_multiple_of``) are, in each
input, the mean of its token rows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model_glue.checkpoint import TOKENIZER_FILES
from model_glue.merge.params import MergeConfigError

if TYPE_CHECKING:
    from model_glue.checkpoint import Checkpoint
    from model_glue.merge.spec import MergeSpec

SOURCES = ("union", "base")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """A ``config.json``'s vocabulary size (``vocab_size``, or ``text_config``'s)."""
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def pipeline_tokenizer(
    setting: str | None, inputs: Sequence[str], vocab_sizes: Sequence[int | None] | None = None
) -> str | None:
    """The ``MergeSpec.tokenizer`` of a pipeline merge of ``inputs`` (names) for the run's
    ``merge.tokenizer`` ``setting``; the merge stage and the search's trials both ask here.
    A model's name the merge does not hold means ``union``; ``union`` over inputs of one
    configured vocabulary size (``vocab_sizes``, when known) means None: rows by index and
    the reference's tokenizer files as they are (inputs without tokenizer files merge)."""
    if setting not in (None, "union", "base") and setting not in inputs:
        setting = "union"
    if setting == "union" and vocab_sizes is not None and len(set(vocab_sizes)) == 1:
        return None
    return setting


def config_vocab_sizes(uris: Sequence[str]) -> list[int | None]:
    """Each checkpoint's configured vocabulary size (its ``config.json`` only)."""
    from model_glue.checkpoint import Checkpoint

    return [vocab_size(Checkpoint(u).config) for u in uris]


@dataclass(frozen=True)
class MergedVocabulary:
    """The output vocabulary of a merge and each input's rows for it.

    ``permutations[i][t]``: the row of input ``i`` (inputs in ``names`` order, the base
    first) holding output token ``t``, or -1 where input ``i`` lacks the token.
    ``rows``: output rows, ``len(tokens)`` rounded up to ``pad_to_multiple_of``.
    ``input_rows``: each input's vocabulary size (its config's, else its tokenizer's).
    ``files_from``: the input whose tokenizer files are the output's unchanged (None: the
    output's are written from ``tokenizer``, a transformers tokenizer).
    """

    source: str
    names: tuple[str, ...]
    tokens: tuple[str, ...]
    permutations: tuple[tuple[int, ...], ...]
    rows: int
    input_rows: tuple[int, ...]
    reference: int
    preferred: int | None
    files_from: int | None
    tokenizer: Any = field(default=None, compare=False, repr=False)

    @property
    def identity(self) -> bool:
        """Every input already has exactly these tokens at these rows: nothing to permute."""
        n = len(self.tokens)
        return self.rows == n and all(
            size == n and perm == tuple(range(n))
            for size, perm in zip(self.input_rows, self.permutations, strict=True)
        )

    def describe(self) -> str:
        """One line for the model card: which vocabulary, its size, how rows were filled."""
        what = {
            "union": "union of the inputs' tokenizers",
            "base": f"{self.names[self.reference]}'s vocabulary (tokenizer: base)",
        }.get(self.source, f"{self.source}'s vocabulary")
        have = ", ".join(
            f"{name}: {sum(p >= 0 for p in perm)}"
            for name, perm in zip(self.names, self.permutations, strict=True)
        )
        pad = f", padded to {self.rows} rows" if self.rows > len(self.tokens) else ""
        then = f"else {self.names[self.preferred]}'s, " if self.preferred is not None else ""
        return (
            f"{what}: {len(self.tokens)} tokens{pad} (of which each input has {have}); "
            f"a token an input lacks takes its only owner's row, {then}else the owners' mean"
        )

    def permute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each input's vocabulary tensor (rows first, inputs in ``names`` order) with its
        rows gathered into the output vocabulary; rows it lacks filled as the module says."""
        if len(tensors) != len(self.permutations):
            raise ValueError(f"expected {len(self.permutations)} tensors, got {len(tensors)}")
        n = len(self.tokens)
        perm = torch.tensor(self.permutations, dtype=torch.long).reshape(len(tensors), n)
        present = perm >= 0
        for i, (t, p) in enumerate(zip(tensors, perm, strict=True)):
            if p.numel() and int(p.max()) >= t.shape[0]:
                raise ValueError(
                    f"{self.names[i]}: token row {int(p.max())} but the tensor has {t.shape[0]} rows"
                )
        missing = torch.nonzero(~present.all(dim=0)).flatten()
        fill = _fill_rows(tensors, perm[:, missing], present[:, missing], self.preferred)
        out = []
        for t, p, has in zip(tensors, perm, present, strict=True):
            rows = t.new_zeros((self.rows, *t.shape[1:]))
            rows[:n][has] = t[p[has]]
            lacks = ~has[missing]
            rows[missing[lacks]] = fill[lacks].to(t.dtype)
            if self.rows > n:
                # as mergekit (after https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
                rows[n:] = rows[:n].mean(dim=0)
            out.append(rows)
        return out

    def save(self, out_dir: str | Path) -> None:
        """Write the output tokenizer's files into ``out_dir``."""
        self.tokenizer.save_pretrained(str(out_dir))


def _fill_rows(
    tensors: Sequence[torch.Tensor],
    perm: torch.Tensor,
    present: torch.Tensor,
    preferred: int | None,
) -> torch.Tensor:
    """The shared row of each token (columns of ``perm``) for the inputs that lack it:
    its only owner's, else ``preferred``'s if it has it, else the owners' mean (summed in
    input order, then divided, as mergekit), else zeros."""
    k = perm.shape[1]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    fill = tensors[0].new_zeros((k, *tensors[0].shape[1:]), dtype=dtype)
    if not k:
        return fill
    count = present.sum(dim=0)
    donor = torch.where(count == 1, present.int().argmax(dim=0), -1)
    if preferred is not None:
        donor = torch.where((count > 1) & present[preferred], preferred, donor)
    mean = (donor < 0) & (count > 0)
    for i, t in enumerate(tensors):
        mine = donor == i
        fill[mine] = t[perm[i, mine]].to(dtype)
        add = mean & present[i]
        fill[add] = fill[add] + t[perm[i, add]].to(dtype)
    fill[mean] = fill[mean] / count[mean].to(dtype).reshape(-1, *[1] * (fill.dim() - 1))
    return fill


# --- building a vocabulary ----------------------------------------------------------------


class VocabularyError(MergeConfigError):
    """The inputs' tokenizers cannot give the requested vocabulary."""


def has_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and any((Path(directory) / f).exists() for f in _VOCAB_FILES)


def load_tokenizer(directory: str | Path):
    """The transformers tokenizer of a local directory (never remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def build_vocabulary(
    tokenizer_dirs: Sequence[str | Path | None],
    vocab_sizes: Sequence[int | None],
    names: Sequence[str],
    *,
    source: str = "union",
    reference: int = 0,
    preferred: int | None = None,
    pad_to_multiple_of: int | None = None,
    chat_template: str | None = None,
) -> MergedVocabulary:
    """The merged vocabulary of inputs with these tokenizers (local directories, in input
    order; None: no tokenizer, assumed to be the reference's as mergekit does) and these
    vocabulary sizes (their configs'; None: their tokenizers').

    ``source``: ``union``, ``base`` or one of ``names``; ``reference``: index of the base
    (else the first model); ``preferred``: index of the input whose row fills a token
    several, not all, inputs have (None: their mean); ``chat_template``: None (the output
    tokenizer's), ``auto`` (the most common among the inputs), an input's name (its
    template) or a Jinja template.
    """
    names = tuple(names)
    if source not in SOURCES and source not in names:
        raise VocabularyError(
            f"tokenizer {source!r} names no input (use union, base or {list(names)})"
        )
    for i in {reference, names.index(source) if source in names else reference}:
        if not has_tokenizer(tokenizer_dirs[i]):
            raise VocabularyError(f"{names[i]} has no tokenizer files (tokenizer: {source})")
    ref_tok = load_tokenizer(tokenizer_dirs[reference])
    stripped = _strip(ref_tok, vocab_sizes[reference] or len(ref_tok), names[reference])
    toks = [
        stripped if i == reference else (load_tokenizer(d) if has_tokenizer(d) else None)
        for i, d in enumerate(tokenizer_dirs)
    ]
    toks = [tok or stripped for tok in toks]  # no tokenizer: the reference's (as mergekit)
    sizes = tuple(size or len(tok.get_vocab()) for size, tok in zip(vocab_sizes, toks, strict=True))
    order = [reference] + [i for i in range(len(toks)) if i != reference]
    ordered = [(toks[i], sizes[i]) for i in order]
    out, files_from = _output_tokenizer(source, reference, names, tokenizer_dirs, ordered, ref_tok)
    template = _chat_template(chat_template, names, tokenizer_dirs)
    if template is not None:
        out.chat_template = template
        files_from = None
    tokens = _tokens_by_id(out, source)
    perms = tuple(
        _permutation(tokens, tok.get_vocab(), size) for tok, size in zip(toks, sizes, strict=True)
    )
    rows = len(tokens)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    return MergedVocabulary(
        source, names, tokens, perms, rows, sizes, reference, preferred, files_from, out
    )


def _output_tokenizer(
    source: str,
    reference: int,
    names: Sequence[str],
    dirs: Sequence[str | Path | None],
    ordered: Sequence[tuple[Any, int]],
    ref_tok,
) -> tuple[Any, int | None]:
    """(the output tokenizer, the input whose tokenizer files it is unchanged, or None).
    ``ordered``: the inputs' (tokenizer, vocabulary size), the reference's (stripped)
    first; ``ref_tok``: the reference's tokenizer before stripping."""
    stripped = ordered[0][0]
    unchanged = reference if stripped is ref_tok else None
    if source == "base":
        return stripped, unchanged
    if source == "union":
        out = _union(stripped, ordered)
        return out, (unchanged if len(out) == len(stripped) else None)
    named = names.index(source)
    return load_tokenizer(dirs[named]), named


def _strip(tokenizer, size: int, name: str):
    """``tokenizer`` without the tokens at ids >= ``size`` (a copy), ``tokenizer`` itself
    when it has none. mergekit cuts BPE vocabularies only; added tokens, WordLevel and
    WordPiece vocabularies are cut here too (Unigram ones are refused)."""
    from tokenizers import Tokenizer

    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    in_model = unused - {e["content"] for e in data["added_tokens"]}
    if in_model and model["type"] not in ("BPE", "WordLevel", "WordPiece"):
        raise VocabularyError(
            f"{name}: its tokenizer has {len(unused)} tokens at ids >= vocab_size {size}, and "
            f"a {model['type']} vocabulary cannot be cut"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for tok in in_model:
        model["vocab"].pop(tok, None)

    def keep(merge) -> bool:  # mergekit keeps merges that make an unused token: Rust panics
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in (*parts, "".join(parts)))

    if "merges" in model:
        model["merges"] = [m for m in model["merges"] if keep(m)]
    out = _copy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(data))  # as mergekit's get_stripped_tokenizer
    # Unlike mergekit, also forget them as special tokens, or saving and loading the
    # tokenizer would add them back (past the embedding rows, or with zero rows in a union).
    out.extra_special_tokens = [t for t in out.extra_special_tokens if str(t) not in unused]
    for attr in out.SPECIAL_TOKENS_ATTRIBUTES:
        if str(getattr(out, attr, None)) in unused:
            setattr(out, attr, None)
    return out


def _copy(tokenizer):
    """An independent copy of a transformers tokenizer (saved and reloaded, as mergekit)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return load_tokenizer(d)


def _union(reference, others: Sequence[tuple[Any, int]]):
    """mergekit's ``build_union_tokenizer``: a copy of ``reference`` plus, in order, the
    ordinary tokens of ``others`` it lacks, then all their added tokens (first seen wins)."""
    added: dict[str, Any] = {}
    ordinary: dict[str, None] = {}
    for tok, size in others:
        decoder = {i: a for i, a in sorted(tok.added_tokens_decoder.items()) if i < size}
        for info in decoder.values():
            added.setdefault(info.content, info)
        vocab = sorted((i, t) for t, i in tok.get_vocab().items() if i < size)
        for _, t in vocab:
            ordinary.setdefault(t)
    out = _copy(reference)
    have = reference.get_vocab()
    for t in ordinary:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _tokens_by_id(tokenizer, source: str) -> tuple[str, ...]:
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * len(vocab)
    for tok, idx in vocab.items():
        if idx >= len(tokens):
            raise VocabularyError(
                f"tokenizer {source!r}: token ids are not 0..{len(vocab) - 1} ({tok!r} is {idx})"
            )
        tokens[idx] = tok
    return tuple(tokens)


def _permutation(tokens: Sequence[str], vocab: Mapping[str, int], size: int) -> tuple[int, ...]:
    """Row of each output token in an input (-1: absent, or at a row past its ``size``)."""
    return tuple(
        idx if (idx := vocab.get(tok, -1)) < size else -1 for tok in tokens
    )  # mergekit raises KeyError later for the second case; such a token is absent here


def _chat_template(
    value: str | None, names: Sequence[str], dirs: Sequence[str | Path | None]
) -> str | None:
    """The template a ``chat_template`` setting names: an input's name (its template),
    ``auto`` (the most common among the inputs; None if none has one, as mergekit) or the
    template itself; None for None (the output tokenizer's stays)."""
    if value is None:
        return None
    if value in names:
        d = dirs[names.index(value)]
        template = _template_of(load_tokenizer(d)) if has_tokenizer(d) else None
        if not template:
            raise VocabularyError(f"chat_template: {value} has no chat template")
        return template
    if value == "auto":
        found = [_template_of(load_tokenizer(d)) for d in dirs if has_tokenizer(d)]
        found = [t.strip() for t in found if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return value


def _template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def check_chat_template(value: str | None, names: Sequence[str]) -> None:
    """A one-line error unless ``value`` is None, ``auto``, an input's name or a Jinja
    template (mergekit's built-in template names are not bundled)."""
    if value is None or value == "auto" or value in names:
        return
    if "{" not in value or len(value) < 20:
        raise MergeConfigError(
            f"chat_template {value!r}: give auto, an input's name or a Jinja template "
            "(mergekit's built-in template names are not bundled)"
        )


# --- from a spec and its checkpoints --------------------------------------------------------


@contextmanager
def local_tokenizer_dirs(checkpoints: Sequence[Checkpoint]) -> Iterator[list[Path | None]]:
    """Each checkpoint's directory of tokenizer files on this machine (remote ones are
    copied to a temporary directory); None for a checkpoint without tokenizer files."""
    tmp = Path(tempfile.mkdtemp(prefix="glue-tokenizers-"))
    try:
        out: list[Path | None] = []
        for i, ck in enumerate(checkpoints):
            if ck.is_local:
                out.append(Path(ck.root) if has_tokenizer(ck.root) else None)
                continue
            d = tmp / str(i)
            d.mkdir()
            copy_tokenizer_files(ck, d)
            out.append(d if has_tokenizer(d) else None)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer_files(ck: Checkpoint, out_dir: Path, names: Sequence[str] = TOKENIZER_FILES):
    """Copy the files ``names`` that ``ck`` has (any fsspec location) into ``out_dir``."""
    for name in names:
        path = ck.root.rstrip("/") + "/" + name
        if ck.fs.exists(path):
            with ck.fs.open(path, "rb") as f:
                (out_dir / name).write_bytes(f.read())


def spec_vocabulary(spec: MergeSpec, checkpoints: Sequence[Checkpoint]) -> MergedVocabulary | None:
    """The merged vocabulary ``spec.tokenizer`` asks for (None when it is not set), from
    the tokenizer files and configs of ``checkpoints`` (``spec.inputs()`` order)."""
    if spec.tokenizer is None:
        return None
    names = [name for name, _ in spec.inputs()]
    with local_tokenizer_dirs(checkpoints) as dirs:
        return build_vocabulary(
            dirs,
            [vocab_size(ck.config) for ck in checkpoints],
            names,
            source=spec.vocabulary_source(),
            reference=spec.tokenizer_index(),
            preferred=spec.fill_index(),
            pad_to_multiple_of=spec.pad_to_multiple_of,
            chat_template=spec.chat_template,
        )


# --- compatibility ----------------------------------------------------------------------------


def vocab_compatible(tokenizer_dirs: Sequence[str | Path]) -> str | None:
    """None when these tokenizers (local Hugging Face directories) agree on every token id
    they share, i.e. each vocabulary is a prefix of the longest one (a fine-tune that only
    appended tokens); else a one-line reason naming the first difference, e.g.
    ``token 17 is 'foo' in a but 'bar' in b`` (directories named by their folder).

    A ``union`` merge accepts any vocabularies (rows are matched by token, not by id); this
    is the stricter test of models whose embeddings row ``i`` mean the same token ``i``.
    """
    if not tokenizer_dirs:
        return None
    labels = [Path(d).name or str(d) for d in tokenizer_dirs]
    if len(set(labels)) != len(labels):
        labels = [str(d) for d in tokenizer_dirs]
    vocabs = {}
    for label, d in zip(labels, tokenizer_dirs, strict=True):
        if not has_tokenizer(d):
            return f"{label} has no tokenizer files"
        vocabs[label] = tokens_of(d)
    longest = max(vocabs, key=lambda k: len(vocabs[k]))
    for label, vocab in vocabs.items():
        if label == longest:
            continue
        if (why := first_difference({label: vocab, longest: vocabs[longest]})) is not None:
            return why
    return None


def tokens_of(directory: str | Path) -> list[str | None]:
    """A local tokenizer's tokens by id (None where an id has no token)."""
    return _ids_to_tokens(load_tokenizer(directory).get_vocab())


def first_difference(vocabs: Mapping[str, Sequence[str | None]]) -> str | None:
    """Where two vocabularies (tokens by id, by name) stop being one the prefix of the
    other: ``token 42 is '!' in a but '?' in b``; None when one extends the other."""
    (na, a), (nb, b) = sorted(vocabs.items())
    for idx, (ta, tb) in enumerate(zip(a, b, strict=False)):
        if ta != tb:
            return f"token {idx} is {ta!r} in {na} but {tb!r} in {nb}"
    return None


def vocab_families(
    vocabs: Mapping[str, Sequence[str | None]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Models whose vocabularies are each a prefix of one longest vocabulary form a family
    (a base and the fine-tunes that appended tokens to it). Returns (name -> its family's
    longest member, name -> why it is not in the main family), the main family being the
    one with the most members (ties: the longest vocabulary, then the name)."""
    order = sorted(vocabs, key=lambda n: (-len(vocabs[n]), n))
    heads: list[str] = []
    family: dict[str, str] = {}
    for name in order:
        head = next(
            (h for h in heads if first_difference({name: vocabs[name], h: vocabs[h]}) is None),
            None,
        )
        if head is None:
            heads.append(name)
            head = name
        family[name] = head
    sizes = {h: sum(1 for f in family.values() if f == h) for h in heads}
    main = max(heads, key=lambda h: (sizes[h], -heads.index(h)))
    why = {
        name: first_difference({name: vocabs[name], main: vocabs[main]})
        for name, head in family.items()
        if head != main
    }
    return family, why


def _ids_to_tokens(vocab: Mapping[str, int]) -> list[str | None]:
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for tok, idx in vocab.items():
        out[idx] = tok
    return out
