"""taxon's log-likelihood scorer against lm-evaluation-harness (hf backend), back to back.

Same model (smollm2-135m from taxon's cache, handed to lm-eval as pretrained=<folder>), same
items, same prompts: taxon renders every item (context and choice texts, exactly what its own
eval would score) into a jsonl file, and both sides score that file. lm-eval reads it through a
custom task YAML written into a temporary folder (multiple_choice, target_delimiter "", so each
choice is the continuation taxon scores). Both run in fp32 with the same batch size.

Three tasks that stress different things: FPB (single-token labels: lm-eval already groups the
choices of a context into one pass), TFNS (multi-token labels: lm-eval recomputes the context per
label) and MMLU 5-shot (the same five demonstrations before every question of a subject). TFNS is
scored with the Hub's own label names, " Bearish" / " Bullish" (two tokens each) / " Neutral",
through a user card that overrides the built-in one (taxon's own verbalisers are single tokens).

All prompts are plain text, not the chat template: lm-eval moves a context's trailing whitespace
into the continuation, so after a chat template's "assistant\n" it would also score the newline
token (about -0.003 nats on every choice) and the two sides would not score the same tokens.

Each side runs in its own fresh subprocess, so peak memory is that process's peak resident set
(`ru_maxrss`), and its increase during scoring is the peak minus the resident set just before
scoring starts (model loaded, items read). docs/s counts items over the scoring call only:
taxon's encode + `loglikelihoods`; lm-eval's `HFLM.loglikelihood` (which tokenises and scores),
timed inside `simple_evaluate`. Run it alone, without nice:

    flock /tmp/taxon-timing.lock .venv/bin/python benchmarks/eval_vs_lmeval.py

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

TARGETS = {"fpb": 1.2, "tfns": 2.5, "mmlu": 3.0}  # taxon docs/s over lm-eval docs/s
MAX_NATS = 1e-3


def hub_label_card(folder: Path) -> None:
    """A user card for TFNS with the Hub's label names, picked up through TAXON_CARDS_DIR."""
    import yaml

    from taxon.data.cards import BUILTIN_DIR

    card = yaml.safe_load((BUILTIN_DIR / "twitter_financial_news_sentiment.yaml").read_text())
    card["labels"] = ["Bearish", "Bullish", "Neutral"]
    card["templates"]["prompt"] = card["templates"]["prompt"].replace(
        "Answer negative, neutral or positive.", "Answer Bearish, Bullish or Neutral.")
    (folder / "cards").mkdir()
    (folder / "cards" / "tfns_hub_labels.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    os.environ["TAXON_CARDS_DIR"] = str(folder / "cards")


def export(args, folder: Path) -> dict[str, Path]:
    """Each task's items as taxon scores them, one jsonl file per task."""
    hub_label_card(folder)
    from taxon.evals.evaluate import multiple_choice_items
    from taxon.evals.tasks import get_task
    from taxon.models import load_tokenizer

    tok = load_tokenizer(args.model)
    plain = {"chat": False}
    tasks = {
        "fpb": (get_task("fpb").model_copy(update=plain), args.fpb),
        "tfns": (get_task("tfns").model_copy(update=plain), args.tfns),
        "mmlu": (get_task("mmlu").model_copy(
            update={**plain, "configs": tuple(args.mmlu_subjects.split(","))}), args.mmlu_limit),
    }
    files = {}
    for name in args.tasks.split(","):
        task, limit = tasks[name]
        items, _, _, chat = multiple_choice_items(tok, task, shots=task.shots, limit=limit, seed=args.seed)
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for it in items:
                f.write(json.dumps({"idx": it["idx"], "context": it["context"], "choices": it["choices"],
                                    "gold": it["gold"]}) + "\n")
        files[name] = path
        n_tokens = {len(tok(c, add_special_tokens=False)["input_ids"]) for c in items[0]["choices"]}
        print(f"{name}: {len(items)} items, {task.shots}-shot, choices {items[0]['choices']} "
              f"({sorted(n_tokens)} tokens)", flush=True)
    return files


def read_items(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_taxon(model_dir: str, path: Path, batch_size: int) -> dict:
    import torch

    from taxon.data.mixture import encode_pair
    from taxon.evals.scoring import loglikelihoods
    from taxon.models import load_model

    model, tok = load_model(model_dir, dtype=torch.float32, device="cpu")
    items = read_items(path)
    before = rss_mb()
    t0 = time.perf_counter()
    requests = [encode_pair(tok, it["context"], c) for it in items for c in it["choices"]]
    scores = loglikelihoods(model, requests, tok.pad_token_id, batch_size=batch_size, desc="taxon")
    seconds = time.perf_counter() - t0
    out, k = [], 0
    for it in items:
        out.append(scores[k : k + len(it["choices"])])
        k += len(it["choices"])
    return {"scores": out, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak_mb()}


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


def run_lmeval(model_dir: str, path: Path, batch_size: int) -> dict:
    name = f"taxon_bench_{path.stem}"
    samples, timing = run_lmeval_task(model_dir, name, TASK_YAML.format(name=name, path=path),
                                      batch_size, "loglikelihood")
    return {"scores": [[float(r[0]) for r in s["filtered_resps"]] for s in samples], **timing}


def child(side: str, model_dir: str, path: Path, batch_size: int, out: Path) -> None:
    run = run_taxon if side == "taxon" else run_lmeval
    out.write_text(json.dumps(run(model_dir, path, batch_size)))


def compare(name: str, items: list[dict], t: dict, lm: dict) -> dict:
    n = len(items)
    diffs = [abs(a - b) for x, y in zip(t["scores"], lm["scores"], strict=True)
             for a, b in zip(x, y, strict=True)]
    argmax = [max(range(len(s)), key=s.__getitem__) for s in t["scores"]]
    lm_argmax = [max(range(len(s)), key=s.__getitem__) for s in lm["scores"]]
    return {
        "task": name, "n": n,
        "taxon_docs_s": n / t["seconds"], "lmeval_docs_s": n / lm["seconds"],
        "speedup": lm["seconds"] / t["seconds"],
        "taxon_peak_mb": t["peak_mb"], "lmeval_peak_mb": lm["peak_mb"],
        "taxon_scoring_mb": t["peak_mb"] - t["rss_before_mb"],
        "lmeval_scoring_mb": lm["peak_mb"] - lm["rss_before_mb"],
        "agree": sum(a == b for a, b in zip(argmax, lm_argmax, strict=True)),
        "max_diff": max(diffs),
        "accuracy": sum(a == it["gold"] for a, it in zip(argmax, items, strict=True)) / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="fpb,tfns,mmlu")
    p.add_argument("--fpb", type=int, default=300, help="FPB items (seeded subsample of the test split)")
    p.add_argument("--tfns", type=int, default=300, help="TFNS items")
    p.add_argument("--mmlu-subjects", default="abstract_algebra,anatomy,high_school_geography")
    p.add_argument("--mmlu-limit", type=int, default=20, help="questions per MMLU subject")
    p.add_argument("--batch-size", type=int, default=16)
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
    folder = Path(tempfile.mkdtemp(prefix="taxon-vs-lmeval-"))
    rows = []
    for name, path in export(args, folder).items():
        items = read_items(path)
        t = spawn(__file__, "taxon", model_dir, path, args.batch_size, folder)
        lm = spawn(__file__, "lmeval", model_dir, path, args.batch_size, folder)
        rows.append(compare(name, items, t, lm))
        r = rows[-1]
        print(f"{name}: taxon {r['taxon_docs_s']:.2f} docs/s, lm-eval {r['lmeval_docs_s']:.2f} docs/s "
              f"({r['speedup']:.2f}x); agree {r['agree']}/{r['n']}; max |diff| {r['max_diff']:.2e} nats",
              flush=True)

    print(f"\nmodel {args.model} ({model_dir}), fp32, CPU, {os.cpu_count()} cores, "
          f"batch size {args.batch_size}")
    head = ("task", "items", "taxon docs/s", "lm-eval docs/s", "speed-up", "target", "taxon peak MB",
            "lm-eval peak MB", "taxon +MB", "lm-eval +MB", "agree", "max |diff| nats")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    ok = True
    for r in rows:
        target = TARGETS[r["task"]]
        fine = (r["speedup"] >= target and r["agree"] == r["n"] and r["max_diff"] <= MAX_NATS
                and r["taxon_peak_mb"] < r["lmeval_peak_mb"])
        ok &= fine
        print(" | ".join([
            r["task"], str(r["n"]), f"{r['taxon_docs_s']:.2f}", f"{r['lmeval_docs_s']:.2f}",
            f"{r['speedup']:.2f}x", f">= {target}x",
            f"{r['taxon_peak_mb']:.0f}", f"{r['lmeval_peak_mb']:.0f}",
            f"{r['taxon_scoring_mb']:.0f}", f"{r['lmeval_scoring_mb']:.0f}", f"{r['agree']}/{r['n']}",
            f"{r['max_diff']:.1e}",
        ]))
    print("\nall targets met" if ok else "\nsome targets NOT met (see the rows above)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    from taxon.errors import guarded

    sys.exit(guarded(main))
