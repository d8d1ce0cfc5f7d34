"""The client of an OpenAI-compatible endpoint: concurrency and requests-per-minute limits, retries
(`taxon.endpoints.send`), a request cache, usage and cost.

- **Cache.** Replies live in one SQLite file under the cache folder (`<TAXON_CACHE_DIR>/api/
  cache.sqlite`), keyed by the endpoint's URL, the model, its fingerprint and the full request
  body. Only successful, deterministic replies are kept (temperature 0, one choice, every choice
  finished by `stop` or `length`), each in its own transaction as it arrives: a rerun sends
  nothing, and a killed run keeps every reply it received. Keys and headers are never part of it.
- **Limits.** At most `concurrency` requests in flight and `rpm` started in any 60 s.
- **Usage.** Prompt and completion tokens as the server reports them (`usage`), for every reply a
  result used (cached ones too: what the result cost), and separately what this run sent; the cost
  from the endpoint's price table.
- **Echo check.** `check_echo` asks once (through the cache) for a prompt's log-probabilities with
  `echo`; a server that does not give one per prompt token makes log-likelihood scoring refuse
  with one line, instead of scoring at chance.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field

from taxon.config import digest
from taxon.endpoints import ApiModel, cache_file, fingerprint, http_client, redact, send
from taxon.errors import TaxonError

ECHO_PROBE = "The quick brown fox jumps over the lazy dog."


class ReplyCache:
    """Replies by request key; one connection per thread (SQLite WAL, 60 s lock timeout)."""

    def __init__(self, path=None):
        self.path = path or cache_file()
        self._local = threading.local()
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, url TEXT NOT NULL, "
                       "model TEXT NOT NULL, fingerprint TEXT NOT NULL, path TEXT NOT NULL, "
                       "request TEXT NOT NULL, reply TEXT NOT NULL, created REAL NOT NULL)")

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _db(self):
        if getattr(self._local, "db", None) is None:
            self._local.db = self._connect()
        return self._local.db

    def get(self, key: str) -> dict | None:
        row = self._db().execute("SELECT reply FROM replies WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, url: str, model: str, fp: str, path: str, request: dict, reply: dict) -> None:
        db = self._db()
        with db:  # one transaction per reply
            db.execute("INSERT OR REPLACE INTO replies VALUES (?,?,?,?,?,?,?,?)",
                       (key, url, model, fp, path, json.dumps(request, sort_keys=True),
                        json.dumps(reply), time.time()))


class RateLimit:
    """At most `rpm` requests started in any 60 s window."""

    def __init__(self, rpm: int, clock=time.monotonic, sleep=time.sleep):
        self.rpm, self.clock, self.sleep = rpm, clock, sleep
        self.starts: deque[float] = deque()
        self.lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self.lock:
                now = self.clock()
                while self.starts and now - self.starts[0] >= 60:
                    self.starts.popleft()
                if len(self.starts) < self.rpm:
                    self.starts.append(now)
                    return
                delay = 60 - (now - self.starts[0])
            self.sleep(max(delay, 0.01))


@dataclass
class Usage:
    requests: int = 0  # sent this run
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0  # every reply used (sent or cached)
    completion_tokens: int = 0
    sent_prompt_tokens: int = 0  # sent this run
    sent_completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reply: dict, cached: bool) -> None:
        usage = reply.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        with self.lock:
            self.prompt_tokens += p
            self.completion_tokens += c
            if cached:
                self.cache_hits += 1
            else:
                self.requests += 1
                self.sent_prompt_tokens += p
                self.sent_completion_tokens += c


def deterministic(body: dict) -> bool:
    return body.get("temperature", 1) == 0 and body.get("n", 1) == 1


def finished(reply: dict) -> bool:
    choices = reply.get("choices")
    return (isinstance(choices, list) and bool(choices) and "error" not in reply
            and all(c.get("finish_reason") in ("stop", "length", None) for c in choices))


class Client:
    """Requests to one model of one endpoint. `fp`: its fingerprint (asked of the server unless
    given)."""

    def __init__(self, api: ApiModel, fp: str | None = None, cache: ReplyCache | None = None):
        self.api = api
        self.fp = fp if fp is not None else fingerprint(api)
        self.cache = cache or ReplyCache()
        self.limit = RateLimit(api.spec.rpm)
        self.usage = Usage()
        self.http = http_client(api)
        self.seen: set[str] = set()  # models and system fingerprints the replies named

    def close(self) -> None:
        self.http.close()

    def key(self, path: str, body: dict) -> str:
        return digest(self.api.url, self.api.model, self.fp, path,
                      json.dumps(body, sort_keys=True, separators=(",", ":")), length=32)

    def post(self, path: str, body: dict) -> dict:
        """POST `body` (the model is added) to `path`, from the cache when it holds the reply."""
        body = {"model": self.api.model, **body}
        key = self.key(path, body)
        reply = self.cache.get(key)
        cached = reply is not None
        if reply is None:
            self.limit.wait()
            reply = send(self.http, self.api, "POST", path, body, on_retry=self._retried)
            if deterministic(body) and finished(reply):
                self.cache.put(key, self.api.url, self.api.model, self.fp, path, body, reply)
        self.usage.add(reply, cached)
        for name in ("model", "system_fingerprint"):
            if reply.get(name):
                self.seen.add(f"{name}={reply[name]}")
        return reply

    def _retried(self, status, wait_s) -> None:
        with self.usage.lock:
            self.usage.retries += 1

    def map(self, fn: Callable, items: Sequence, on_done: Callable | None = None) -> list:
        """`fn(item)` for each item, `concurrency` at a time, in order. The first error stops the
        rest (replies already received stay in the cache)."""
        out: list = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.api.spec.concurrency) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()  # type: ignore[misc]
                    out[futures[f]] = f.result()
                    if on_done is not None:
                        on_done()
        return out

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.api.spec.price_of(self.api.model)
        return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6

    def summary(self) -> dict:
        u = self.usage
        return {"requests": u.requests, "cache_hits": u.cache_hits, "retries": u.retries,
                "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "cost_usd": self.cost(u.prompt_tokens, u.completion_tokens),
                "spent_usd": self.cost(u.sent_prompt_tokens, u.sent_completion_tokens)}

    def redact(self, text: str) -> str:
        return redact(text, self.api.key)

    # --- log-likelihoods through completions with echo ------------------------------------------

    def echo_logprobs(self, prompts: list[str]) -> list[tuple[list[str], list[float | None], list[int]]]:
        """Each prompt's tokens, their log-probabilities (the first is None) and character offsets,
        as the server echoes them (one generated token is asked for and ignored, as
        lm-evaluation-harness does: some servers refuse max_tokens 0)."""
        reply = self.post("/completions", {"prompt": prompts, "max_tokens": 1, "temperature": 0,
                                           "echo": True, "logprobs": 1})
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise TaxonError(f"{self.api.name}: asked to echo {len(prompts)} prompts, the server "
                             f"answered {len(choices)} choices; use --api-method constrained-choice")
        out = []
        for c in choices:
            lp = c.get("logprobs") or {}
            tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
            offsets = lp.get("text_offset")
            if offsets is None:  # offsets from the token strings themselves
                offsets, at = [], 0
                for t in tokens:
                    offsets.append(at)
                    at += len(t)
            out.append((tokens, values, offsets))
        return out

    def check_echo(self) -> None:
        """Refuse (one line) when the server does not echo one log-probability per prompt token."""
        why = None
        try:
            ((tokens, values, offsets),) = self.echo_logprobs([ECHO_PROBE])
        except TaxonError as e:
            if not any(f": {status} from " in str(e) for status in (400, 404, 405, 422)):
                raise
            why = f"it refused a completions request with echo and logprobs ({e})"
        else:
            n = sum(1 for o in offsets if o < len(ECHO_PROBE))
            scored = [v for v, o in zip(values, offsets, strict=False) if o < len(ECHO_PROBE)][1:]
            if n < 2 or len(values) < n or len(offsets) != len(tokens) or not all(
                    isinstance(v, int | float) and math.isfinite(v) for v in scored):
                why = (f"it echoed {len(values)} log-probabilities for {n} prompt tokens "
                       f"({sum(v is None for v in values)} empty)")
        if why:
            raise TaxonError(
                f"{self.api.name} cannot score log-likelihoods: {why}; tasks would score at chance. "
                "Use --api-method constrained-choice (or top-logprobs where the server gives them)")
