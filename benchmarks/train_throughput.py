"""Training throughput: taxon's train_stage against a plain transformers Trainer, in one run.

Both sides get the same model, LoRA, examples, steps, optimiser settings and precision (bf16
autocast where supported, like taxon's `auto`). The plain side is what one would write by hand:
random batches padded per batch (DataCollatorForSeq2Seq, labels -100 on the prompt and padding).
taxon trains SFT in its default layout (`packing` auto: padding-free rows on CUDA, padded
batches on CPU) and, for reference, in the other one. Pretraining: both sides train on the
same full blocks of text (mixture.pack).

Prints useful (non-padding) tokens per second for each side, their ratio and the packing
efficiency; then what keeping packed examples apart costs in attention. Targets: >= 1.3x on SFT over
FPB, >= 1.0x on pretraining, packing efficiency >= 95%.

    flock /tmp/taxon-timing.lock python benchmarks/train_throughput.py --models tiny smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from taxon import padding_free  # noqa: E402
from taxon.config import DataRef, StageSpec  # noqa: E402
from taxon.data import mixture, render  # noqa: E402
from taxon.models import load_model, resolve_targets, use_bf16  # noqa: E402
from taxon.padding_free import TokenCounter  # noqa: E402
from taxon.train import train_stage  # noqa: E402

FPB = DataRef(dataset="takala/financial_phrasebank", config="sentences_50agree")
WIKI = DataRef(dataset="wikitext", config="wikitext-2-v1", split="validation")


def stages(steps: int) -> dict[str, StageSpec]:
    return {
        # The quickstart's SFT recipe: batches of 16 FPB pairs, LoRA r16 on the attention.
        "sft-fpb": StageSpec(objective="sft", data=(FPB,), steps=steps, batch_size=16, lr=1e-3,
                             schedule="constant_with_warmup", max_length=128),
        "pretrain-wikitext": StageSpec(objective="pretrain", data=(WIKI,), steps=steps,
                                       batch_size=4, lr=3e-4, max_length=256),
    }


def plain_trainer(stage: StageSpec, model_name: str) -> dict:
    """The same stage through transformers.Trainer with per-batch padding and random batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = load_model(model_name)
    model.train()
    data, _ = mixture.build(stage, tokenizer, render.uses_chat(tokenizer, None))
    if stage.objective == "sft":
        data = data.map(lambda e: {"labels": [t if m else -100 for t, m in
                                              zip(e["input_ids"], e["completion_mask"], strict=True)]},
                        remove_columns=["completion_mask"])
    else:
        data = data.map(lambda e: {"labels": e["input_ids"]})
    if stage.lora is not None:
        model = get_peft_model(model, LoraConfig(
            r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
            target_modules=list(stage.lora.target_modules), task_type="CAUSAL_LM"))
    counter = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=stage.steps, per_device_train_batch_size=stage.batch_size,
            gradient_accumulation_steps=stage.grad_accum, learning_rate=stage.lr,
            lr_scheduler_type=stage.schedule, warmup_steps=round(stage.warmup_ratio * stage.steps),
            seed=stage.seed, data_seed=stage.seed, bf16=use_bf16(stage.precision), logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counter)
        t0, c0 = time.time(), time.process_time()
        trainer.train()
        wall, cpu = time.time() - t0, time.process_time() - c0
    used = counter.batches[: stage.steps * stage.grad_accum]
    return {"tokens": sum(r for r, _ in used), "train_seconds": wall, "train_cpu_seconds": cpu,
            "packing_efficiency": counter.efficiency(stage.steps * stage.grad_accum)}


def taxon(stage: StageSpec, model_name: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return train_stage(stage, model_name, Path(out) / "stage", desc="taxon")


def line(name: str, f: dict) -> str:
    return (f"  {name:<22} {f['tokens']:>8} tokens  {f['train_seconds']:7.1f} s  "
            f"{f['tokens'] / f['train_seconds']:8.0f} tok/s  "
            f"{f['tokens'] / f['train_cpu_seconds']:8.0f} tok/cpu-s  "
            f"packing efficiency {f['packing_efficiency']:.1%}")


def attention_cost(cfg, lengths: list[int], reps: int = 5) -> str:
    """Forward+backward of one layer's sdpa over a padding-free row with the block-diagonal mask
    (what transformers builds from restarting position ids), against each example on its own."""
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    total = sum(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = causal & (seg[:, None] == seg[None, :])
    dtype = torch.bfloat16 if use_bf16("auto") else torch.float32
    q, k, v = (torch.randn(1, heads, total, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn().float().sum().backward()
            best = min(best, time.perf_counter() - t)
        return best

    packed = timed(lambda: sdpa(q, k, v, attn_mask=mask[None, None]))
    apart = timed(lambda: torch.cat([sdpa(*qkv, is_causal=True) for qkv in
                                     zip(*(x.split(lengths, dim=2) for x in (q, k, v)), strict=True)], dim=2))
    layers = cfg.num_hidden_layers
    return (f"  attention per step ({layers} layers, {len(lengths)} examples, {total} tokens): "
            f"block-diagonal mask over the row {packed * layers * 1e3:.0f} ms, "
            f"each example alone {apart * layers * 1e3:.0f} ms "
            f"(score entries {total ** 2} vs {sum(n * n for n in lengths)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--cases", nargs="+", default=["sft-fpb", "pretrain-wikitext"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-padded-reference", action="store_true",
                    help="skip taxon's own padded SFT run (packing: false)")
    opts = ap.parse_args()
    print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads, bf16 autocast {use_bf16('auto')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for model_name in opts.models:
        for case in opts.cases:
            stage = resolve_targets(stages(opts.steps)[case], model_name)
            print(f"\n{model_name} / {case}: {stage.steps} steps x {stage.batch_size} "
                  f"{'examples' if stage.objective == 'sft' else 'blocks'}, max_length {stage.max_length}",
                  flush=True)
            plain = plain_trainer(stage, model_name)
            ours = taxon(stage, model_name)
            print(line("transformers Trainer", plain))
            print(line(f"taxon (packing {'padding-free' if padding_free.applies(stage) else 'padded'})",
                       ours))
            if stage.objective == "sft" and not opts.no_padded_reference:
                other = not padding_free.applies(stage)  # the layout the default did not pick here
                print(line(f"taxon packing: {str(other).lower()}",
                           taxon(stage.model_copy(update={"packing": other}), model_name)))
            ratio = (ours["tokens"] / ours["train_seconds"]) / (plain["tokens"] / plain["train_seconds"])
            cpu_ratio = ((ours["tokens"] / ours["train_cpu_seconds"])
                         / (plain["tokens"] / plain["train_cpu_seconds"]))
            print(f"  ratio taxon / Trainer: {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu-time", flush=True)
            if stage.objective == "sft":
                model, tokenizer = load_model(model_name)
                data, _ = mixture.build(stage, tokenizer, render.uses_chat(tokenizer, None))
                print(attention_cost(model.config, [len(x) for x in data[: stage.batch_size]["input_ids"]]))


if __name__ == "__main__":
    from taxon.errors import guarded

    sys.exit(guarded(main))
