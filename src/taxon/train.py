"""One training stage: TRL's SFTTrainer with a spec's objective, data, LoRA and schedule.

`pretrain` packs text into fixed-length blocks (causal LM loss on every token); `sft` trains on
(prompt, completion) pairs with loss on the completion tokens only. The checkpoint folder holds
the adapter (LoRA) or the full model, the tokenizer, and `taxon_stage.json` (spec, base, figures).
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from taxon import padding_free
from taxon.config import StageSpec
from taxon.data import mixture, render
from taxon.models import atomic_save, bf16_supported, load_model


class _Progress(TrainerCallback):
    """One bar per stage: steps, loss, and non-padding tokens per second."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.t0 = desc, None, 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is not None and logs and "loss" in logs:
            rate = state.num_input_tokens_seen / max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{rate:.0f}")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_supported())


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_stage(stage: StageSpec, base: str, out: Path, desc: str = "train") -> dict:
    """Train `stage` starting from `base` (model name or parent checkpoint); write `out`.

    The checkpoint is written to a temporary sibling and renamed into place at the end, so a
    killed run never leaves a folder that looks complete.
    """
    from peft import LoraConfig
    from trl import SFTConfig

    from taxon.labelled_loss import LabelledLossTrainer

    # transformers 5 warns that its own Trainer reads the deprecated gradient-checkpointing flag.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    t0 = time.time()
    model, tokenizer = load_model(base)
    chat = render.uses_chat(tokenizer, None)
    train_set, summary = mixture.build(stage, tokenizer, chat)
    bf16 = use_bf16(stage.precision)
    peft_config = None
    if stage.lora is not None:
        peft_config = LoraConfig(
            r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
            target_modules=list(stage.lora.target_modules), task_type="CAUSAL_LM",
        )
    packed = padding_free.applies(stage)
    scratch = Path(tempfile.mkdtemp(prefix="taxon-trainer-"))
    args = SFTConfig(
        output_dir=str(scratch),
        max_steps=stage.steps,
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.lr,
        lr_scheduler_type=stage.schedule,
        warmup_steps=round(stage.warmup_ratio * stage.steps),
        seed=stage.seed,
        data_seed=stage.seed,
        bf16=bf16,
        # mixture keeps every example within max_length; TRL refuses a max_length it cannot
        # enforce on padding-free rows.
        max_length=None if packed else stage.max_length,
        padding_free=packed,
        activation_checkpointing=False,  # TRL turns it on by default; small models do not need it
        packing=False,  # pretraining text arrives already packed into blocks (mixture.pack)
        # SFT batches of similar lengths waste less compute on padding; the grouping is seeded.
        train_sampling_strategy="group_by_length" if stage.objective == "sft" else "random",
        completion_only_loss=stage.objective == "sft",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # A padding-free row has no padding; "non_padding" would miss EOS tokens (EOS = pad).
        include_num_input_tokens_seen="all" if packed else "non_padding",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = LabelledLossTrainer(
        model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[_Progress(desc)],
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    counter = trainer.data_collator = padding_free.TokenCounter(trainer.data_collator)
    t_train, cpu_train = time.time(), time.process_time()
    result = trainer.train()
    train_s = time.time() - t_train
    cpu_s = time.process_time() - cpu_train
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    tokens = int(trainer.state.num_input_tokens_seen)
    figures = {
        "train_loss": result.training_loss,
        "final_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s else None,
        "train_seconds": train_s,
        "train_cpu_seconds": cpu_s,  # steadier than wall time when other work shares the CPU
        "wall_seconds": time.time() - t0,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": trainable,
        "total_params": total,
        "bf16": bf16,
        "packing_efficiency": counter.efficiency(stage.steps * stage.grad_accum),
        "mixture": summary,
    }
    meta = {"spec": stage.model_dump(mode="json"), "base": str(base), "lora": stage.lora is not None,
            "figures": figures}
    atomic_save(trainer.model, tokenizer, out, meta)
    shutil.rmtree(scratch, ignore_errors=True)
    return figures
