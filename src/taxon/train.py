"""One training stage: TRL's SFTTrainer with a spec's objective, data, LoRA and schedule.

`pretrain` packs text into fixed-length blocks (causal LM loss on every token); `sft` trains on
(prompt, completion) pairs with loss on the completion tokens only. The checkpoint folder holds
the adapter (LoRA) or the full model, the tokenizer, and `taxon_stage.json` (spec, base, figures).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from taxon import adapters, padding_free, resources, schedule
from taxon.config import StageSpec
from taxon.data import mixture, render
from taxon.evals.tasks import held_out_splits
from taxon.identity import stage_meta
from taxon.models import STAGE_META, atomic_save, load_model, use_bf16
from taxon.watch import Watcher, inherited_base


class _Progress(TrainerCallback):
    """One bar per stage: steps, loss, and non-padding tokens per second."""

    def __init__(self, desc: str, last: int | None = None):
        # last: where a checkpoint stops inside its whole run's max_steps
        self.desc, self.last, self.bar, self.t0, self.tokens0 = desc, last, None, 0.0, 0

    def on_train_begin(self, args, state, control, **kw):
        # A resumed wsd segment starts at the trunk's step, with the trunk's tokens already counted.
        total = min(state.max_steps, self.last or state.max_steps)
        self.bar = tqdm(total=total, initial=state.global_step, desc=self.desc, unit="step",
                        dynamic_ncols=True)
        self.t0, self.tokens0 = time.time(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is not None and logs and "loss" in logs:
            rate = (state.num_input_tokens_seen - self.tokens0) / max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{rate:.0f}")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


class _StageMeta(TrainerCallback):
    """Writes the stage's metadata into each intermediate checkpoint, so load_model reads it
    like a finished stage (a LoRA one is applied to the stage's base)."""

    def __init__(self, meta: dict):
        self.meta = meta

    def on_save(self, args, state, control, **kw):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            meta = {**self.meta, "figures": {"step": state.global_step}}
            if "id" in meta:  # an intermediate checkpoint is a model of its own
                meta["id"] = f"{meta['id']}-step{state.global_step}"
            (folder / STAGE_META).write_text(json.dumps(meta, indent=2))


class _KeepCheckpoints(TrainerCallback):
    """Saves the run's weights at the steps of `keep` ({step: (stage id, folder)}) as stages of
    their own, `schedule.checkpoint(stage, step)`, while the run goes on: each folder is what
    training that checkpoint alone writes (weights or adapter, tokenizer, metadata), so
    load_model and the stage cache take it like any stage."""

    def __init__(self, stage: StageSpec, keep: dict[int, tuple[str, str]], meta: dict, tokenizer):
        self.stage, self.keep, self.meta, self.tokenizer = stage, keep, meta, tokenizer
        self.tokens0, self.t0 = 0, 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.tokens0, self.t0 = state.num_input_tokens_seen, time.time()

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        # Called after the step's loss is logged (logging_steps=1); the weights are the step's.
        if not logs or "loss" not in logs or state.global_step not in self.keep:
            return
        if not state.is_world_process_zero:
            return
        sid, folder = self.keep[state.global_step]
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        # Figures of the steps so far: what this duration costs within the run (the measured
        # throughput in study/cost.py skips them; the run's own figures count that time).
        seconds = time.time() - self.t0
        figures = {"checkpoint_of": self.meta.get("id"), "step": state.global_step,
                   "train_seconds": seconds, "wall_seconds": seconds,
                   "train_loss": sum(losses) / len(losses) if losses else None,
                   "final_loss": losses[-1] if losses else None,
                   "tokens": int(state.num_input_tokens_seen - self.tokens0),
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "total_params": sum(p.numel() for p in model.parameters())}
        spec = schedule.checkpoint(self.stage, state.global_step)
        meta = {**self.meta, "spec": spec.model_dump(mode="json"), "id": sid, "figures": figures}
        atomic_save(model, self.tokenizer, Path(folder), meta)


def _stash_checkpoints(out: Path, scratch: Path) -> list[Path]:
    """Move the intermediate checkpoints out of `out` while the final model replaces it."""
    kept = []
    for folder in sorted(out.glob("checkpoint-*")) if out.is_dir() else []:
        kept.append(folder.rename(scratch / folder.name))
    return kept


def _per_device_batch(batch_size: int) -> int:
    """The spec's batch is the global batch: under DDP (`accelerate launch`, `torchrun`) each of
    the WORLD_SIZE processes takes its share, so a stage trains on the same examples however it
    is launched, and its checkpoint keeps its content-addressed identity."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        from taxon.errors import TaxonError

        raise TaxonError(f"batch_size {batch_size} does not split over {world} processes; "
                         f"use a multiple of {world}")
    return batch_size // world


def train_stage(stage: StageSpec, base: str, out: Path, desc: str = "train", *,
                save_steps: int | None = None, save_total_limit: int | None = None,
                callbacks: tuple[TrainerCallback, ...] = (),
                report_to: str | list[str] = "none", run_name: str | None = None,
                stage_id: str | None = None, keep: dict[int, tuple[str, str]] | None = None) -> dict:
    """Train `stage` starting from `base` (model name or parent checkpoint); write `out`.

    The checkpoint is written to a temporary sibling and renamed into place at the end, so a
    killed run never leaves a folder that looks complete. A wsd segment (`stage.segment`) that
    starts after step 0 continues `base`, its parent segment, exactly (see `schedule`).
    `save_steps`: also keep intermediate checkpoints in `out/checkpoint-N` (at most
    `save_total_limit`), each loadable by load_model. `callbacks`: extra TrainerCallbacks.
    `report_to` mirrors the training log to MLflow or W&B through the Trainer. Under
    `accelerate launch` (DDP) only the main process writes. `stage_id` (taxon.identity) goes into
    the checkpoint's metadata, so the folder keeps its identity wherever it is copied. `keep`
    ({step: (stage id, folder)}, steps from `stage.checkpoints`): the checkpoints this run writes
    as stages of their own. A checkpoint stage (`stage.run_steps`) trains its whole run's
    schedule and stream and stops at its own `steps`.
    """
    from peft import LoraConfig
    from trl import SFTConfig

    from taxon.labelled_loss import LabelledLossTrainer

    # transformers 5 warns that its own Trainer reads the deprecated gradient-checkpointing flag.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    # GPT-2's attention layers are Conv1D: peft turns on fan_in_fan_out itself, and says so.
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
    if stage.lora is not None and stage.lora.target_modules is None:  # a caller skipped it
        raise RuntimeError("train_stage got a LoRA stage without target_modules; resolve them "
                           "first with taxon.models.resolve_targets(stage, model)")
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resources.reset_peak_memory(device)  # the stage's own peak, as evaluations measure theirs
    base, resume = schedule.resume_point(stage, base)
    if stage.adapter == "continue":
        model, tokenizer, root = adapters.continue_adapter(stage, base)
    else:
        model, tokenizer = load_model(base)
        root = str(base)
        if stage.lora is None:  # a merged LoRA parent comes back frozen; full fine-tuning trains all
            model.requires_grad_(True)
    chat = render.uses_chat(tokenizer, None)
    train_set, summary = mixture.build(schedule.data_stage(stage), tokenizer, chat, held_out_splits)
    # Sources with a `holdout` (adapter sets): their held-out rows give the stage's eval loss.
    eval_set = mixture.holdout_set(stage, tokenizer, chat)
    bf16 = use_bf16(stage.precision)
    peft_config = None
    if stage.lora is not None and stage.adapter == "merge":
        peft_config = LoraConfig(
            r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
            target_modules=list(stage.lora.target_modules), task_type="CAUSAL_LM",
        )
    watcher = None
    if stage.watch is not None:  # forgetting watched: step 0 and every N steps
        parent = stage_meta(base) if Path(str(base)).is_dir() else None
        watcher = Watcher(stage.watch, tokenizer, getattr(model.config, "max_position_embeddings", None),
                          bf16, inherited_base(parent, stage.watch))
    packed = padding_free.applies(stage)
    scratch = Path(tempfile.mkdtemp(prefix="taxon-trainer-"))
    meta = {"spec": stage.model_dump(mode="json"), "base": root, "lora": stage.lora is not None}
    if stage_id is not None:
        meta["id"] = stage_id
    if root != str(base):  # a continued adapter applies to its first stage's base
        meta["parent"] = str(base)
    schedule_args = schedule.trainer_args(stage)  # length, learning-rate schedule, checkpointing
    if save_steps:
        schedule_args.update(save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit)
    args = SFTConfig(
        output_dir=str(out if save_steps else scratch),
        per_device_train_batch_size=_per_device_batch(stage.batch_size),
        gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.lr,
        **schedule_args,
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
        train_sampling_strategy="random" if stage.objective == "pretrain" else "group_by_length",
        completion_only_loss=stage.objective != "pretrain",
        logging_steps=1,
        report_to=report_to,
        run_name=run_name,
        disable_tqdm=True,
        # A padding-free row has no padding; "non_padding" would miss EOS tokens (EOS = pad).
        include_num_input_tokens_seen="all" if packed else "non_padding",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = LabelledLossTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_Progress(desc, stage.steps if stage.run_steps else None), schedule.ContinueSchedule(),
                   *([_StageMeta(meta)] if save_steps else []), *([watcher] if watcher else []),
                   *([schedule.StopAt(stage.steps)] if stage.run_steps else []),
                   *([_KeepCheckpoints(stage, keep, meta, tokenizer)] if keep else []),
                   *callbacks],
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    counter = trainer.data_collator = padding_free.TokenCounter(trainer.data_collator)
    t_train, cpu_train = time.time(), time.process_time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t_train
    cpu_s = time.process_time() - cpu_train
    # Mean completion-token loss per eval batch on the held-out rows, after the last step.
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    tokens = int(trainer.state.num_input_tokens_seen) - schedule.tokens_seen(resume)
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
        "peak_memory_mb": resources.peak_memory_mb(device),
        "trainable_params": trainable,
        "total_params": total,
        "bf16": bf16,
        "packing_efficiency": counter.efficiency(stage.steps * stage.grad_accum),
        "mixture": summary,
    }
    if eval_set is not None:
        figures.update(eval_loss=eval_loss, eval_examples=len(eval_set))
    if watcher is not None:
        figures["watch"] = watcher.figures()
    meta["figures"] = figures
    if trainer.is_world_process_zero():
        kept = _stash_checkpoints(out, scratch)
        atomic_save(trainer.model, tokenizer, out, meta, extra=schedule.resume_files(stage, scratch))
        for folder in kept:
            folder.rename(out / folder.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return figures
