"""model_glue.hub against a local stand-in for the hub (tests/hub_stub.py).

The tests' environment is offline (conftest: ``HF_HUB_OFFLINE=1``, read by huggingface_hub
at import): the ``online`` fixture switches huggingface_hub's own flag,
``huggingface_hub.constants.HF_HUB_OFFLINE``, off for each test, and offline tests switch it
back on. No token is saved or in the environment unless a test puts it there; caches live
under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

from model_glue import hub
from model_glue.errors import InputError
from model_glue.hub import HubError, HubModel, discover, latest_commit, resolve, select_files
from tests.hub_stub import HubStub, read_dir

GOOD, OTHER = "hf_good_SECRET_token_123", "hf_other_SECRET_token_456"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(autouse=True)
def online(monkeypatch, tmp_path):
    """Online, no token anywhere, huggingface_hub's default cache under tmp_path."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored"))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def family(tiny_family):
    """The tiny family's directories as name -> {filename: bytes}, plus extras a real repo
    has: a card, a pickle copy of the weights and a trainer's pickle, a subfolder."""
    out = {}
    for name, path in tiny_family.items():
        files = read_dir(path)
        files.update(
            {
                "README.md": b"# tiny\n",
                ".gitattributes": b"*.safetensors filter=lfs\n",
                "pytorch_model.bin": b"pickle" * 10,
                "training_args.bin": b"args",
                "original/consolidated.00.pth": b"orig",
            }
        )
        out[name] = files
    return out


@pytest.fixture
def stub(family):
    with HubStub() as s:
        s.add_repo("org/base", family["base"], downloads=1000)
        s.add_repo("org/ft-a", family["a"], base_model="org/base", downloads=30, likes=1)
        s.add_repo("org/ft-b", family["b"], base_model="org/base", downloads=10, likes=9)
        s.add_repo(
            "org/adapter-c", family["c"], base_model="org/base", relation="adapter", downloads=20
        )
        s.add_repo("other/merge-d", family["d"], base_model="org/base", relation="merge")
        s.add_repo("org/quant", family["a"], base_model="org/base", relation="quantized")
        s.add_repo("org/unrelated", family["d"], downloads=5000)
        s.add_repo("org/secret", family["a"], private=True, tokens=[GOOD], base_model="org/base")
        s.add_repo("org/gated", family["b"], gated=True, tokens=[GOOD])
        s.add_token(OTHER)
        yield s


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, InputError)
    assert "\n" not in msg and msg.strip() == msg
    for name in names:
        assert name in msg
    assert GOOD not in msg and OTHER not in msg
    return msg


# --- resolve online ---------------------------------------------------------------------


def test_resolve_main_downloads_the_model_files_only(stub, family, cache):
    m = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    assert isinstance(m, HubModel)
    assert (m.repo, m.revision, m.commit, m.offline) == (
        "org/ft-a",
        "main",
        stub.head("org/ft-a"),
        False,
    )
    assert m.path == cache.resolve() / "models--org--ft-a" / "snapshots" / m.commit
    assert set(m.files) == MODEL_FILES | TOKENIZER
    assert {p.name for p in m.path.iterdir()} == set(m.files)  # no README, no pickles, no original/
    assert stub.file_gets("org/ft-a") == sorted(m.files)
    # sha256 of the bytes: the hub's LFS sha256 for weights, computed for the JSON files
    assert m.files == {name: sha256(family["a"][name]) for name in m.files}
    assert (cache / "models--org--ft-a" / "refs" / "main").read_text() == m.commit

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(m.path)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(m.path)("ab")["input_ids"]


def test_a_complete_snapshot_is_not_downloaded_again(stub, cache):
    first = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    stub.reset_requests()
    again = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    assert again == first and hash(again) == hash(first)
    assert stub.file_gets() == []
    assert stub.count("HEAD") == 0
    assert stub.count() == 1  # the model_info that says main has not moved


def test_a_new_commit_downloads_only_the_changed_files(stub, family, cache):
    first = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    new = stub.push("org/ft-a", {"model.safetensors": family["b"]["model.safetensors"]})
    stub.reset_requests()
    m = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    assert m.commit == new != first.commit
    assert stub.file_gets() == ["model.safetensors"]
    assert m.files["model.safetensors"] == sha256(family["b"]["model.safetensors"])
    assert {k: v for k, v in m.files.items() if k != "model.safetensors"} == {
        k: v for k, v in first.files.items() if k != "model.safetensors"
    }
    assert first.path.is_dir() and m.path != first.path  # the old snapshot stays
    assert (cache / "models--org--ft-a" / "refs" / "main").read_text() == new


def test_revision_as_tag_and_as_commit(stub, family, cache):
    old = stub.head("org/ft-a")
    stub.tag("org/ft-a", "v1.0")
    stub.push("org/ft-a", {"config.json": b"{}", "model.safetensors": b"changed"})
    by_tag = resolve("org/ft-a", "v1.0", endpoint=stub.endpoint, cache_dir=cache)
    assert (by_tag.revision, by_tag.commit) == ("v1.0", old)
    assert (cache / "models--org--ft-a" / "refs" / "v1.0").read_text() == old
    stub.reset_requests()
    by_commit = resolve("org/ft-a", old, endpoint=stub.endpoint, cache_dir=cache)
    assert (by_commit.revision, by_commit.commit, by_commit.path) == (old, old, by_tag.path)
    assert stub.file_gets() == []
    assert not (cache / "models--org--ft-a" / "refs" / old).exists()


def test_pickles_only_with_allow_pickle_and_only_without_safetensors(stub, family, cache):
    resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache, allow_pickle=True)
    assert not any(name.endswith(".bin") for name in stub.file_gets())  # safetensors win

    pickled = {"config.json": family["a"]["config.json"], "pytorch_model.bin": b"p" * 64}
    stub.add_repo("org/pickled", {**pickled, "training_args.bin": b"args", "optimizer.pt": b"o"})
    with pytest.raises(HubError) as e:
        resolve("org/pickled", endpoint=stub.endpoint, cache_dir=cache)
    assert "allow_pickle" in one_line(e, "org/pickled", "pytorch_model.bin")
    assert stub.file_gets("org/pickled") == []

    m = resolve("org/pickled", endpoint=stub.endpoint, cache_dir=cache, allow_pickle=True)
    assert set(m.files) == {"config.json", "pytorch_model.bin"}
    assert stub.file_gets("org/pickled") == ["config.json", "pytorch_model.bin"]
    assert m.files["pytorch_model.bin"] == sha256(b"p" * 64)


def test_select_files():
    names = [
        "config.json", "README.md", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "consolidated.safetensors", "tokenizer.model", "chat_template.jinja",
        "adapter_config.json", "onnx/model.safetensors", "pytorch_model.bin", "optimizer.pt",
    ]  # fmt: skip
    assert select_files(names) == [
        "adapter_config.json", "chat_template.jinja", "config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.model",
    ]  # fmt: skip
    assert select_files(names, allow_pickle=True) == select_files(names)
    assert select_files(["consolidated.safetensors", "params.json"]) == ["consolidated.safetensors"]
    pickles = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
               "training_args.bin", "rng_state.pth", "adapter_model.bin"]  # fmt: skip
    assert select_files(pickles) == ["config.json"]
    assert select_files(pickles, allow_pickle=True) == [
        "adapter_model.bin", "config.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]  # fmt: skip


def test_default_cache_is_huggingface_hubs(stub, tmp_path):
    m = resolve("org/ft-a", endpoint=stub.endpoint)
    assert m.path.is_relative_to(tmp_path / "hf" / "hub")


# --- offline and unreachable -----------------------------------------------------------


def test_offline_resolves_from_the_cache_alone(stub, monkeypatch, cache):
    online = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    stub.tag("org/ft-a", "v1")
    tagged = resolve("org/ft-a", "v1", endpoint=stub.endpoint, cache_dir=cache)
    newer = stub.push("org/ft-a", {"model.safetensors": b"newer"})  # the cache knows nothing
    stub.reset_requests()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert hub.is_offline()
    m = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    assert m == HubModel("org/ft-a", "main", online.commit, online.path, online.files, True)
    assert m.commit != newer
    assert resolve("org/ft-a", "v1", cache_dir=cache).commit == tagged.commit
    assert resolve("org/ft-a", online.commit, cache_dir=cache).path == online.path
    assert latest_commit("org/ft-a", endpoint=stub.endpoint) is None
    assert stub.count() == 0

    with pytest.raises(HubError) as e:
        resolve("org/ft-b", endpoint=stub.endpoint, cache_dir=cache)
    assert "offline" in one_line(e, "org/ft-b")
    with pytest.raises(HubError) as e:
        resolve("org/ft-a", "v2", cache_dir=cache)
    one_line(e, "org/ft-a", "v2")
    with pytest.raises(HubError) as e:
        discover("org/base", endpoint=stub.endpoint)
    assert "offline" in one_line(e, "org/base")
    assert stub.count() == 0


def test_offline_reads_a_cache_written_by_huggingface_hub_itself(stub, family, monkeypatch, cache):
    from huggingface_hub import snapshot_download

    snapshot_download("org/ft-b", endpoint=stub.endpoint, cache_dir=cache)  # every file
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = resolve("org/ft-b", cache_dir=cache)
    assert (m.commit, m.offline) == (stub.head("org/ft-b"), True)
    assert set(m.files) == MODEL_FILES | TOKENIZER
    assert m.files == {name: sha256(family["b"][name]) for name in m.files}


def test_offline_refuses_an_incomplete_snapshot(stub, monkeypatch, cache):
    m = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    (m.path / "model.safetensors").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as e:
        resolve("org/ft-a", cache_dir=cache)
    assert "incomplete" in one_line(e, "org/ft-a", "model.safetensors")


def test_an_unreachable_hub_falls_back_to_the_cache(stub, cache, caplog, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http, "time", SimpleNamespace(sleep=lambda s: None))  # list_models retries
    cached = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    stub.outage = 503
    with caplog.at_level(logging.WARNING, logger="model_glue.hub"):
        m = resolve("org/ft-a", endpoint=stub.endpoint, cache_dir=cache)
    assert (m.commit, m.path, m.offline) == (cached.commit, cached.path, True)
    assert "unreachable" in caplog.text
    assert latest_commit("org/ft-a", endpoint=stub.endpoint) is None
    with pytest.raises(HubError) as e:
        resolve("org/ft-b", endpoint=stub.endpoint, cache_dir=cache)
    assert "unreachable (HTTP 503)" in one_line(e, "org/ft-b")

    endpoint = stub.endpoint
    stub.stop()  # connection refused
    assert resolve("org/ft-a", endpoint=endpoint, cache_dir=cache).commit == cached.commit
    with pytest.raises(HubError) as e:
        resolve("org/ft-b", endpoint=endpoint, cache_dir=cache)
    assert "unreachable" in one_line(e, "org/ft-b")
    with pytest.raises(HubError) as e:
        discover("org/base", endpoint=endpoint)
    assert "unreachable" in one_line(e, "org/base")


# --- errors and tokens -----------------------------------------------------------------


def test_missing_repo_and_revision(stub, cache):
    with pytest.raises(HubError) as e:
        resolve("org/nope", endpoint=stub.endpoint, cache_dir=cache)
    assert "not found" in one_line(e, "org/nope")
    with pytest.raises(HubError) as e:
        resolve("org/ft-a", "no-such-branch", endpoint=stub.endpoint, cache_dir=cache)
    assert "revision" in one_line(e, "org/ft-a", "no-such-branch")
    with pytest.raises(HubError) as e:
        resolve("not a/repo id", endpoint=stub.endpoint, cache_dir=cache)
    one_line(e, "not a/repo id")
    with pytest.raises(HubError) as e:
        resolve("org/ft-a", "../../etc", endpoint=stub.endpoint, cache_dir=cache)
    one_line(e, "org/ft-a", "../../etc")
    assert stub.file_gets() == []


def test_private_and_gated_repos_need_a_token(stub, family, cache):
    for token in (None, OTHER, "hf_unknown_SECRET"):
        with pytest.raises(HubError) as e:
            resolve("org/secret", endpoint=stub.endpoint, cache_dir=cache, token=token)
        one_line(e, "org/secret")
        assert "hf_unknown_SECRET" not in str(e.value)
    with pytest.raises(HubError) as e:
        resolve("org/gated", endpoint=stub.endpoint, cache_dir=cache)
    assert "gated" in one_line(e, "org/gated", "token")
    with pytest.raises(HubError) as e:
        resolve("org/gated", endpoint=stub.endpoint, cache_dir=cache, token=OTHER)
    assert "no access" in one_line(e, "org/gated")
    assert stub.file_gets() == []

    secret = resolve("org/secret", endpoint=stub.endpoint, cache_dir=cache, token=GOOD)
    assert secret.files["model.safetensors"] == sha256(family["a"]["model.safetensors"])
    gated = resolve("org/gated", endpoint=stub.endpoint, cache_dir=cache, token=GOOD)
    assert gated.commit == stub.head("org/gated")


def test_the_token_never_leaks(stub, monkeypatch, cache, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", GOOD)  # huggingface_hub's usual token, not an argument
    m = resolve("org/secret", endpoint=stub.endpoint, cache_dir=cache)
    assert m.commit == stub.head("org/secret")
    assert latest_commit("org/gated", endpoint=stub.endpoint) == stub.head("org/gated")
    assert discover("org/base", endpoint=stub.endpoint, limit=10)[0] == "org/ft-a"
    errors = []
    for token in (OTHER, GOOD):
        for repo, rev in (("org/nope", "main"), ("org/secret", "nope")):
            with pytest.raises(HubError) as e:
                resolve(repo, rev, endpoint=stub.endpoint, cache_dir=cache, token=token)
            errors.append(e.value)
    seen = [repr(m), str(m), caplog.text, *(str(e) for e in errors), *(repr(e) for e in errors)]
    assert not any(GOOD in text or OTHER in text for text in seen)
    for e in errors:
        assert e.__cause__ is None  # the hub's exception (request headers) is not chained
    on_disk = [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
    assert on_disk and not any(GOOD.encode() in data for data in on_disk)


# --- latest commit, discovery ----------------------------------------------------------


def test_latest_commit_follows_the_branch(stub, cache):
    first = stub.head("org/ft-a")
    assert latest_commit("org/ft-a", endpoint=stub.endpoint) == first
    second = stub.push("org/ft-a", {"model.safetensors": b"x"})
    assert latest_commit("org/ft-a", "main", endpoint=stub.endpoint) == second
    stub.tag("org/ft-a", "v1", first)
    assert latest_commit("org/ft-a", "v1", endpoint=stub.endpoint) == first
    with pytest.raises(HubError) as e:
        latest_commit("org/nope", endpoint=stub.endpoint)
    one_line(e, "org/nope")
    with pytest.raises(HubError) as e:
        latest_commit("org/secret", endpoint=stub.endpoint, token=OTHER)
    one_line(e, "org/secret")
    assert latest_commit("org/secret", endpoint=stub.endpoint, token=GOOD)
    assert stub.file_gets() == []


def test_discover_the_model_tree_of_a_base(stub):
    kw = {"endpoint": stub.endpoint}
    # fine-tunes, adapters and merges by downloads; not the quantized copy, not the base,
    # not the private fine-tune (no token), not unrelated models
    assert discover("org/base", **kw) == ["org/ft-a", "org/adapter-c", "org/ft-b", "other/merge-d"]
    assert discover("org/base", limit=2, **kw) == ["org/ft-a", "org/adapter-c"]
    assert discover("org/base", sort="likes", limit=2, **kw) == ["org/ft-b", "org/ft-a"]
    assert discover("org/base", author="other", **kw) == ["other/merge-d"]
    assert discover("org/base", search="FT-", **kw) == ["org/ft-a", "org/ft-b"]
    assert discover("org/base", relations=["adapter"], **kw) == ["org/adapter-c"]
    everything = discover("org/base", relations=None, **kw)  # the plain base_model: tag
    assert set(everything) == {
        "org/ft-a",
        "org/adapter-c",
        "org/ft-b",
        "other/merge-d",
        "org/quant",
    }
    assert "org/secret" in discover("org/base", token=GOOD, **kw)
    assert discover("org/ft-b", **kw) == []
    assert discover("org/base", sort="created_at", **kw)[0] == "other/merge-d"  # the newest
    with pytest.raises(HubError) as e:
        discover("org/base", sort="stars", **kw)
    one_line(e, "org/base", "stars")


def test_the_stub_answers_huggingface_hub_itself(stub, family, cache):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    api = HfApi(endpoint=stub.endpoint)
    info = api.model_info("org/ft-a")  # /api/models/{repo}, no revision
    assert info.sha == stub.head("org/ft-a")
    assert "base_model:finetune:org/base" in info.tags
    top = {f.path for f in api.list_repo_tree("org/ft-a")}
    assert "original" in top and "original/consolidated.00.pth" not in top
    url = hf_hub_url("org/ft-a", "model.safetensors", endpoint=stub.endpoint)
    meta = get_hf_file_metadata(url)
    assert (meta.commit_hash, meta.etag) == (info.sha, sha256(family["a"]["model.safetensors"]))
    assert meta.size == len(family["a"]["model.safetensors"])
    path = hf_hub_download(
        "org/ft-a", "original/consolidated.00.pth", endpoint=stub.endpoint, cache_dir=cache
    )
    assert open(path, "rb").read() == b"orig"
    assert [m.id for m in api.list_models(author="other")] == ["other/merge-d"]
