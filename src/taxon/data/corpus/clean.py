"""Cleaning a corpus: boilerplate lines, short or non-text lines, language, eval-set n-grams, and
exact and near-duplicate documents. Each step counts what it removed, so the report can say what
went and why.

Near duplicates use MinHash over word shingles with LSH banding (datasketch): with `b` bands of
`r` rows, two documents of Jaccard similarity s become candidates with probability
1 - (1 - s^r)^b, whose steepest point is the implied threshold (1/b)^(1/r). Candidates are kept
as duplicates only if their estimated similarity reaches the requested threshold.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from taxon.errors import TaxonError

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class CleanSettings:
    min_words: int = 4  # a line with fewer words is dropped (headings, menu items, stray labels)
    min_alpha: float = 0.6  # share of letters and spaces a line needs to count as text
    min_doc_words: int = 30  # a document left with fewer words is dropped
    boilerplate_share: float = 0.3  # a line in at least this share of a source's documents ...
    boilerplate_min_docs: int = 3  # ... and in at least this many of them is boilerplate
    languages: tuple[str, ...] = ()  # e.g. ("en",); empty: no language filter
    ngram: int = 8  # decontamination: word n-grams shared with an eval test text
    shingle: int = 5  # near duplicates: word shingles
    num_perm: int = 128
    threshold: float = 0.8  # Jaccard similarity from which a document is a near duplicate


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalized(text: str) -> str:
    return " ".join(words(text))


# --- boilerplate and line filters -----------------------------------------------------------

def boilerplate_lines(texts: list[str], s: CleanSettings) -> set[str]:
    """Normalised lines that recur across a source's documents (navigation, licence notes,
    generated-by lines): in at least `boilerplate_share` of them and `boilerplate_min_docs`."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update({normalized(line) for line in text.splitlines() if line.strip()})
    need = max(s.boilerplate_min_docs, s.boilerplate_share * len(texts))
    return {line for line, n in counts.items() if n >= need and line}


def line_reason(line: str, s: CleanSettings, boilerplate: set[str]) -> str | None:
    """Why a line goes, or None when it stays."""
    stripped = line.strip()
    if not stripped:
        return None  # blank lines separate paragraphs; collapsed later
    if normalized(stripped) in boilerplate:
        return "boilerplate line"
    if len(words(stripped)) < s.min_words:
        return "short line"
    alpha = sum(c.isalpha() or c.isspace() for c in stripped) / len(stripped)
    if alpha < s.min_alpha:
        return "non-text line"
    return None


def collapse(lines: list[str]) -> str:
    """Lines joined, runs of blank lines made one."""
    out: list[str] = []
    for line in lines:
        if not line.strip():
            if out and out[-1]:
                out.append("")
            continue
        out.append(line.strip())
    return "\n".join(out).strip()


# --- language -------------------------------------------------------------------------------

def language(text: str) -> str:
    import py3langid

    return py3langid.classify(text[:4000])[0]


# --- decontamination ------------------------------------------------------------------------

def _gram_key(gram) -> bytes:
    return hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest()


@dataclass
class Contamination:
    """The word n-grams of every eval task's test text, to find them in training text."""

    n: int
    grams: set[bytes] = field(default_factory=set)
    texts: int = 0
    too_short: int = 0  # test texts with fewer than n words (not checked)
    tasks: dict[str, int] = field(default_factory=dict)  # task -> texts read

    def add(self, task: str, texts: list[str]) -> None:
        self.tasks[task] = self.tasks.get(task, 0) + len(texts)
        for text in texts:
            w = words(text)
            self.texts += 1
            if len(w) < self.n:
                self.too_short += 1
                continue
            for i in range(len(w) - self.n + 1):
                self.grams.add(_gram_key(w[i : i + self.n]))

    def contaminated_lines(self, lines: list[str]) -> set[int]:
        """Indices of the lines that an eval n-gram touches, also across line breaks (a test
        sentence wrapped over two lines removes both)."""
        if not self.grams:
            return set()
        flat: list[tuple[str, int]] = [(w, i) for i, line in enumerate(lines) for w in words(line)]
        hit: set[int] = set()
        for k in range(len(flat) - self.n + 1):
            gram = [w for w, _ in flat[k : k + self.n]]
            if _gram_key(gram) in self.grams:
                hit.update(i for _, i in flat[k : k + self.n])
        return hit


# --- duplicates -----------------------------------------------------------------------------

class Deduplicator:
    """Exact duplicates by the hash of the normalised text; near duplicates by MinHash LSH."""

    def __init__(self, s: CleanSettings):
        try:
            from datasketch import MinHashLSH
        except ImportError as e:  # a dependency; say how to get it
            raise TaxonError("near-duplicate removal needs datasketch; pip install datasketch") from e
        self.s = s
        self.lsh = MinHashLSH(threshold=s.threshold, num_perm=s.num_perm)
        self.hashes: dict[str, str] = {}
        self.minhashes: dict[str, object] = {}

    @property
    def bands(self) -> int:
        return self.lsh.b

    @property
    def rows(self) -> int:
        return self.lsh.r

    def parameters(self) -> dict:
        b, r = self.bands, self.rows
        return {"method": "MinHash LSH (datasketch)", "num_perm": self.s.num_perm,
                "shingle_words": self.s.shingle, "threshold": self.s.threshold, "bands": b,
                "rows": r, "implied_threshold": round((1 / b) ** (1 / r), 4),
                "exact": "sha256 of the lower-cased words"}

    def _minhash(self, text: str):
        from datasketch import MinHash

        w = words(text)
        k = self.s.shingle
        shingles = {" ".join(w[i : i + k]) for i in range(max(1, len(w) - k + 1))}
        m = MinHash(num_perm=self.s.num_perm, seed=1)
        m.update_batch([x.encode() for x in shingles])
        return m

    def check(self, key: str, text: str) -> tuple[str, str] | None:
        """(reason, the key of the document it duplicates) or None; a kept document is added."""
        h = hashlib.sha256(normalized(text).encode()).hexdigest()
        if h in self.hashes:
            return "exact duplicate", self.hashes[h]
        m = self._minhash(text)
        for other in self.lsh.query(m):
            if m.jaccard(self.minhashes[other]) >= self.s.threshold:
                return "near duplicate", other
        self.hashes[h] = key
        self.minhashes[key] = m
        self.lsh.insert(key, m)
        return None
