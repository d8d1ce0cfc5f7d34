"""The two command lines and the study file set the same StageSpec/EvalSpec fields with the same
defaults: a default or option that drifts between them fails here."""

from __future__ import annotations

import inspect

from taxon import cli, seeds_cli
from taxon.config import EvalSpec, StageSpec, default

# Fields only a study's planner sets, or that the commands take in another shape.
# watch: a nested block (tasks, thresholds), set in study files only
# Planner-made (segment, run_steps, checkpoints) or structured fields; warmup_steps has no flag
# of its own yet (warmup_ratio has).
NOT_FLAGS = {"segment", "data", "replay", "objective", "lora", "watch", "run_steps", "checkpoints",
             "warmup_steps"}


def typer_defaults(fn) -> dict:
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        value = p.default
        out[name] = getattr(value, "default", value)
    return out


def test_taxon_train_covers_every_stage_field_with_its_default():
    defaults = typer_defaults(cli.train)
    covered = {f.split(".")[0] for f in cli.TRAIN_FLAGS.values()}
    assert set(StageSpec.model_fields) - NOT_FLAGS <= covered
    for flag, field in cli.TRAIN_FLAGS.items():
        assert defaults[flag] == default(StageSpec, field), flag
    assert {"lora_r", "lora_alpha", "lora_dropout", "as_", "config", "rate"} <= set(defaults)


def test_main_py_flags_take_the_spec_defaults():
    args = seeds_cli.parser().parse_args(["--model", "tiny"])
    for flag, field in seeds_cli.STAGE_FLAGS.items():
        assert getattr(args, flag) == default(StageSpec, field), flag
    for flag, field in seeds_cli.EVAL_FLAGS.items():
        assert getattr(args, flag) == default(EvalSpec, field), flag
    assert args.lora_alpha is None  # the spec's one rule: alpha = 2 x r


def test_one_flag_set_gives_one_stage_through_both_command_lines():
    """The same stage from main.py flags and from `taxon train` options: identical specs."""
    run = seeds_cli.plan_run(seeds_cli.parser().parse_args(
        ["--model", "tiny", "--dataset", "fpb", "--max_steps", "7", "--lora_r", "4",
         "--learning_rate", "1e-3", "--output_dir", "/tmp/taxon-flags-test-unused"]))
    d = {flag: default(StageSpec, field) for flag, field in cli.TRAIN_FLAGS.items()}
    spec = StageSpec.model_validate({
        "objective": "sft", "data": [{"dataset": "fpb"}], "steps": 7, "lr": 1e-3,
        "lora": {"r": 4, "dropout": d["lora_dropout"]},
        **{field: d[flag] for flag, field in cli.TRAIN_FLAGS.items()
           if "." not in field and flag not in ("steps", "lr")}})
    assert run.stage == spec
    assert run.stage.lora.alpha == 8
