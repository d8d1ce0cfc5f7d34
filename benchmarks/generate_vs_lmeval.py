"""taxon's generation path against lm-evaluation-harness's `generate_until` (hf backend), back to back.

Same model (smollm2-135m from taxon's cache, handed to lm-eval as pretrained=<folder>), same items,
same prompts, same stop strings and token budget: taxon renders every item's prompt (exactly what
its own eval would give the model) into a jsonl file, and both sides generate from that file.
lm-eval reads it through a custom task YAML written into a temporary folder (generate_until,
greedy, `until` = the task's stop strings, `max_gen_toks` = the task's `max_new_tokens`). Both run
in fp32 on the CPU with the same batch size; the outputs are compared string for string.

Two tasks:
- GSM8K 5-shot: the same five train demonstrations before every question (`first_n`, as lm-eval's
  MMLU draws them; taxon's own gsm8k task draws five per item with the seed, and prompts that share
  no demonstrations share no prefix to encode once). The demonstrations are about 90% of each
  prompt, and taxon encodes them once for the whole run.
- NER zero-shot: a long fixed instruction (with its worked example) before each sentence.

Prompts are plain text, not the chat template, as in eval_vs_lmeval.py.

What taxon's side does differently (`taxon.evals.generation`): a shared prefix is encoded once;
waiting prompts join the rows still decoding as rows end (continuous batching); each pass also
checks up to 4 tokens guessed from where the text repeats itself or its prompt (prompt-lookup
decoding), keeping only those greedy decoding confirms; the cache grows in place. lm-eval runs
`model.generate` batch by batch, each batch to its longest row.

Each side runs in its own fresh subprocess, so peak memory is that process's peak resident set
(`ru_maxrss`); its increase during generation is the peak minus the resident set just before
generation starts (model loaded, items read). items/s counts items over the generation call only:
taxon's `generate` (tokenises, shares prefixes, decodes); lm-eval's `HFLM.generate_until`, timed
inside `simple_evaluate`. Run it alone, without nice:

    flock /tmp/taxon-timing.lock .venv/bin/python benchmarks/generate_vs_lmeval.py

Needs the optional extra `bench` (pip install -c constraints.txt -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lmeval_sides import peak_mb, rss_mb, spawn
from lmeval_sides import run_lmeval as run_lmeval_task

TARGET = 2.0  # taxon items/s over lm-eval items/s, on every task


def export(args, folder: Path) -> dict[str, Path]:
    """Each task's prompts as taxon gives them to the model, one jsonl file per task (its first
    line: the generation settings)."""
    from taxon.evals.evaluate import generation_items
    from taxon.evals.tasks import get_task
    from taxon.models import load_tokenizer

    tok = load_tokenizer(args.model)
    plain = {"chat": False}
    tasks = {
        "gsm8k": (get_task("gsm8k").model_copy(update={**plain, "fewshot_sampler": "first_n"}), args.gsm8k),
        "ner": (get_task("ner").model_copy(update=plain), args.ner),
    }
    files = {}
    for name in args.tasks.split(","):
        task, limit = tasks[name]
        max_new = min(task.max_new_tokens, args.max_new_tokens or task.max_new_tokens)
        its, _, contexts, _ = generation_items(tok, task, shots=task.shots, limit=limit, seed=args.seed)
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            f.write(json.dumps({"stop": list(task.stop), "max_new_tokens": max_new}) + "\n")
            for it, context in zip(its, contexts, strict=True):
                f.write(json.dumps({"idx": it.idx, "context": context}) + "\n")
        files[name] = path
        lengths = sorted(len(tok(c, add_special_tokens=False)["input_ids"]) for c in contexts)
        print(f"{name}: {len(its)} items, {task.shots}-shot, prompts {lengths[0]}-{lengths[-1]} tokens, "
              f"max_new_tokens {max_new}, stop {list(task.stop)}", flush=True)
    return files


def read_items(path: Path) -> tuple[dict, list[dict]]:
    with open(path) as f:
        settings, *items = [json.loads(line) for line in f]
    return settings, items


def run_taxon(model_dir: str, path: Path, batch_size: int) -> dict:
    import torch

    from taxon.evals.generation import generate
    from taxon.models import load_model

    model, tok = load_model(model_dir, dtype=torch.float32, device="cpu")
    settings, items = read_items(path)
    before = rss_mb()
    t0 = time.perf_counter()
    gens = generate(model, tok, [it["context"] for it in items], max_new_tokens=settings["max_new_tokens"],
                    stop=settings["stop"], batch_size=batch_size, desc="taxon")
    seconds = time.perf_counter() - t0
    return {"texts": [g.text for g in gens], "prompts": [it["context"] for it in items],
            "new_tokens": sum(g.new_tokens for g in gens), "seconds": seconds, "rss_before_mb": before,
            "peak_mb": peak_mb()}


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: ""
generation_kwargs:
  until: {stop}
  max_gen_toks: {max_new_tokens}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
"""


def run_lmeval(model_dir: str, path: Path, batch_size: int) -> dict:
    settings, _ = read_items(path)
    name = f"taxon_gen_bench_{path.stem}"
    # lm-eval reads the items (without the settings line) from a file of their own
    data = path.with_name(f"{path.stem}-items.jsonl")
    data.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    task_yaml = TASK_YAML.format(name=name, path=data, stop=json.dumps(settings["stop"]),
                                 max_new_tokens=settings["max_new_tokens"])
    samples, timing = run_lmeval_task(model_dir, name, task_yaml, batch_size, "generate_until")
    return {"texts": [s["resps"][0][0] for s in samples], "prompts": [s["arguments"][0][0] for s in samples],
            **timing}


def child(side: str, model_dir: str, path: Path, batch_size: int, out: Path) -> None:
    run = run_taxon if side == "taxon" else run_lmeval
    out.write_text(json.dumps(run(model_dir, path, batch_size)))


def compare(name: str, t: dict, lm: dict) -> dict:
    n = len(t["texts"])
    return {
        "task": name, "n": n,
        "taxon_items_s": n / t["seconds"], "lmeval_items_s": n / lm["seconds"],
        "speedup": lm["seconds"] / t["seconds"],
        "taxon_peak_mb": t["peak_mb"], "lmeval_peak_mb": lm["peak_mb"],
        "taxon_gen_mb": t["peak_mb"] - t["rss_before_mb"],
        "lmeval_gen_mb": lm["peak_mb"] - lm["rss_before_mb"],
        "same_prompts": sum(a == b for a, b in zip(t["prompts"], lm["prompts"], strict=True)),
        "identical": sum(a == b for a, b in zip(t["texts"], lm["texts"], strict=True)),
        "differ": [k for k, (a, b) in enumerate(zip(t["texts"], lm["texts"], strict=True)) if a != b],
        "new_tokens": t["new_tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="gsm8k,ner")
    p.add_argument("--gsm8k", type=int, default=24, help="GSM8K items (seeded subsample of the test split)")
    p.add_argument("--ner", type=int, default=48, help="NER items")
    p.add_argument("--max-new-tokens", type=int,
                   help="cap on each task's max_new_tokens (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    # internal: one side in its own process
    p.add_argument("--child", choices=("taxon", "lmeval"))
    p.add_argument("--model-dir")
    p.add_argument("--items", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.items, args.batch_size, args.out)
        return

    from taxon.models import prepare

    model_dir = str(prepare(args.model))
    folder = Path(tempfile.mkdtemp(prefix="taxon-gen-vs-lmeval-"))
    rows = []
    for name, path in export(args, folder).items():
        t = spawn(__file__, "taxon", model_dir, path, args.batch_size, folder)
        lm = spawn(__file__, "lmeval", model_dir, path, args.batch_size, folder)
        rows.append(compare(name, t, lm))
        r = rows[-1]
        print(f"{name}: taxon {r['taxon_items_s']:.3f} items/s, lm-eval {r['lmeval_items_s']:.3f} items/s "
              f"({r['speedup']:.2f}x); identical outputs {r['identical']}/{r['n']}"
              + (f" (differ: items {r['differ']})" if r["differ"] else ""), flush=True)

    print(f"\nmodel {args.model} ({model_dir}), fp32, CPU, {os.cpu_count()} cores, "
          f"batch size {args.batch_size}")
    head = ("task", "items", "taxon items/s", "lm-eval items/s", "speed-up", "target", "taxon peak MB",
            "lm-eval peak MB", "taxon +MB", "lm-eval +MB", "same prompts", "identical outputs")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    ok = True
    for r in rows:
        fine = (r["speedup"] >= TARGET and r["identical"] == r["n"] and r["same_prompts"] == r["n"]
                and r["taxon_peak_mb"] < r["lmeval_peak_mb"])
        ok &= fine
        print(" | ".join([
            r["task"], str(r["n"]), f"{r['taxon_items_s']:.3f}", f"{r['lmeval_items_s']:.3f}",
            f"{r['speedup']:.2f}x", f">= {TARGET}x",
            f"{r['taxon_peak_mb']:.0f}", f"{r['lmeval_peak_mb']:.0f}",
            f"{r['taxon_gen_mb']:.0f}", f"{r['lmeval_gen_mb']:.0f}", f"{r['same_prompts']}/{r['n']}",
            f"{r['identical']}/{r['n']}",
        ]))
    print("\nall targets met" if ok else "\nsome targets NOT met (see the rows above)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    from taxon.errors import guarded

    sys.exit(guarded(main))
