"""OpenAI-compatible endpoints, the `api:` model names that use them, and the one way taxon talks
HTTP to them (retries, backoff, one-line errors). Below `identity`, because a model served through
an API is named by what the server reports about it.

- **Names.** `api:<endpoint>/<model>[@<revision>]`: an endpoint of `evals/endpoints.yaml` (or of the
  user's file, `$TAXON_ENDPOINTS`), then the model as the server names it (it may hold slashes:
  `api:vllm-local/Qwen/Qwen2.5-7B-Instruct`). `api:<endpoint>` alone is the endpoint's default model.
  `@<revision>` pins what the identity says instead of asking the server.
- **Keys.** From the environment variable the endpoint names (`key_env`), never from a flag. The key
  goes only into the Authorization header; `redact` removes it from any text taxon prints or keeps.
- **Fingerprint.** What the server says the weights are: the `fingerprint` field `taxon serve`
  adds to GET /models, else vLLM's `root`, else the listing's `created` stamp, else `unlisted`
  (a server without GET /models). Asked once per `probe_ttl_s` (kept in the API cache), so a rerun
  against a hosted API sends nothing.
- **Requests** (`send`): 408, 409, 429, 5xx and lost connections are retried with exponential
  backoff (honouring `Retry-After`) until `max_wait_s` of waiting (a refused connection: four
  tries); any other 4xx fails at once as one line naming the fix.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import re
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from taxon.config import Spec, parse
from taxon.errors import TaxonError
from taxon.settings import cache_dir

ENDPOINTS_FILE = Path(__file__).with_name("evals") / "endpoints.yaml"
ENDPOINTS_ENV = "TAXON_ENDPOINTS"
API_CACHE_ENV = "TAXON_API_CACHE"
PREFIX = "api:"
ChoiceMethod = Literal["loglikelihood-echo", "top-logprobs", "constrained-choice"]
RETRY_STATUS = {408, 409, 429}
BACKOFF_S, BACKOFF_CAP_S = 1.0, 60.0
CONNECT_TRIES = 4  # a refused connection is retried (a server restarting), but not for minutes
MESSAGE_CHARS = 240


class Price(Spec):
    prompt: float = Field(0.0, ge=0)  # US$ per 1M prompt tokens
    completion: float = Field(0.0, ge=0)  # US$ per 1M completion tokens


class EndpointSpec(Spec):
    base_url: str
    key_env: str | None = None
    model: str | None = None
    price: Price = Price()
    prices: dict[str, Price] = {}
    rpm: int = Field(60, ge=1)
    concurrency: int = Field(4, ge=1)
    max_wait_s: float = Field(600.0, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    probe_ttl_s: float = Field(86400.0, ge=0)
    choice_method: ChoiceMethod = "constrained-choice"
    generate_via: Literal["chat", "completions"] = "chat"

    def price_of(self, model: str) -> Price:
        return self.prices.get(model, self.price)


def _read(path: Path, source: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise TaxonError(f"cannot read endpoints file {path} ({e.strerror}); fix ${ENDPOINTS_ENV}") from e
    except yaml.YAMLError as e:
        raise TaxonError(f"endpoints file {path} is not valid YAML ({str(e).splitlines()[0]}); "
                         "fix the file") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TaxonError(f"{source}: expected a mapping of endpoint names to their fields; fix the file")
    return data


def endpoints() -> dict[str, EndpointSpec]:
    """The shipped endpoints, with the user's file (`$TAXON_ENDPOINTS`) merged over them: a user
    entry adds an endpoint or replaces the fields it gives of a shipped one."""
    merged = {name: dict(v) for name, v in _read(ENDPOINTS_FILE, str(ENDPOINTS_FILE)).items()}
    user = os.environ.get(ENDPOINTS_ENV)
    if user:
        path = Path(user).expanduser()
        if not path.is_file():
            raise TaxonError(f"no endpoints file at {path}; fix ${ENDPOINTS_ENV} or --endpoints")
        for name, fields in _read(path, str(path)).items():
            merged[name] = {**merged.get(name, {}), **fields}
        source = str(path)
    else:
        source = str(ENDPOINTS_FILE)
    out = {}
    for name, fields in merged.items():
        out[str(name)] = parse(EndpointSpec, fields, f"{source}, endpoint '{name}'")  # type: ignore[assignment]
    return out


@dataclass(frozen=True)
class ApiModel:
    name: str  # what the user typed: api:openai/gpt-4o
    endpoint: str
    spec: EndpointSpec
    model: str
    revision: str | None  # pinned with @

    @property
    def key(self) -> str | None:
        return os.environ.get(self.spec.key_env) if self.spec.key_env else None

    @property
    def url(self) -> str:
        return self.spec.base_url.rstrip("/")


def is_api(name: str) -> bool:
    return name.startswith(PREFIX)


def api_model(name: str) -> ApiModel:
    """Parse and check `api:<endpoint>/<model>[@<revision>]`; the key must be in the environment.
    Sends nothing."""
    rest = name[len(PREFIX):]
    syntax = ("give api:<endpoint>/<model>, e.g. api:openai/gpt-4o or api:local/tiny "
              f"(endpoints: {', '.join(endpoints())})")
    if not rest or rest.startswith("/") or any(c.isspace() for c in rest):
        raise TaxonError(f"model '{name}': {syntax}")
    endpoint, _, model = rest.partition("/")
    model, _, revision = model.partition("@")
    known = endpoints()
    if endpoint not in known:
        raise TaxonError(f"unknown API endpoint '{endpoint}' in '{name}': choose from "
                         f"{', '.join(known)}, or add it to a file named by ${ENDPOINTS_ENV}")
    spec = known[endpoint]
    model = model or spec.model or ""
    if not model:
        raise TaxonError(f"model '{name}': endpoint '{endpoint}' has no default model; give "
                         f"api:{endpoint}/<model>")
    if "@" in name and not revision:
        raise TaxonError(f"model '{name}': nothing after '@'; give api:{endpoint}/{model}@<revision> "
                         "or leave the '@' out")
    if spec.key_env and not os.environ.get(spec.key_env):
        raise TaxonError(f"endpoint '{endpoint}' needs a key: set the environment variable "
                         f"{spec.key_env} (keys are never passed as flags)")
    return ApiModel(name, endpoint, spec, model, revision or None)


def redact(text: str, key: str | None) -> str:
    """`text` without the key (nor its longer pieces, which some servers echo back)."""
    if key:
        text = text.replace(key, "***")
        if len(key) >= 16:
            for piece in {key[:12], key[-12:]}:
                text = text.replace(piece, "***")
    return text


def _message(response, key: str | None) -> str:
    """The server's own reason for an error, on one short line."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        body = err.get("message", err) if isinstance(err, dict) else err
    text = re.sub(r"\s+", " ", body if isinstance(body, str) else json.dumps(body)).strip()
    return redact(text, key)[:MESSAGE_CHARS]


def _fix(status: int, api: ApiModel) -> str:
    if status == 401:
        return (f"check the key in {api.spec.key_env}" if api.spec.key_env
                else f"the server wants a key: set key_env for endpoint '{api.endpoint}'")
    if status == 403:
        return f"the key may not use model '{api.model}'; check its permissions"
    if status == 404:
        return (f"check the model name '{api.model}' (GET {api.url}/models lists them) and the "
                f"endpoint's base_url")
    return "the server refused the request as sent; check the model and endpoint settings"


def retry_after(response) -> float | None:
    """Seconds the server asks to wait: Retry-After (seconds or an HTTP date), or retry-after-ms."""
    value = response.headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def send(client, api: ApiModel, method: str, path: str, body: dict | None = None,
         sleep=time.sleep, on_retry=None) -> dict:
    """One request to `api.url + path` through the httpx `client` (which carries the key), with the
    retry policy of the module docstring; the reply's JSON. `on_retry(status, wait)` is told of each
    retry."""
    import httpx

    url = api.url + path
    waited, tries = 0.0, 0
    while True:
        tries += 1
        try:
            response = client.request(method, url, json=body)
            status, reason = response.status_code, None
        except httpx.TransportError as e:  # refused, reset, timed out: worth another try
            response, status, reason = None, None, redact(f"{type(e).__name__}: {e}", api.key)
        if status is not None and status < 400:
            try:
                return response.json()
            except ValueError as e:
                raise TaxonError(f"{api.name}: {url} answered {status} with a body that is not JSON; "
                                 "check the endpoint's base_url") from e
        if status is not None and status < 500 and status not in RETRY_STATUS:
            raise TaxonError(f"{api.name}: {status} from {url}: {_message(response, api.key)}; "
                             f"{_fix(status, api)}")
        if status is None and reason.startswith("ConnectError") and tries >= CONNECT_TRIES:
            raise TaxonError(f"{api.name}: cannot connect to {url} ({reason}); is the server running? "
                             f"Check base_url of endpoint '{api.endpoint}'")
        wait = retry_after(response) if response is not None else None
        if wait is None:
            wait = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (tries - 1)) * (0.5 + random.random() / 2)
        last = reason or f"{status} {_message(response, api.key)}"
        if waited + wait > api.spec.max_wait_s:
            raise TaxonError(f"{api.name}: gave up after {tries} tries and {waited:.0f} s of waiting "
                             f"({last}); try later, or raise max_wait_s / lower rpm and concurrency "
                             f"of endpoint '{api.endpoint}'")
        if on_retry is not None:
            on_retry(status, wait)
        sleep(wait)
        waited += wait


def http_client(api: ApiModel):
    import httpx

    headers = {"Authorization": f"Bearer {api.key}"} if api.key else {}
    return httpx.Client(headers=headers, timeout=api.spec.timeout_s, follow_redirects=True)


# --- the fingerprint: what the server says the weights are ---------------------------------------


def cache_file() -> Path:
    """The API cache, one SQLite file: replies (`evals/api.py`) and fingerprints.
    `$TAXON_API_CACHE`, else `<cache folder>/api/cache.sqlite`."""
    value = os.environ.get(API_CACHE_ENV)
    path = Path(value).expanduser() if value else cache_dir() / "api" / "cache.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _probes():
    db = sqlite3.connect(cache_file(), timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS probes (url TEXT NOT NULL, model TEXT NOT NULL, "
               "fingerprint TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (url, model))")
    return db


def _listed_fingerprint(api: ApiModel) -> str:
    with http_client(api) as client:
        try:
            listing = send(client, api, "GET", "/models")
        except TaxonError as e:
            if " 404 from " in str(e) or " 405 from " in str(e):
                return "unlisted"  # a server without GET /models
            raise
    entries = [e for e in listing.get("data") or [] if isinstance(e, dict)]
    entry = next((e for e in entries if e.get("id") in (api.model, f"models/{api.model}")), None)
    if entry is None:
        if not entries:
            return "unlisted"
        ids = ", ".join(str(e.get("id")) for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise TaxonError(f"{api.name}: endpoint '{api.endpoint}' does not offer model '{api.model}' "
                         f"(it lists {ids}); check the model name")
    for field in ("fingerprint", "root"):
        if entry.get(field) and entry.get(field) != api.model:
            return str(entry[field])
    return f"created-{entry['created']}" if entry.get("created") else "unversioned"


RECENT_S = 10.0
_recent: dict[tuple[str, str], tuple[str, float]] = {}


def fingerprint(api: ApiModel) -> str:
    """The pinned revision, else the server's fingerprint of the model (asked at most once per
    `probe_ttl_s`)."""
    if api.revision:
        return api.revision
    ttl = api.spec.probe_ttl_s
    recent = _recent.get((api.url, api.model))
    if recent is not None and time.monotonic() - recent[1] < RECENT_S:
        return recent[0]  # asked moments ago by this process (checking, then planning, one command)
    if ttl > 0:
        with closing(_probes()) as db:
            row = db.execute("SELECT fingerprint, created FROM probes WHERE url=? AND model=?",
                             (api.url, api.model)).fetchone()
        if row is not None and time.time() - row[1] < ttl:
            return row[0]
    value = _listed_fingerprint(api)
    _recent[(api.url, api.model)] = (value, time.monotonic())
    with closing(_probes()) as db, db:
        db.execute("INSERT OR REPLACE INTO probes VALUES (?,?,?,?)", (api.url, api.model, value, time.time()))
    return value


def api_identity(name: str) -> str:
    """`api:<endpoint>/<model>@<fingerprint or revision>`."""
    api = api_model(name)
    return f"{PREFIX}{api.endpoint}/{api.model}@{fingerprint(api)}"
