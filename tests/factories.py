"""What tests build: tiny Llama checkpoints, tokenizers, run configs, ``glue`` subprocesses.

One place for them, so that a test module never imports another test module. Everything
is seconds to build and lands in the folder it is given. (``conftest.py`` wraps the common
ones as fixtures: ``tiny_llama``, ``tiny_family``.)

- Tiny Llamas: :func:`tiny_llama_model` (in memory), :func:`save_tiny_llama` (a Hugging
  Face directory; with ``base``, a fine-tune of it) and :func:`save_family` (a base and its
  fine-tunes). Fine-tunes go through :func:`model_glue.architectures.tiny.save_tiny`, the
  catalog's own builder of tiny models of every architecture.
- The mixture tests' experts: :func:`char_llama` with :func:`char_tokenizer` (the alphabet
  of the router :data:`PROMPTS`), saved by :func:`save_with_tokenizer` / :func:`save_experts`.
- State-dict Llamas for the merge tests, whose numbers are compared tensor by tensor:
  :func:`random_state`, :func:`fine_tune`, :func:`save_llama` (with a tokenizer of exactly
  ``vocab`` tokens, :func:`save_sized_tokenizer`), :func:`merge_zoo`.
- Run configs: :func:`zoo_entries` and :func:`write_config` (:func:`small_project`: the
  fault and runner tests' config over the demo zoo); ``glue`` in a subprocess:
  :func:`glue_run_as_user`, :func:`start_glue_run`; reading a run back: :func:`lineage`,
  :func:`latest_leaderboard`.
"""

from __future__ import annotations

import os
import string
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model_glue.env import configure_environment

configure_environment()

GLUE = str(Path(sys.executable).with_name("glue"))

# --- tiny Llamas ---------------------------------------------------------------------------


def tiny_llama_config(
    *,
    hidden: int = 16,
    layers: int = 2,
    vocab: int = 32,
    heads: int = 2,
    intermediate: int | None = None,
    positions: int = 64,
    **extra: Any,
):
    """A LlamaConfig of a few thousand parameters (``extra``: any other config field)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        **extra,
    )


def tiny_llama_model(seed: int = 0, **config: Any):
    """A random LlamaForCausalLM (eval mode) of :func:`tiny_llama_config` ``(**config)``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config)).eval()


def save_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    dtype: str = "float32",
    tokenizer=None,
    **config: Any,
) -> Path:
    """A tiny LlamaForCausalLM saved as a Hugging Face directory (with ``tokenizer``, if
    given); with ``base``, a 'fine-tune' of it: the base's weights plus seeded Gaussian
    noise of relative size ``noise`` (``config`` then must be empty: the base's is kept)."""
    if base is not None:
        from model_glue.architectures.tiny import save_tiny

        if config:
            raise TypeError(f"a fine-tune keeps its base's config; got {sorted(config)}")
        return save_tiny(
            path, "LlamaForCausalLM", seed=seed, base=base, noise=noise, dtype=dtype,
            tokenizer=tokenizer,
        )  # fmt: skip
    model = tiny_llama_model(seed, **config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)


def save_family(
    root: Path,
    fine_tunes: Sequence[str],
    *,
    base: str = "base",
    seed: int = 0,
    noise: float = 0.05,
    tokenizer=None,
    **config: Any,
) -> dict[str, Path]:
    """A base model and fine-tunes of it, one folder each under ``root``, by name (base
    first); every folder holds ``tokenizer`` if one is given."""
    out = {base: save_tiny_llama(root / base, seed=seed, tokenizer=tokenizer, **config)}
    for i, name in enumerate(fine_tunes, start=1):
        out[name] = save_tiny_llama(
            root / name, seed=seed + 100 * i, base=out[base], noise=noise, tokenizer=tokenizer
        )
    return out


# --- tokenizers ----------------------------------------------------------------------------

CHARS = list(string.ascii_lowercase + string.digits + "+= \n")
# expert -> router prompts, in each of the shapes a config may use
PROMPTS = {
    "e1": {"positive": ["1+2=", "3+4="], "negative": ["last abc"]},
    "e2": {"positive": ["next a=", "next q="]},
    "e3": ["last abc=", "last xyz="],
}


def char_tokenizer(extra: str = ""):
    """One token per character of :data:`CHARS` (then ``extra``): pad 0, eos 1, 42 tokens
    (fits :func:`tiny_llama_model` with ``vocab >= 42``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *CHARS, *extra])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def char_llama(seed: int, *, hidden: int = 16, layers: int = 3, vocab: int = 48):
    """A tiny Llama whose special tokens are :func:`char_tokenizer`'s."""
    return tiny_llama_model(
        seed, hidden=hidden, layers=layers, vocab=vocab,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip


def save_with_tokenizer(model, path: Path, tokenizer=None) -> Path:
    """``model`` saved at ``path`` with ``tokenizer`` (default :func:`char_tokenizer`)."""
    model.save_pretrained(path)
    (tokenizer or char_tokenizer()).save_pretrained(path)
    return Path(path)


def save_experts(root: Path, names: Sequence[str] = ("base", "e1", "e2", "e3")) -> dict[str, Path]:
    """Independent :func:`char_llama` models (seeds 0, 1, ...) of one architecture and one
    tokenizer, by name: the mixture tests' base and experts."""
    return {n: save_with_tokenizer(char_llama(seed), root / n) for seed, n in enumerate(names)}


def save_sized_tokenizer(path: Path, vocab: int) -> None:
    """A character tokenizer of exactly ``vocab`` tokens (``<unk>`` and ``vocab - 1``
    characters from ``!`` on), saved at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(33 + i) for i in range(vocab - 1)]
    tok = Tokenizer(
        models.WordLevel({c: i + 1 for i, c in enumerate(chars)} | {"<unk>": 0}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


# --- state-dict Llamas for the merge tests -------------------------------------------------


def merge_llama_config(vocab: int = 64, layers: int = 2):
    """The merge tests' Llama: 32 wide, 4 heads, 32 positions."""
    return tiny_llama_config(
        hidden=32, intermediate=64, layers=layers, vocab=vocab, heads=4, positions=32
    )


def save_llama(
    path: Path,
    state: dict[str, torch.Tensor],
    *,
    vocab: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
    tokenizer: bool = True,
) -> Path:
    """Save ``state`` as a Hugging Face Llama directory (optionally sharded), with a
    tokenizer of ``vocab`` tokens unless ``tokenizer`` is false."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(merge_llama_config(vocab, layers))
    model.load_state_dict(state)
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "5GB")
    if tokenizer:
        save_sized_tokenizer(path, vocab)
    return path


def random_state(seed: int, vocab: int = 64, layers: int = 2) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    sd = LlamaForCausalLM(merge_llama_config(vocab, layers)).state_dict()
    g = torch.Generator().manual_seed(seed)
    # Norm weights start at exactly 1: jitter them so that every tensor has a task vector.
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}


def fine_tune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def merge_zoo(root: Path, n: int = 3, **kw) -> tuple[dict, list[dict], Path, list[Path]]:
    """A base and ``n`` fine-tunes saved under ``root``: (base sd, fine-tune sds, base path,
    fine-tune paths); ``kw`` goes to :func:`save_llama`."""
    base = random_state(0, kw.get("vocab", 64), kw.get("layers", 2))
    fts = [fine_tune(base, 100 + i) for i in range(n)]
    bpath = save_llama(root / "base", base, **kw)
    paths = [save_llama(root / f"ft{i}", sd, **kw) for i, sd in enumerate(fts)]
    return base, fts, bpath, paths


# --- run configs ---------------------------------------------------------------------------


def zoo_entries(
    folder: Path | str, families: Mapping[str, Sequence[str]], *, declare_bases: bool = True
) -> list[dict]:
    """The ``zoo:`` list of models in ``folder`` (one sub-folder each): every base, then
    its fine-tunes, which name it as their ``base`` (unless ``declare_bases`` is false)."""
    folder = Path(folder)
    out = []
    for base, fine_tunes in families.items():
        out.append({"name": base, "path": str(folder / base)})
        for name in fine_tunes:
            entry = {"name": name, "path": str(folder / name)}
            out.append(entry | ({"base": base} if declare_bases else {}))
    return out


def write_config(
    path: Path,
    zoo: list[dict] | Mapping[str, Path | str],
    *,
    name: str = "test",
    store: Path | str | None = None,
    lineage_db: Path | str | None = None,
    **sections: Any,
) -> Path:
    """A run config at ``path``: ``zoo`` (entries, or names to paths), the store and
    lineage database (default: ``store`` and ``lineage.duckdb`` beside the config) and
    any other ``sections`` (``evaluation``, ``filter``, ``merge``, ``mixture`` ...)."""
    import yaml

    if isinstance(zoo, Mapping):
        zoo = [{"name": n, "path": str(p)} for n, p in zoo.items()]
    cfg = {
        "name": name,
        "store": str(store if store is not None else path.parent / "store"),
        "lineage_db": str(lineage_db if lineage_db is not None else path.parent / "lineage.duckdb"),
        "zoo": zoo,
        **sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def small_project(demo_models: Path, root: Path, name: str) -> Path:
    """``root/name.yaml``: five demo zoo models of two families, with a search, merges and
    a mixture, on the store and database ``root/name/`` (short limits: for the faults and
    the runners, not the scores)."""
    return write_config(
        root / f"{name}.yaml",
        zoo_entries(demo_models, {"base-a": ["add-a", "last-a"], "base-b": ["add-b"]}),
        name=name,
        store=root / name / "store",
        lineage_db=root / name / "lineage.duckdb",
        filter={"strategy": "evolutionary", "budget": 3, "proxy_limit": 10},
        evaluation={"tasks": ["demo_add", "demo_last"], "limit": 10},
        mixture={"variant": "model_level", "router": "random", "layer": 2},
    )


# --- glue in a subprocess, and reading a run back -----------------------------------------


def glue_run_as_user(
    config: Path,
    cwd: Path,
    home: Path,
    env: dict[str, str | None] | None = None,
    command: str = "run",
) -> subprocess.CompletedProcess:
    """``glue run`` (or ``command``) as a new user's shell would start it: nothing of this
    test's environment (Prefect's test server, the tests' GLUE_HOME or caches) is
    inherited; ``env`` adds variables (None: unsets one, e.g. HF_HUB_OFFLINE)."""
    shell = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "HF_", "GLUE_", "TRANSFORMERS_"))
    }
    shell |= {"GLUE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for k, v in (env or {}).items():
        if v is None:
            shell.pop(k, None)
        else:
            shell[k] = v
    return subprocess.run(
        [GLUE, *command.split(), os.path.relpath(config, cwd)],
        cwd=cwd,
        env=shell,
        capture_output=True,
        text=True,
        timeout=900,
    )


def start_glue_run(config: Path, home: Path) -> subprocess.Popen:
    """``glue run config`` started in the background, in its own process group (as a
    scheduler's job), with ``home`` as its GLUE_HOME; stderr goes to stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GLUE_"))}
    env |= {"GLUE_HOME": str(home)}
    return subprocess.Popen(
        [GLUE, "run", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def lineage(path: Path):
    """The lineage database at ``path``, read only."""
    from storage import LineageDB

    return LineageDB(str(path), read_only=True)


def latest_leaderboard(db_path: Path) -> dict[str, dict]:
    """The leaderboard of the latest completed flow run, by model name."""
    db = lineage(db_path)
    flow = db.query(
        "SELECT flow_run_id FROM flow_runs WHERE status = 'completed' "
        "ORDER BY started_at DESC LIMIT 1"
    ).item()
    rows = db.leaderboard(flow_run_id=flow).drop("artifact_id", strict=False).to_dicts()
    return {r["name"]: r for r in rows}


# --- mergekit, the reference of the differential tests ----------------------------------


def run_mergekit(config_path: Path, out: Path) -> None:
    """Run mergekit 0.1.5 on a merge YAML file (in process, no tokenizer or card)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(config_path).read_text()))
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
