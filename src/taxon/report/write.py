"""Write a built report: one self-contained HTML page (figures embedded as PNG, opens offline),
Markdown, LaTeX (booktabs) and CSV tables, the figures as PNG and SVG, and the answers as JSON.

Everything is written into a temporary sibling folder and renamed into place, so an interrupted
report never leaves half a folder."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import jinja2
import matplotlib.pyplot as plt
import pandas as pd

from taxon import __version__
from taxon.report.build import Report, to_json
from taxon.report.retention import retention_view

TEMPLATES = Path(__file__).with_name("templates")


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and pd.isna(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def summary_view(df: pd.DataFrame) -> pd.DataFrame:
    """The summary as people read it: mean ± sd [95% interval], min-max, gain, % of reference."""
    if df.empty:
        return df
    return pd.DataFrame(
        {
            "arm": df["arm"],
            "task": df["task"],
            "metric": df["metric"],
            "seeds": df["seeds"],
            "n": df["n"],
            "mean ± sd [95% CI]": [
                f"{m:.3f} ± {s:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, s, lo, hi in zip(df["mean"], df["sd"], df["ci_low"], df["ci_high"], strict=True)
            ],
            "min–max": [f"{a:.3f}–{b:.3f}" for a, b in zip(df["min"], df["max"], strict=True)],
            "gain vs zero-shot": [_fmt(g) if g is None or pd.isna(g) else f"{g:+.3f}" for g in df["gain"]],
            "% of reference": [
                _fmt(p) if p is None or pd.isna(p) else f"{p:.0f}%" for p in df["pct_of_reference"]
            ],
        }
    )


def compute_view(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    return pd.DataFrame(
        {
            "arm": df["arm"],
            "steps": [f"{s:,.0f}" for s in df["steps"]],
            "tokens": [f"{t:,.0f}" for t in df["tokens"]],
            "train wall s": [f"{s:.0f}" for s in df["train_s"]],
            "eval wall s": [f"{s:.0f}" for s in df["eval_s"]],
            "trainable params": [
                _fmt(p if p is None or pd.isna(p) else int(p)) for p in df["trainable_params"]
            ],
            "peak memory MB": [_fmt(m, 0) for m in df["peak_memory_mb"]],
            "est. GPU-hours": [f"{h:.2e}" for h in df["gpu_hours"]],
            "est. kWh": [f"{k:.2e}" for k in df["kwh"]],
            "est. $": [f"{u:.2e}" for u in df["usd"]],
        }
    )


def decision_view(df: pd.DataFrame) -> pd.DataFrame:
    """The decision table of watched stages: each run's change against the base and its verdict."""
    if df.empty:
        return df

    def change(v, rel):
        return "-" if v is None or pd.isna(v) else (f"{v:+.1%}" if rel else f"{v:+.3f}")

    return pd.DataFrame(
        {
            "run": [
                e + (" (choice)" if c else "") for e, c in zip(df["experiment"], df["choice"], strict=True)
            ],
            "steps": df["steps"],
            "domain loss": [f"{v:.3f}" for v in df["domain_loss"]],
            "general loss": [f"{v:.3f}" for v in df["general_loss"]],
            "domain vs base": [
                change(v, r) for v, r in zip(df["domain_vs_base"], df["relative"], strict=True)
            ],
            "general vs base": [
                change(v, r) for v, r in zip(df["general_vs_base"], df["relative"], strict=True)
            ],
            "verdict": df["verdict"],
            "stopped": [w or "-" for w in df["why"]],
        }
    )


def comparisons_view(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    effect = []
    for e, lo, hi in zip(df["effect"], df["effect_low"], df["effect_high"], strict=True):
        cell = _fmt(e) if e is None or pd.isna(e) else f"{e:+.3f}"
        if lo is not None and not pd.isna(lo):
            cell += f" [{lo:+.3f}, {hi:+.3f}]"
        effect.append(cell)
    return pd.DataFrame(
        {
            "question": df["question"],
            "task": df["task"],
            "metric": df["metric"],
            "a": df["a"],
            "b": df["b"],
            "test": df["test"],
            "n": df["n"],
            "statistic": [_fmt(s) for s in df["statistic"]],
            "p": [f"{p:.3g}" for p in df["p"]],
            "p (Holm)": [_fmt(p) if p is None or pd.isna(p) else f"{p:.3g}" for p in df["p_holm"]],
            "effect": effect,
            "decides": ["yes" if d else "" for d in df["decides"]],
        }
    )


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _md(view: pd.DataFrame, empty: str) -> str:
    return view.to_markdown(index=False) if not view.empty else empty


def adapter_set_sections(report: Report) -> list[tuple[str, pd.DataFrame, str]]:
    """Per adapter set: the transfer matrix, the adapters' figures, the validation checks."""
    out = []
    for v in report.adapter_sets:
        out += [
            (f"Adapter set {v.name}: transfer matrix (score, change against the base; "
             "◆ the adapter's own task)", v.transfer, "(no results)"),
            (f"Adapter set {v.name}: adapters", v.adapters.drop(columns=["folder"], errors="ignore"),
             "(no adapters trained)"),
            (f"Adapter set {v.name}: validation prompts passed (automatic checks)", v.validation,
             "(no validation prompts run)"),
        ]
    return out


def markdown(report: Report, figure_dir: str = "figures") -> str:
    lines = [f"# taxon report: {report.study or 'all experiments'}", "", "## Research questions", ""]
    for a in report.answers:
        lines += [f"### {a.id}: {a.ask}", "", f"**{a.answer}**", ""] + [f"- {e}" for e in a.evidence] + [""]
    lines += ["## Summary: arms over seeds", "", _md(summary_view(report.summary), "(no results)"), ""]
    lines += [f"{n}" for n in report.notes] + [""]
    if report.references:
        lines += ["References: " + "; ".join(report.references), ""]
    sections = [("Compute", compute_view(report.compute), "(nothing trained)"),
                ("Comparisons", comparisons_view(report.comparisons), "(no comparisons)")]
    if not report.decision.empty:
        sections.insert(0, ("Decision table: watched stages against the base",
                            decision_view(report.decision), ""))
    if not report.retention.empty:
        sections.insert(0, ("Retention: composite adapters against their members",
                            retention_view(report.retention), ""))
    for title, view, empty in sections:
        lines += [f"## {title}", "", _md(view, empty), ""]
    for title, view, empty in adapter_set_sections(report):
        lines += [f"## {title}", "", _md(view, empty), ""]
    lines += ["## Figures", ""]
    lines += [f"![{cap}]({figure_dir}/{key}.png)" for key, (cap, _) in report.figures.items()]
    lines += ["", "## Per experiment (each seed)", "", report.experiments_md, ""]
    return "\n".join(lines)


def _latex(df: pd.DataFrame, caption: str) -> str:
    if df.empty:
        return ""
    return df.style.hide(axis="index").to_latex(hrules=True, caption=caption, position="htbp")


def _replace(new: Path, out: Path) -> None:
    """Put folder `new` at `out`, moving an older report aside first. Two runs of one study that
    finish together each leave a whole report (the later one wins), never a mix."""
    for _ in range(10):
        if out.exists():
            old = out.with_name(f".{out.name}-old-{uuid.uuid4().hex[:8]}")
            try:
                out.rename(old)
            except FileNotFoundError:
                pass  # another run moved it first
            else:
                shutil.rmtree(old, ignore_errors=True)
        try:
            new.rename(out)
            return
        except OSError:  # another run put its report there in between: try again
            continue
    raise OSError(f"could not replace the report folder {out}; another process keeps writing it")


def write(report: Report, out: Path, store_path: Path, provenance: str = "") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()
        embedded = {}
        for key, (caption, fig) in report.figures.items():
            png = _png(fig)
            (tmp / "figures" / f"{key}.png").write_bytes(png)
            fig.savefig(tmp / "figures" / f"{key}.svg", format="svg", metadata={"Date": None})
            plt.close(fig)
            embedded[key] = {"caption": caption, "png": base64.b64encode(png).decode()}
        if not report.decision.empty:
            decision_view(report.decision).to_csv(tmp / "tables" / "decision.csv", index=False)
        if not report.retention.empty:
            report.retention.to_csv(tmp / "tables" / "retention.csv", index=False)
            (tmp / "tables" / "retention.md").write_text(_md(retention_view(report.retention), ""))
        if not report.large_models.empty:
            report.large_models.to_csv(tmp / "tables" / "large_models.csv", index=False)
        for v in report.adapter_sets:  # every figure and answer behind the adapter-set sections
            for part in ("transfer", "adapters", "validation", "answers"):
                getattr(v, part).to_csv(tmp / "tables" / f"adapter_set-{v.name}-{part}.csv", index=False)
        tables = {
            "summary": (report.summary, summary_view(report.summary), "Arms over seeds"),
            "compute": (report.compute, compute_view(report.compute), "Compute per arm"),
            "comparisons": (report.comparisons, comparisons_view(report.comparisons), "Comparisons"),
        }
        html_tables = {}
        for name, (raw, view, caption) in tables.items():
            raw.to_csv(tmp / "tables" / f"{name}.csv", index=False)
            (tmp / "tables" / f"{name}.tex").write_text(_latex(view, caption))
            (tmp / "tables" / f"{name}.md").write_text(_md(view, ""))
            html_tables[name] = (
                view.to_html(index=False, border=0, escape=True) if not view.empty else "<p>(none)</p>"
            )
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
        html = env.get_template("report.html.j2").render(
            title=report.study or "all experiments",
            written=time.strftime("%Y-%m-%d %H:%M"),
            version=__version__,
            store=str(store_path),
            provenance=provenance,
            answers=report.answers,
            summary=html_tables["summary"],
            compute=html_tables["compute"],
            comparisons=html_tables["comparisons"],
            notes=report.notes,
            references=report.references,
            figures=embedded,
            experiments=f"<pre>{jinja2.filters.escape(report.experiments_md)}</pre>",
            large_models=report.large_models.to_dict("records"),
            adapter_sets=[(title, view.to_html(index=False, border=0)
                           if not view.empty else f"<p>{empty}</p>")
                          for title, view, empty in adapter_set_sections(report)],
            decision=decision_view(report.decision).to_html(index=False, border=0)
            if not report.decision.empty
            else "",
            retention=retention_view(report.retention).to_html(index=False, border=0)
            if not report.retention.empty
            else "",
        )
        (tmp / "report.html").write_text(html)
        (tmp / "report.md").write_text(markdown(report))
        (tmp / "answers.json").write_text(to_json(report))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.html"


def questions_of(store, study: str | None) -> list:
    """The research questions the study file declared (kept in the store by `taxon study run`)."""
    from taxon.config import QuestionSpec

    spec = store.study_spec(study) if study else None
    return [QuestionSpec.model_validate(q) for q in (spec or {}).get("questions") or []]


def report_study(store, study: str | None, out: Path) -> tuple[Path, Report]:
    """Build the report of `study` (or of every experiment in the store) and write it to `out`."""
    from taxon.report.build import build

    report = build(store, study, questions_of(store, study))
    return write(report, out, store.path), report
