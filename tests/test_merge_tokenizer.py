"""Merged vocabularies (``tokenizer: union | base | <model>``) against mergekit 0.1.5.

Tiny float32 Llamas of 44 tokens: ``a`` appends a special ``<|im_start|>`` (one more,
distinct embedding and lm_head row), ``b`` appends an ordinary ``newtok``, ``d`` appends
``<|im_start|>`` too (so that token has two owners and the base lacks it), ``c`` is a plain
fine-tune. Both tools read the same mergekit YAML; tensors must agree within 1e-6 and the
output tokenizers token for token, id for id.

mergekit orders its models by iterating a ``set`` (``MergeConfiguration.referenced_models``),
so which of two fine-tunes' added tokens comes first varies with the process's hash seed;
the ``ordered_mergekit`` fixture pins it to the listing order, which is ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from model_glue.checkpoint import Checkpoint, LazyTensors
from model_glue.merge import (
    MergeConfigError,
    Merger,
    MergeSpec,
    ModelInput,
    load_merge_config,
    merge_in_memory,
    merge_to_directory,
)
from model_glue.merge.tokenizer import spec_vocabulary, vocab_compatible
from tests.factories import fine_tune, random_state, run_mergekit, save_llama

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit 0.1.5 not installed (pip install -e '.[dev]')"
)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IM, NEW = "<|im_start|>", "newtok"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"


def char_tokenizer(extra: tuple[str, ...] = (), scramble: bool = False):
    """44 tokens: <unk> <s> </s> and 41 characters (reversed with ``scramble``), then
    ``extra`` (special when written <|...|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(33 + i) for i in range(41)]
    if scramble:
        chars.reverse()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    for e in extra:
        if e.startswith("<|"):
            tok.add_special_tokens({"additional_special_tokens": [e]})
        else:
            tok.add_tokens([e])
    return tok


def with_new_row(sd: dict, seed: int) -> dict:
    """``sd`` with one more, random, embedding and lm_head row."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in (EMBED, HEAD):
        if k in sd:
            out[k] = torch.cat([sd[k], torch.randn(1, sd[k].shape[1], generator=g)])
    return out


def save(path: Path, sd: dict, tokenizer, *, tied: bool = False) -> Path:
    vocab = sd[EMBED].shape[0]
    if tied:
        from transformers import LlamaForCausalLM

        from tests.factories import merge_llama_config

        config = merge_llama_config(vocab)
        config.tie_word_embeddings = True
        model = LlamaForCausalLM(config)
        model.load_state_dict({k: v for k, v in sd.items() if k != HEAD}, strict=False)
        model.save_pretrained(path)
    else:
        save_llama(path, sd, vocab=vocab, tokenizer=False)
    tokenizer.save_pretrained(path)
    return path


def build_zoo(root: Path, *, tied: bool = False) -> dict[str, tuple[Path, dict]]:
    base = random_state(0, vocab=44)
    if tied:
        base[HEAD] = base[EMBED]
    states = {
        "base": (base, ()),
        "a": (with_new_row(fine_tune(base, 1), 11), (IM,)),
        "b": (with_new_row(fine_tune(base, 2), 12), (NEW,)),
        "c": (fine_tune(base, 3), ()),
        "d": (with_new_row(fine_tune(base, 4), 14), (IM,)),
    }
    out = {}
    for name, (sd, extra) in states.items():
        tok = char_tokenizer(extra)
        if name == "a":
            tok.chat_template = TEMPLATE
        if tied:
            sd = {k: v for k, v in sd.items() if k != HEAD}
        out[name] = (save(root / name, sd, tok, tied=tied), sd)
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("vocab"))


@pytest.fixture
def ordered_mergekit(monkeypatch):
    """mergekit's referenced models in listing order (base first), not set order."""
    from mergekit.config import MergeConfiguration

    def ordered(self):
        seq = [self.base_model] if self.base_model else []
        seq += [m.model for m in self.models or []]
        for module in (self.modules or {}).values():
            seq += [m.model for m in module.models or []]
            seq += [src.model for s in module.slices or [] for src in s.sources]
        return list(dict.fromkeys(seq))

    monkeypatch.setattr(MergeConfiguration, "referenced_models", ordered)


def write(tmp_path: Path, text: str, zoo: dict) -> Path:
    for name, (path, _) in zoo.items():
        text = text.replace(f"@{name}", str(path))
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    return cfg


def both(tmp_path: Path, text: str, zoo: dict) -> tuple[Path, Path]:
    """mergekit's and our output of one mergekit config."""
    cfg = write(tmp_path, text, zoo)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    return tmp_path / "mk", tmp_path / "ours"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def assert_same(mk: Path, ours: Path, tol: float = 1e-6) -> None:
    a, b = tensors(mk), tensors(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k] - b[k]).abs().max().item() <= tol, k
    assert vocab(mk) == vocab(ours)
    mk_size = json.loads((mk / "config.json").read_text())["vocab_size"]
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == mk_size


CONFIGS = {
    "linear": """
merge_method: linear
models:
  - {model: "@base", parameters: {weight: 0.2}}
  - {model: "@a", parameters: {weight: 0.5}}
  - {model: "@b", parameters: {weight: 0.3}}
tokenizer_source: union
dtype: float32
""",
    "linear_base_model": """
merge_method: linear
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.5}}
  - {model: "@d", parameters: {weight: 0.3}}
  - {model: "@b", parameters: {weight: 0.4}}
  - {model: "@base", parameters: {weight: 0.2}}
tokenizer_source: union
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.5, density: 0.6}}
  - {model: "@b", parameters: {weight: 0.3, density: 0.6}}
  - {model: "@c", parameters: {weight: 0.4, density: 0.8}}
tokenizer_source: union
dtype: float32
""",
    "task_arithmetic_shared_token": """
merge_method: task_arithmetic
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.6}}
  - {model: "@d", parameters: {weight: 0.3}}
  - {model: "@b", parameters: {weight: 0.5}}
parameters: {lambda: 0.9}
tokenizer_source: union
dtype: float32
""",
    "base": """
merge_method: task_arithmetic
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.6}}
  - {model: "@b", parameters: {weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
    "model": """
merge_method: ties
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.6, density: 0.7}}
  - {model: "@b", parameters: {weight: 0.5, density: 0.7}}
tokenizer_source: "@b"
dtype: float32
""",
    "padded": """
merge_method: task_arithmetic
base_model: "@base"
models:
  - {model: "@a", parameters: {weight: 0.6}}
  - {model: "@b", parameters: {weight: 0.5}}
tokenizer: {source: union, pad_to_multiple_of: 16}
dtype: float32
""",
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_merged_vocabulary_matches_mergekit(zoo, tmp_path, ordered_mergekit, case):
    mk, ours = both(tmp_path, CONFIGS[case], zoo)
    assert_same(mk, ours)
    rows = tensors(ours)[EMBED].shape[0]
    expected = {"base": 44, "model": 45, "padded": 48}.get(case, 46)
    assert rows == expected
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ours))
    assert len(tok) == min(rows, 46)
    model = AutoModelForCausalLM.from_pretrained(str(ours))
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_union_ids_and_owner_rows(zoo, tmp_path, ordered_mergekit):
    """The new tokens follow the reference's 44 in mergekit's order (a's, then b's), and a
    token only one model has keeps that model's rows: every input gets the owner's row
    (mergekit's PermutedVocabulary), so a normalised linear merge, and a task-vector
    merge whose base has the same row, give back the owner's row."""
    for case in ("linear", "ties"):
        mk, ours = both(tmp_path / case, CONFIGS[case], zoo)
        ids = vocab(ours)
        assert (ids[IM], ids[NEW]) == (44, 45) == (vocab(mk)[IM], vocab(mk)[NEW])
        out, ref = tensors(ours), tensors(mk)
        for name, token in (("a", IM), ("b", NEW)):
            owner = zoo[name][1]
            for k in (EMBED, HEAD):
                assert torch.allclose(out[k][ids[token]], owner[k][44], atol=1e-6)
                assert torch.allclose(ref[k][ids[token]], owner[k][44], atol=1e-6)
    tok_cfg = json.loads((tmp_path / "ties" / "ours" / "tokenizer.json").read_text())
    added = {t["content"]: t for t in tok_cfg["added_tokens"]}
    assert added[IM]["special"] and not added[NEW]["special"]


def test_shared_token_missing_in_base_takes_owners_mean(zoo, tmp_path, ordered_mergekit):
    """``<|im_start|>`` in a and d but not the base: the base (and b) get the mean of a's
    and d's rows, as mergekit does."""
    mk, ours = both(tmp_path, CONFIGS["task_arithmetic_shared_token"], zoo)
    from model_glue.merge.tokenizer import build_vocabulary

    names = ["base", "a", "d", "b"]
    voc = build_vocabulary(
        [zoo[n][0] for n in names], [44, 45, 45, 45], names, source="union", preferred=0
    )
    rows = voc.permute([zoo[n][1][EMBED] for n in names])
    mean = (zoo["a"][1][EMBED][44] + zoo["d"][1][EMBED][44]) / 2
    im = voc.tokens.index(IM)
    assert torch.equal(rows[0][im], mean) and torch.equal(rows[3][im], mean)
    assert torch.equal(rows[1][im], zoo["a"][1][EMBED][44])
    assert_same(mk, ours)


def test_model_source_and_base_source_vocabularies(zoo, tmp_path, ordered_mergekit):
    mk, ours = both(tmp_path / "m", CONFIGS["model"], zoo)
    assert vocab(ours) == vocab(zoo["b"][0])
    assert (ours / "tokenizer.json").read_bytes() == (zoo["b"][0] / "tokenizer.json").read_bytes()
    mk, ours = both(tmp_path / "b", CONFIGS["base"], zoo)
    assert vocab(ours) == vocab(zoo["base"][0])
    card = (ours / "README.md").read_text()
    assert "vocabulary: base's vocabulary (tokenizer: base): 44 tokens" in card


def test_tied_embeddings(tmp_path_factory, tmp_path, ordered_mergekit):
    zoo = build_zoo(tmp_path_factory.mktemp("tied"), tied=True)
    mk, ours = both(tmp_path, CONFIGS["ties"], zoo)
    out = tensors(ours)
    assert HEAD not in out and out[EMBED].shape[0] == 46
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same(mk, ours)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ours))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_in_memory_merge_equals_streaming(zoo, tmp_path):
    """A search trial over members of 44 and 45 tokens (plus one of 45 others)."""
    spec = MergeSpec(
        "ties",
        [ModelInput(str(zoo[n][0]), n, {"weight": w}) for n, w in (("a", 0.6), ("b", 0.4))],
        base=str(zoo["base"][0]),
        params={"density": 0.7},
        tokenizer="union",
    )
    merge_to_directory(spec, tmp_path / "out")
    streamed = tensors(tmp_path / "out")
    base_sd, sds = zoo["base"][1], [zoo["a"][1], zoo["b"][1]]
    resident = merge_in_memory(spec, sds, base_sd)
    vocabulary = spec_vocabulary(spec, [Checkpoint(uri) for _, uri in spec.inputs()])
    merger = Merger(
        "ties",
        [LazyTensors(str(zoo[n][0])) for n in ("a", "b")],
        LazyTensors(str(zoo["base"][0])),
        names=["a", "b"],
        params={"density": 0.7},
        vocabulary=vocabulary,
    )
    lazy = merger(model_params=[{"weight": 0.6}, {"weight": 0.4}])
    for k, v in streamed.items():
        assert torch.equal(resident[k], v), k
        assert torch.equal(lazy[k], v), k


def test_our_config_keys_and_chat_template(zoo, tmp_path):
    cfg = tmp_path / "ours.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "models": [{"uri": str(zoo[n][0]), "name": n} for n in ("c", "b", "a")],
                "tokenizer": "union",
                "chat_template": "a",
            }
        )
    )
    spec = load_merge_config(cfg)
    assert spec.tokenizer == "union" and spec.canonical()["tokenizer"] == "union"
    merge_to_directory(spec, tmp_path / "out")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template == TEMPLATE
    assert (tok.convert_tokens_to_ids(NEW), tok.convert_tokens_to_ids(IM)) == (44, 45)
    again = load_merge_config(_dump(tmp_path / "again.yaml", spec.to_config()))
    assert again.canonical() == spec.canonical()


def _dump(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_identical_vocabularies_copy_the_reference_tokenizer(zoo, tmp_path):
    """Same tokens everywhere: no permutation, the same bits as without ``tokenizer``."""
    models = [ModelInput(str(zoo[n][0]), n) for n in ("c",)]
    spec = MergeSpec("task_arithmetic", models, base=str(zoo["base"][0]), tokenizer="union")
    plain = MergeSpec("task_arithmetic", models, base=str(zoo["base"][0]))
    assert "tokenizer" not in plain.canonical()
    merge_to_directory(spec, tmp_path / "u")
    merge_to_directory(plain, tmp_path / "p")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "u" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_vocab_compatible(zoo, tmp_path):
    assert vocab_compatible([zoo["base"][0], zoo["a"][0], zoo["c"][0]]) is None
    reason = vocab_compatible([zoo["a"][0], zoo["b"][0]])
    assert reason == f"token 44 is {IM!r} in a but {NEW!r} in b"
    char_tokenizer(scramble=True).save_pretrained(tmp_path / "scrambled")
    reason = vocab_compatible([zoo["a"][0], tmp_path / "scrambled"])
    assert reason == "token 3 is '!' in a but 'I' in scrambled"
    assert "\n" not in reason


def test_refusals_are_one_line(zoo, tmp_path):
    tokens = """
merge_method: linear
models: [{model: "@a"}, {model: "@b"}]
tokenizer: {source: union, tokens: {"<|im_start|>": {source: "@a"}}}
"""
    with pytest.raises(MergeConfigError, match=r"tokenizer\.tokens .* is not supported") as e:
        load_merge_config(write(tmp_path, tokens, zoo))
    assert "\n" not in str(e.value)
    both_keys = "merge_method: linear\nmodels: [{model: '@a'}]\ntokenizer_source: union\ntokenizer: {source: base}\n"
    with pytest.raises(MergeConfigError, match="tokenizer_source or tokenizer, not both"):
        load_merge_config(write(tmp_path, both_keys, zoo))
    models = [ModelInput(str(zoo[n][0]), n) for n in ("a", "b")]
    with pytest.raises(MergeConfigError, match="not both"):
        MergeSpec("linear", models, tokenizer="union", vocab="pad")
    with pytest.raises(MergeConfigError, match="names no input"):
        MergeSpec("linear", models, tokenizer="zzz")
    with pytest.raises(MergeConfigError, match="pad_to_multiple_of needs tokenizer"):
        MergeSpec("linear", models, pad_to_multiple_of=8)
    with pytest.raises(MergeConfigError, match="chat_template 'chatml'"):
        MergeSpec("linear", models, tokenizer="union", chat_template="chatml")


def test_missing_tokenizer_is_the_references(zoo, tmp_path):
    """An input without tokenizer files is taken to have the reference's (as mergekit)."""
    bare = tmp_path / "bare"
    shutil.copytree(zoo["c"][0], bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    spec = MergeSpec(
        "linear",
        [ModelInput(str(zoo["a"][0]), "a"), ModelInput(str(bare), "bare")],
        tokenizer="union",
    )
    merge_to_directory(spec, tmp_path / "out")
    out = tensors(tmp_path / "out")
    assert out[EMBED].shape[0] == 45
    assert torch.allclose(out[EMBED][44], zoo["a"][1][EMBED][44])


def bpe_tokenizer(extra: tuple[str, ...]):
    """A byte-level BPE of about 300 tokens, then the special tokens ``extra``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(["hello world, a tiny corpus for merging tokenizers"] * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def test_tokens_past_vocab_size_are_cut(tmp_path, ordered_mergekit):
    """The base's tokenizer has two special tokens past its config's vocab_size (ids >=
    embedding rows). Both tools cut them; mergekit's saved tokenizer brings them back as
    special tokens (zero rows in a union, no rows at all with ``base``), ours does not:
    the output tokenizer has exactly the embedding's rows. Shared tokens' rows agree."""
    base_tok = bpe_tokenizer(("<x1>", "<x2>"))
    rows = len(base_tok) - 2
    base = random_state(0, vocab=rows)
    save(tmp_path / "base", base, base_tok)
    a = with_new_row(fine_tune(base, 1), 5)
    save(tmp_path / "a", a, bpe_tokenizer((IM,)))
    zoo = {"base": (tmp_path / "base", base), "a": (tmp_path / "a", a)}
    for source, size in (("union", rows + 1), ("base", rows)):
        text = f"""
merge_method: task_arithmetic
base_model: "@base"
models: [{{model: "@a", parameters: {{weight: 0.7}}}}]
tokenizer_source: {source}
dtype: float32
"""
        mk, ours = both(tmp_path / source, text, zoo)
        out, ref = tensors(ours), tensors(mk)
        ids, mk_ids = vocab(ours), vocab(mk)
        assert out[EMBED].shape[0] == len(ids) == size
        assert set(mk_ids) - set(ids) == {"<x1>", "<x2>"}
        for k in (EMBED, HEAD):
            mine = out[k][[ids[t] for t in ids]]
            theirs = ref[k][[mk_ids[t] for t in ids]]
            assert (mine - theirs).abs().max().item() <= 1e-6


def test_vocab_families_keep_a_base_with_its_extensions_and_say_why_the_rest_is_apart():
    from model_glue.merge.tokenizer import vocab_families

    base = ["<unk>", "a", "b"]
    family, why = vocab_families(
        {
            "base": base,
            "pad": [*base, "<pad>"],  # appended a token: the base's family
            "chat": [*base, "<pad>", "<|im_start|>"],
            "other": [*base, "<|im_end|>"],  # appended another token at the same id
            "scrambled": ["<unk>", "b", "a"],
        }
    )
    assert family == {
        "chat": "chat", "pad": "chat", "base": "chat", "other": "other", "scrambled": "scrambled"
    }  # fmt: skip
    assert why == {
        "other": "token 3 is '<pad>' in chat but '<|im_end|>' in other",
        "scrambled": "token 1 is 'a' in chat but 'b' in scrambled",
    }
    # the main family is the largest, whatever the lengths
    family, why = vocab_families({"base": base, "ft": base, "chat": [*base, "x"], "odd": ["z"]})
    assert set(why) == {"odd"}
    family, why = vocab_families({"a": base, "b": base, "c": ["<unk>", "b", "a", "c"]})
    assert why == {"c": "token 1 is 'a' in a but 'b' in c"}


def test_glue_merge_with_tokenizer_source_union_equals_mergekit(zoo, tmp_path, ordered_mergekit):
    """The command line, as a mergekit user runs it: the same YAML, the same output."""
    from typer.testing import CliRunner

    from glue.cli import app

    cfg = write(tmp_path, CONFIGS["linear"], zoo)
    run_mergekit(cfg, tmp_path / "mk")
    result = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "mk", tmp_path / "ours")
