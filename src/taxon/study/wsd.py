"""Durations that share a trunk: the planner's rule for warmup-stable-decay stages.

Before its cooldown, a wsd run's learning rate does not depend on the run's length. So when
several experiments ask for the same wsd stage (same parent, same spec) at different `steps`,
the longest run's stable phase is trained once, cut where each shorter run's cooldown begins, and
every duration branches off it with only its own cooldown: 10k/25k/50k at decay_ratio 0.1 train
the trunk 0→9k, 9k→22.5k and 22.5k→45k once plus cooldowns of 1k, 2.5k and 5k steps (53.5k
steps instead of 85k). Any other schedule decays over the whole run, so each duration is its own
run.

Every member of a family draws from one data stream, built for the longest duration, and warms up
for the shortest member's warmup (`warmup_ratio` × its steps), so every cooldown starts after the
warmup. Each segment continues its parent exactly (`taxon.schedule`): a chain of segments gives
the weights of one uninterrupted run with that stream and schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from taxon.config import StageSpec, WsdSegment
from taxon.schedule import decay_steps, warmup_steps


@dataclass(frozen=True)
class Step:
    """One planned stage of a chain: its spec (`steps` = the stage's own length), what it is
    (`run`, `trunk` or `cooldown`) and a line saying why."""

    spec: StageSpec
    kind: str
    note: str


def _segment(spec: StageSpec, start: int, end: int, stream: int, warmup: int, cooldown: bool) -> StageSpec:
    return StageSpec.model_validate({
        **spec.model_dump(), "steps": end - start,
        "segment": WsdSegment(start=start, stream_steps=stream, warmup_steps=warmup,
                              cooldown=cooldown).model_dump(),
    })


def chains(spec: StageSpec, durations: list[int]) -> dict[int, list[Step]]:
    """For each duration, its chain of shared trunk segments and its own cooldown. Segments
    equal in spec and position are equal objects, so their content hashes coincide."""
    durations = sorted(set(durations))
    stream, shortest = durations[-1], durations[0]
    cut = {n: n - decay_steps(spec, n) for n in durations}
    warmup = min(warmup_steps(spec, shortest), min(cut.values()))
    edges = sorted({0, *cut.values()})
    trunk = {}  # end of a trunk segment -> that segment
    for a, b in zip(edges, edges[1:], strict=False):
        shared = sum(1 for n in durations if cut[n] >= b)
        trunk[b] = Step(_segment(spec, a, b, stream, warmup, False), "trunk",
                        f"wsd trunk {a}→{b} (shared by {shared} of {len(durations)} durations)")
    out = {}
    for n in durations:
        own = Step(_segment(spec, cut[n], n, stream, warmup, True), "cooldown",
                   f"wsd cooldown {cut[n]}→{n} (the {n}-step run)")
        out[n] = [trunk[b] for b in edges[1:] if b <= cut[n]] + [own]
    return out


def family(parent: str, spec: StageSpec) -> str:
    """The key that stages differing only in `steps` from the same parent share (the durations of
    one run, for wsd trunks here and checkpoints in `durations`)."""
    return parent + "\x1f" + spec.model_copy(update={"steps": 0}).canonical()


def expand(items: list[tuple[str, StageSpec]]) -> list[list[Step]]:
    """The planned stages each (parent id, spec) of one level of the stage graph becomes. wsd
    stages that differ only in `steps` from the same parent share a trunk; everything else is
    one stage, its own run."""
    durations: dict[str, set[int]] = {}
    for parent, spec in items:
        if _branches(spec):
            durations.setdefault(family(parent, spec), set()).add(spec.steps)
    planned: dict[str, dict[int, list[Step]]] = {}
    out = []
    for parent, spec in items:
        key = family(parent, spec) if _branches(spec) else None
        if key is None or len(durations[key]) < 2:
            why = "; no other duration to share a trunk with" if spec.schedule == "wsd" else ""
            out.append([Step(spec, "run", f"own run ({spec.schedule}{why})")])
            continue
        if key not in planned:
            planned[key] = chains(spec, sorted(durations[key]))
        out.append(planned[key][spec.steps])
    return out


def _branches(spec: StageSpec) -> bool:
    # A run that keeps checkpoints (or is one) trains whole: its checkpoints are of that run.
    return (spec.schedule == "wsd" and spec.segment is None and spec.steps > 0
            and not spec.checkpoints and spec.run_steps is None)
