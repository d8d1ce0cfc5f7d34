"""taxon's CUDA paths, one check each: PASS / FAIL with its figures, within a few minutes on one GPU.

Nothing of taxon's CUDA path runs on the CPU machines it is developed on; this script runs taxon's own
functions (train_stage, loglikelihoods, generate, load_model, the executors) on a GPU and compares
them with CPU fp32 references or with each other:

- varlen-attention: a padding-free SFT row (TRL's collator, position ids restarting per example):
  each example's logits inside the row equal its logits alone (fp32, and bf16 autocast within what
  bf16 itself changes); the same row with running positions must differ (the check can fail).
- train-lora-sft / train-full-sft: train_stage on FPB with precision and packing left on auto
  (bf16 and padding-free on CUDA). The loss TRL computes on CUDA (fused LM head) is compared, on
  the same batches, with taxon's CPU loss (labelled_loss: the logits of the labelled positions).
- train-pretrain: packed pretraining (full fine-tuning) on WikiText-2; tokens/s and MFU.
- scorer / generation: loglikelihoods and generate on CUDA in fp32 and bf16 against the same
  functions on a CPU fp32 copy of the model; peak CUDA memory (taxon.resources).
- ray: a Ray task placed by taxon's Ray executor (one GPU per task) sees CUDA (skipped without ray).
- ddp: a stage under `accelerate launch` on every GPU (skipped with one GPU).

The model is SmolLM2-135M's architecture with random weights (seed 0), built from the config and
tokenizer in the assets folder: weights do not matter for speed, and the comparisons are between
devices and precisions of one model. Throughput is tokens per second over the steps after warm-up;
MFU = 6 * parameters * tokens/s / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).

Without CUDA every GPU check prints SKIP (no CUDA). `--cpu-smoke` runs them all on the CPU instead,
with a 2-layer model and a few steps, to test this script (its figures mean nothing).

    python benchmarks/gpu_check.py --assets .gpu-assets --out gpu_check.json   # exit 1 on any FAIL

`benchmarks/gpu_assets.sh` builds the assets folder (model config, tokenizer, data) and the wheels
a machine without PyPI needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # PASS/FAIL lines, not progress bars

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

FPB_FILE = "takala/financial_phrasebank/sentences_50agree/train.jsonl"
WIKI_FILE = "Salesforce/wikitext/wikitext-2-v1/validation.jsonl"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")
# Dense bf16 peak per GPU in TFLOP/s, by a substring of the device name (first match wins).
PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
         ("A10G", 125.0), ("L4", 121.0))
INSTRUCTION = ("What is the sentiment of this financial news sentence? Answer negative, neutral or "
               "positive.\n")


class Skip(Exception):
    """A check that does not apply here; its message is printed after SKIP."""


class OutOfTime(Exception):
    pass


class Checks:
    """Runs the checks in order under one time budget; writes the JSON after each."""

    def __init__(self, opts, budget: float):
        self.opts, self.budget, self.t0 = opts, budget, time.time()
        self.results: list[dict] = []
        self.info: dict = {}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def run(self, name: str, fn, need: float, skip=None) -> dict | None:
        """`skip`: a function saying why the check does not apply here (None: it does), asked
        before the budget, so a check that cannot run is not counted as cut by it."""
        if self.opts.only and name not in self.opts.only:
            return None
        t = time.time()
        reason = skip() if skip else None
        if reason:
            res = {"name": name, "status": "SKIP", "detail": reason}
        elif self.left() < need:
            res = {"name": name, "status": "SKIP", "budget_cut": True,
                   "detail": f"budget: {self.left():.0f} s left, needs ~{need:.0f} s"}
        else:
            try:
                figures = fn() or {}
                failures = figures.pop("failures", [])
                res = {"name": name, "status": "FAIL" if failures else "PASS",
                       "detail": "; ".join(failures), "figures": figures}
            except Skip as e:
                res = {"name": name, "status": "SKIP", "detail": str(e)}
            except OutOfTime:
                res = {"name": name, "status": "FAIL", "detail": "out of time budget (interrupted)",
                       "budget_cut": True}
            except Exception as e:  # noqa: BLE001 - a crash in a path is that path's FAIL
                traceback.print_exc()
                res = {"name": name, "status": "FAIL", "detail": f"{type(e).__name__}: {e}"[:2000]}
        res["seconds"] = round(time.time() - t, 2)
        self.results.append(res)
        self.show(res)
        self.write()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return res

    def show(self, res: dict) -> None:
        figs = res.get("figures", {})
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in figs.items() if k in SHOWN)
        if res["status"] == "SKIP":
            print(f"SKIP  {res['name']:<17} ({res['detail']})", flush=True)
            return
        extra = f" [{res['detail']}]" if res.get("detail") else ""
        print(f"{res['status']:<5} {res['name']:<17} {res['seconds']:6.1f} s  {shown}{extra}", flush=True)

    def write(self) -> None:
        if not self.opts.out:
            return
        doc = {"info": self.info, "checks": self.results, "total_seconds": round(time.time() - self.t0, 1),
               "budget_seconds": self.budget, "passed": self.passed()}
        tmp = Path(self.opts.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(self.opts.out)

    def passed(self) -> bool:
        return not any(r["status"] == "FAIL" or r.get("budget_cut") for r in self.results)


# Figures printed on the PASS/FAIL line (all go to the JSON).
SHOWN = ("tokens_per_s", "steady_tokens_per_s", "mfu_6n", "loss_max_rel_diff", "max_abs_diff_fp32",
         "max_abs_diff_bf16", "max_diff_per_token_bf16", "peak_memory_mb", "greedy_worst_margin_bf16",
         "texts_equal_fp32", "texts_equal_bf16", "attn_implementation", "packed_sequence_path",
         "gpus_seen", "leak_over_error")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


# --- setup -------------------------------------------------------------------------------------


def setup_paths(opts) -> tuple[Path, Path]:
    """(folder with the model's config and tokenizer, dataset mirror), from --assets or this machine."""
    if opts.assets:
        assets = Path(opts.assets).resolve()
        model_src, data = assets / "model", assets / "data"
        os.environ["TAXON_DATA_DIR"] = str(data)
    else:
        from taxon.models import prepare

        model_src = Path(str(prepare("smollm2-135m")))
        sibling = Path(__file__).resolve().parents[2] / "shared" / "data"
        data = Path(os.environ.get("TAXON_DATA_DIR") or sibling)
        os.environ["TAXON_DATA_DIR"] = str(data)
    missing = [str(model_src / f) for f in ("config.json", "tokenizer.json") if not (model_src / f).is_file()]
    missing += [str(data / f) for f in (FPB_FILE, WIKI_FILE) if not (data / f).is_file()]
    if missing:
        sys.exit(f"missing inputs: {', '.join(missing)} (build them with benchmarks/gpu_assets.sh)")
    return model_src, data


def build_model(src: Path, dest: Path, layers: int | None) -> Path:
    """SmolLM2-135M's architecture with random weights (seed 0) and its tokenizer, saved as a local
    folder that load_model and train_stage read like any model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(src)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def fpb_sentences(data: Path, n: int) -> list[str]:
    with open(data / FPB_FILE) as f:
        return [json.loads(line)["sentence"] for _, line in zip(range(n), f, strict=False)]


def need_cuda(opts) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if opts.cpu_smoke:
        return torch.device("cpu")
    raise Skip("no CUDA")


# --- checks ------------------------------------------------------------------------------------


def check_environment(opts, checks: Checks) -> dict:
    import transformers
    import trl

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "cuda_available": torch.cuda.is_available(), "cpu_smoke": bool(opts.cpu_smoke)}
    for mod in ("peft", "accelerate", "datasets", "triton", "flash_attn", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            info[mod] = None
    if torch.cuda.is_available():
        from taxon.models import bf16_supported

        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    bf16_supported=bf16_supported(),
                    peak_bf16_tflops=opts.peak_tflops or next((p for k, p in PEAKS if k in props.name), None))
    checks.info.update(info)
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return {}


def _examples(tokenizer, n: int):
    from taxon.config import DataRef, StageSpec
    from taxon.data import mixture, render

    stage = StageSpec(objective="sft", data=(DataRef(dataset="takala/financial_phrasebank",
                                                     config="sentences_50agree"),),
                      steps=1, batch_size=n, max_length=128)
    ds, _ = mixture.build(stage, tokenizer, render.uses_chat(tokenizer, None))
    return [ds[i] for i in range(n)]


def check_varlen(opts, model_dir: Path) -> dict:
    """An example's logits inside a padding-free row equal its logits alone."""
    device = need_cuda(opts)
    from transformers import masking_utils
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from taxon.models import load_model

    model, tokenizer = load_model(str(model_dir), device=str(device))
    examples = _examples(tokenizer, 6)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": e["input_ids"]} for e in examples])
    ids, pos = batch["input_ids"].to(device), batch["position_ids"].to(device)
    found = masking_utils.find_packed_sequence_indices(pos)
    lengths = [len(e["input_ids"]) for e in examples]

    def logits(bf16: bool, **kw) -> torch.Tensor:
        # use_cache=False as in training: with a cache transformers does not look for packed rows.
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(**kw, use_cache=False).logits[0].float()

    def alone(bf16: bool) -> torch.Tensor:
        return torch.cat([logits(bf16, input_ids=torch.tensor([e["input_ids"]], device=device))
                          for e in examples])

    ref32, ref16 = alone(False), alone(True)
    packed32 = logits(False, input_ids=ids, position_ids=pos)
    packed16 = logits(True, input_ids=ids, position_ids=pos)
    leaky = logits(False, input_ids=ids)  # positions run on: later examples see earlier ones
    n0 = lengths[0]
    err32 = float((packed32 - ref32).abs().max())
    err16 = float((packed16 - ref16).abs().max())
    bf16_noise = float((ref16 - ref32).abs().max())  # what bf16 alone changes
    leak = float((leaky[n0:] - packed32[n0:]).abs().max())
    failures = []
    if found is None:
        failures.append("transformers did not detect the packed sequences (find_packed_sequence_indices)")
    if err32 > opts.fp32_tol:
        failures.append(f"fp32 packed vs alone differ by {err32:.2e} > {opts.fp32_tol:g}")
    if err16 > max(2 * bf16_noise, 0.05):
        failures.append(f"bf16 packed vs alone differ by {err16:.3g} > 2 x what bf16 alone changes "
                        f"({bf16_noise:.3g})")
    if leak < 10 * max(err32, 1e-6):
        failures.append(f"control: running positions change the logits by {leak:.2e} only")
    figures = {"attn_implementation": model.config._attn_implementation,
               "packed_sequence_path": found is not None, "examples": len(lengths),
               "row_tokens": sum(lengths),
               "max_abs_diff_fp32": err32, "max_abs_diff_bf16": err16, "bf16_vs_fp32_alone": bf16_noise,
               "leak_over_error": leak / max(err32, 1e-12), "failures": failures}
    # With flash-attention installed, transformers can pass the boundaries as cu_seq_lens instead.
    from transformers.utils import is_flash_attn_2_available

    if device.type == "cuda" and is_flash_attn_2_available():
        model.set_attn_implementation("flash_attention_2")
        flash = logits(True, input_ids=ids, position_ids=pos)
        figures["max_abs_diff_bf16_flash_attention_2"] = float((flash - ref16).abs().max())
        if figures["max_abs_diff_bf16_flash_attention_2"] > max(2 * bf16_noise, 0.05):
            failures.append("flash_attention_2 packed row differs from the examples alone")
    else:
        figures["flash_attention_2"] = "not installed (sdpa with a block-diagonal mask)"
    return figures


class _StepClock(TrainerCallback):
    """Time and tokens at the end of every step, for the throughput after warm-up."""

    def __init__(self):
        self.marks: list[tuple[int, float, int]] = []

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))


def _train(opts, stage, model_dir: Path, tmp: Path, name: str) -> dict:
    """train_stage with TRL's loss and taxon's labelled-positions loss recorded on the same batches
    (steps 1, 2 and the last one), and the throughput after warm-up."""
    from trl import SFTTrainer

    from taxon import labelled_loss as ll
    from taxon.models import resolve_targets
    from taxon.train import train_stage

    records: list[dict] = []
    original = ll.LabelledLossTrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        if not return_outputs and step in (0, 1, self.state.max_steps - 1):
            cuda = inputs["input_ids"].device.type == "cuda"
            batch = {k: v for k, v in inputs.items() if k != "use_cache"}  # TRL's loss adds use_cache
            with torch.no_grad():
                if cuda:  # the real path was TRL's fused head; the CPU path is labelled_loss
                    other = ll.labelled_loss(model, batch, num_items_in_batch)
                else:  # --cpu-smoke: the real path was labelled_loss; compare with TRL's
                    other = SFTTrainer.compute_loss(self, model, batch, False, num_items_in_batch)
            records.append({"step": step + 1, "trained_on": "trl" if cuda else "labelled_loss",
                            "loss": float(loss.detach()), "other": float(other)})
        return loss

    clock = _StepClock()
    ll.LabelledLossTrainer.compute_loss = spy
    try:
        figures = train_stage(resolve_targets(stage, str(model_dir)), str(model_dir), tmp / name,
                              desc=name, callbacks=(clock,))
    finally:
        ll.LabelledLossTrainer.compute_loss = original
        shutil.rmtree(tmp / name, ignore_errors=True)
    # Steady state: from the end of step `warm` to the end of the step before the last (the last
    # one pays for the extra loss pass).
    warm = min(5, max(1, stage.steps // 3))
    marks = {s: (t, n) for s, t, n in clock.marks}
    a, b = marks.get(warm), marks.get(stage.steps - 1)
    steady = (b[1] - a[1]) / (b[0] - a[0]) if a and b and b[0] > a[0] else None
    diffs = [abs(r["loss"] - r["other"]) / max(abs(r["other"]), 1e-6) for r in records]
    out = {"steps": stage.steps, "tokens": figures["tokens"], "tokens_per_s": figures["tokens_per_s"],
           "steady_tokens_per_s": steady, "train_seconds": figures["train_seconds"],
           "wall_seconds": figures["wall_seconds"], "peak_memory_mb": figures["peak_memory_mb"],
           "bf16": figures["bf16"], "packing_efficiency": figures["packing_efficiency"],
           "trainable_params": figures["trainable_params"], "total_params": figures["total_params"],
           "train_loss": figures["train_loss"], "final_loss": figures["final_loss"],
           "losses_compared": records, "loss_max_rel_diff": max(diffs) if diffs else None}
    failures = []
    if not records:
        failures.append("no loss was recorded")
    if any(not math.isfinite(r["loss"]) for r in records) or not math.isfinite(figures["train_loss"]):
        failures.append("non-finite loss")
    if diffs and max(diffs) > opts.loss_tol:
        failures.append(f"training loss and labelled-positions loss differ by {max(diffs):.2%} "
                        f"> {opts.loss_tol:.0%} on the same batch")
    if torch.cuda.is_available():
        if not figures["bf16"]:
            failures.append("precision auto did not choose bf16 on CUDA")
        if stage.objective == "sft" and figures["packing_efficiency"] != 1.0:
            failures.append(f"packing auto did not give padding-free rows on CUDA "
                            f"(efficiency {figures['packing_efficiency']})")
    out["failures"] = failures
    return out


def _mfu(opts, checks: Checks, figures: dict) -> None:
    peak = checks.info.get("peak_bf16_tflops")
    rate = figures.get("steady_tokens_per_s") or figures.get("tokens_per_s")
    if peak and rate:
        figures["mfu_6n"] = 6 * figures["total_params"] * rate / (peak * 1e12)
        figures["mfu_peak_assumed_tflops"] = peak


def check_train(opts, checks: Checks, model_dir: Path, tmp: Path, kind: str) -> dict:
    device = need_cuda(opts)
    from taxon.config import DataRef, LoraSpec, StageSpec

    fpb = DataRef(dataset="takala/financial_phrasebank", config="sentences_50agree")
    smoke = device.type == "cpu"
    steps = 3 if smoke else opts.steps
    # Packing and precision stay on auto: padding-free rows and bf16 on CUDA. --cpu-smoke asks for
    # padding-free rows so the CPU run goes through the same collator.
    packing = {"packing": True} if smoke else {}
    if kind == "lora":
        # The quickstart's SFT recipe (benchmarks/train_throughput.py); LoRA dropout 0 so the
        # extra loss pass sees the same network.
        stage = StageSpec(objective="sft", data=(fpb,), steps=steps, batch_size=4 if smoke else 16, lr=1e-3,
                          schedule="constant_with_warmup", max_length=128,
                          lora=LoraSpec(r=16, alpha=32, dropout=0.0), **packing)
    elif kind == "full":
        stage = StageSpec(objective="sft", data=(fpb,), steps=steps, batch_size=4 if smoke else 16, lr=3e-4,
                          schedule="constant_with_warmup", max_length=128, lora=None, **packing)
    else:
        wiki = DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation")
        stage = StageSpec(objective="pretrain", data=(wiki,), steps=steps, batch_size=2 if smoke else 16,
                          lr=3e-4, schedule="constant_with_warmup", max_length=128 if smoke else 512,
                          lora=None)
    figures = _train(opts, stage, model_dir, tmp, f"train-{kind}")
    figures["batch"] = f"{stage.batch_size} x max_length {stage.max_length}"
    _mfu(opts, checks, figures)
    if kind == "lora" and "mfu_6n" in figures:
        figures["mfu_note"] = "6N overstates LoRA's work: frozen weights get no weight gradients (~4N)"
    if kind == "lora" and figures["trainable_params"] >= figures["total_params"]:
        figures["failures"].append("LoRA stage trains every parameter")
    if kind != "lora" and figures["trainable_params"] != figures["total_params"]:
        figures["failures"].append("full fine-tuning does not train every parameter")
    return figures


def _score_requests(tokenizer, sentences: list[str]) -> list[tuple[list[int], list[int]]]:
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    reqs = []
    for s in sentences[:12]:  # a shared instruction (prefix pass), three labels, one long choice
        ctx = enc(f"{INSTRUCTION}Sentence: {s}\nSentiment:")
        reqs += [(ctx, enc(c)) for c in (" positive", " negative", " neutral", " positive and growing fast")]
    for s in sentences[12:16]:  # contexts of their own, multi-token continuations
        reqs.append((enc(s), enc(" The company did not comment on the figures.")))
    return reqs


def check_scorer(opts, model_dir: Path, data: Path) -> dict:
    device = need_cuda(opts)
    from taxon import resources as efficiency
    from taxon.evals.scoring import loglikelihoods
    from taxon.models import load_model

    cpu_model, tokenizer = load_model(str(model_dir), device="cpu")
    reqs = _score_requests(tokenizer, fpb_sentences(data, 16))
    tokens = sum(len(c) + len(x) for c, x in reqs)
    reference = loglikelihoods(cpu_model, reqs, tokenizer.pad_token_id, batch_size=16)
    del cpu_model
    model, _ = load_model(str(model_dir), device=str(device))
    figures, failures = {"requests": len(reqs), "tokens": tokens}, []
    for name, bf16 in (("fp32", False), ("bf16", True)):
        loglikelihoods(model, reqs[:4], tokenizer.pad_token_id, batch_size=16, bf16=bf16)  # warm-up
        efficiency.reset_peak_memory(device)
        t = time.perf_counter()
        got = loglikelihoods(model, reqs, tokenizer.pad_token_id, batch_size=16, bf16=bf16)
        seconds = time.perf_counter() - t
        diffs = [abs(g - r) for g, r in zip(got, reference, strict=True)]
        per_token = [d / len(x) for d, (_, x) in zip(diffs, reqs, strict=True)]
        figures[f"max_abs_diff_{name}"] = max(diffs)
        figures[f"max_diff_per_token_{name}"] = max(per_token)
        figures[f"tokens_per_s_{name}"] = tokens / seconds
        figures[f"peak_memory_mb_{name}"] = efficiency.peak_memory_mb(device)
        tol = opts.fp32_tol if not bf16 else opts.bf16_tol
        if max(per_token) > tol:
            failures.append(f"{name}: up to {max(per_token):.3g} nats per token from CPU fp32 (> {tol:g})")
        # The three labels of an item must rank as on the CPU wherever the CPU's margin is clear.
        for i in range(0, 48, 4):
            ref, new = reference[i:i + 3], got[i:i + 3]
            top = sorted(ref, reverse=True)
            if top[0] - top[1] > 4 * tol and ref.index(top[0]) != new.index(max(new)):
                failures.append(f"{name}: item {i // 4} picks another label than on the CPU")
    figures["tokens_per_s"] = figures["tokens_per_s_bf16"]
    figures["peak_memory_mb"] = figures["peak_memory_mb_bf16"]
    figures["reference_spread"] = max(reference) - min(reference)  # the comparison is not trivial
    figures["failures"] = failures
    return figures


def check_generation(opts, model_dir: Path, data: Path) -> dict:
    """generate on CUDA against a CPU fp32 copy: every token it emits must be a greedy choice of the
    CPU model given the same prefix (within a tolerance for near-ties), and the texts are compared."""
    device = need_cuda(opts)
    from taxon import resources as efficiency
    from taxon.evals import generation
    from taxon.evals.generation import generate
    from taxon.models import load_model

    cpu_model, tokenizer = load_model(str(model_dir), device="cpu")
    prompts = [f"{INSTRUCTION}Sentence: {s}\nSentiment:" for s in fpb_sentences(data, 8)]
    kw = {"max_new_tokens": opts.new_tokens, "stop": ["\n\n"], "batch_size": 8}
    reference = generate(cpu_model, tokenizer, prompts, **kw)
    model, _ = load_model(str(model_dir), device=str(device))
    figures, failures = {"prompts": len(prompts), "max_new_tokens": opts.new_tokens}, []
    for name, bf16 in (("fp32", False), ("bf16", True)):
        captured = []  # (prompt tokens, generated tokens) as taxon's decode loop hands them back
        original = generation._decode

        def spy(model, queue, *a, _original=original, _captured=captured, **k):
            prompts = {i: prompt for i, _, prompt in queue}
            for i, generated in _original(model, queue, *a, **k):
                _captured.append((prompts[i], list(generated)))
                yield i, generated

        generation._decode = spy
        try:
            generate(model, tokenizer, prompts[:2], **{**kw, "max_new_tokens": 2}, bf16=bf16)  # warm-up
            captured.clear()
            efficiency.reset_peak_memory(device)
            t = time.perf_counter()
            got = generate(model, tokenizer, prompts, **kw, bf16=bf16)
            seconds = time.perf_counter() - t
        finally:
            generation._decode = original
        new = sum(g.new_tokens for g in got)
        worst, checked = 0.0, 0
        for prompt, gen in captured:
            if not gen:
                continue
            with torch.no_grad():
                logits = cpu_model(input_ids=torch.tensor([prompt + gen])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            steps = lp[len(prompt) - 1 : len(prompt) - 1 + len(gen)]
            margin = steps.max(-1).values - steps.gather(-1, torch.tensor(gen).unsqueeze(-1)).squeeze(-1)
            worst, checked = max(worst, float(margin.max())), checked + len(gen)
        tol = opts.fp32_tol if not bf16 else opts.bf16_tol
        figures[f"greedy_worst_margin_{name}"] = worst
        figures[f"tokens_checked_{name}"] = checked
        same = sum(g.text == r.text for g, r in zip(got, reference, strict=True))
        figures[f"texts_equal_{name}"] = f"{same}/{len(got)}"
        figures[f"new_tokens_per_s_{name}"] = new / seconds
        figures[f"peak_memory_mb_{name}"] = efficiency.peak_memory_mb(device)
        if not checked:
            failures.append(f"{name}: nothing generated")
        if worst > tol:
            failures.append(f"{name}: a generated token is {worst:.3g} nats below the CPU's greedy "
                            f"choice (> {tol:g})")
    figures["tokens_per_s"] = figures["new_tokens_per_s_bf16"]
    figures["peak_memory_mb"] = figures["peak_memory_mb_bf16"]
    figures["failures"] = failures
    return figures


def _gpu_probe() -> dict:
    import os as _os

    import torch as _torch

    return {"cuda": _torch.cuda.is_available(), "count": _torch.cuda.device_count(),
            "visible": _os.environ.get("CUDA_VISIBLE_DEVICES")}


def check_ray(opts) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Skip("ray not installed") from None
    if not torch.cuda.is_available() and not (opts.cpu_smoke and opts.only and "ray" in opts.only):
        raise Skip("no CUDA")
    from taxon.study import executors

    ex = executors.make("ray", workers=2)
    try:
        got = ex.result(ex.submit(_gpu_probe))
    finally:
        ex.shutdown()
    failures = []
    if torch.cuda.is_available():
        if ex.gpus != 1:
            failures.append(f"the executor asks {ex.gpus} GPUs per task, not 1")
        if not got["cuda"] or got["count"] != 1:
            failures.append(f"the task sees {got['count']} GPUs (cuda {got['cuda']})")
    return {"gpus_per_task": ex.gpus, "gpus_seen": got["count"], "task": got, "failures": failures}


def check_ddp(opts, model_dir: Path, tmp: Path) -> dict:
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip("skipped: 1 GPU")
    from taxon.config import DataRef, StageSpec
    from taxon.study.launch import launch_stage

    fpb = DataRef(dataset="takala/financial_phrasebank", config="sentences_50agree")
    stage = StageSpec(objective="sft", data=(fpb,), steps=10, batch_size=16 * n, lr=1e-3, max_length=128)
    launcher = f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {n}"
    figures = launch_stage(launcher, stage, str(model_dir), str(tmp / "ddp"), "ddp", (), None)
    failures = [] if math.isfinite(figures["train_loss"]) else ["non-finite loss"]
    return {"processes": n, "tokens_per_s": figures["tokens_per_s"], "train_loss": figures["train_loss"],
            "failures": failures}


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", help="folder from benchmarks/gpu_assets.sh (model/ and data/); "
                                     "default: this machine's model cache and dataset mirror")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--budget", type=float, default=300, help="total seconds; checks that would not "
                    "fit are skipped and an overrun interrupts the running one (default 300)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per training check (default 30)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not known by name")
    ap.add_argument("--fp32-tol", type=float, default=2e-3,
                    help="fp32 CUDA vs CPU: logits, and nats per token")
    ap.add_argument("--bf16-tol", type=float, default=0.1, help="bf16 autocast vs CPU fp32, nats per token")
    ap.add_argument("--loss-tol", type=float, default=0.02, help="relative, TRL's loss vs labelled_loss")
    ap.add_argument("--only", nargs="+", help="run only these checks (names as printed)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run the GPU checks on the CPU with a 2-layer model, to test this script")
    ap.add_argument("--smoke-layers", type=int, default=2, help="layers of the --cpu-smoke model (default 2)")
    opts = ap.parse_args()
    names = ("environment", "varlen-attention", "train-lora-sft", "train-full-sft", "train-pretrain",
             "scorer", "generation", "ray", "ddp")
    unknown = sorted(set(opts.only or ()) - set(names))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: no such check; choose from {', '.join(names)}")
    checks = Checks(opts, opts.budget)

    def out_of_time(signum, frame):
        raise OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(opts.budget) + 1)
    model_src, data = setup_paths(opts)
    with tempfile.TemporaryDirectory(prefix="taxon-gpu-check-") as scratch:
        tmp = Path(scratch)
        os.environ.setdefault("TAXON_CACHE_DIR", str(tmp / "cache"))
        print(f"gpu_check: budget {opts.budget:.0f} s, model {model_src}, data {data}", flush=True)
        checks.run("environment", lambda: check_environment(opts, checks), 0)
        t = time.time()
        layers = opts.smoke_layers if opts.cpu_smoke else None
        model_dir = build_model(model_src, tmp / "smollm2-135m-random", layers)
        checks.info["model_build_seconds"] = round(time.time() - t, 1)
        cuda = torch.cuda.is_available()

        def gpu():
            return None if cuda or opts.cpu_smoke else "no CUDA"

        def ray_here():
            if importlib.util.find_spec("ray") is None:
                return "ray not installed"
            return None if cuda or (opts.cpu_smoke and opts.only) else "no CUDA"

        def gpus():
            return "no CUDA" if not cuda else "skipped: 1 GPU" if torch.cuda.device_count() < 2 else None

        checks.run("varlen-attention", lambda: check_varlen(opts, model_dir), 10, gpu)
        checks.run("train-lora-sft", lambda: check_train(opts, checks, model_dir, tmp, "lora"), 30, gpu)
        checks.run("train-full-sft", lambda: check_train(opts, checks, model_dir, tmp, "full"), 30, gpu)
        checks.run("train-pretrain", lambda: check_train(opts, checks, model_dir, tmp, "pretrain"), 30, gpu)
        checks.run("scorer", lambda: check_scorer(opts, model_dir, data), 20, gpu)
        checks.run("generation", lambda: check_generation(opts, model_dir, data), 20, gpu)
        checks.run("ray", lambda: check_ray(opts), 30, ray_here)
        checks.run("ddp", lambda: check_ddp(opts, model_dir, tmp), 60, gpus)
        signal.alarm(0)
    checks.write()
    failed = [r["name"] for r in checks.results if r["status"] == "FAIL" or r.get("budget_cut")]
    print(f"gpu_check: {len(checks.results)} checks in {time.time() - checks.t0:.0f} s; "
          + (f"FAILED or cut by the budget: {', '.join(failed)}" if failed else "no failures"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
