"""`taxon serve`: taxon's models (an alias, a Hub id, a folder, a stage or LoRA checkpoint) behind an
OpenAI-compatible API, so any client, taxon's own `api:` models included, can use them.

- `GET /v1/models`: the served models; each entry also carries `fingerprint`, the model's taxon
  identity (a stage id, `config:<digest>`, ...), which a taxon client puts into the model's identity.
- `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens` (0 with
  `echo` scores the prompt only), `echo`, `logprobs` (top-k per token, 0-20: `tokens`,
  `token_logprobs`, `top_logprobs`, `text_offset`), `stop`; OpenAI's response shape and `usage`.
- `POST /v1/chat/completions`: `messages` through the model's chat template (plain turns when it
  has none), `max_tokens`/`max_completion_tokens`, `stop`, `logprobs` + `top_logprobs`.

Decoding is greedy whatever the temperature (`n` must be 1). A prompt is tokenised as the model's
tokenizer does by default (a BOS where it adds one), and prompt log-probabilities come from one
plain forward pass, in fp32 unless `--precision bf16`: they equal the local scorer's within 1e-4
nats (tests/test_api.py). Each request's model work runs in a worker thread under that model's
lock, off the event loop, so the server keeps answering (and queueing) while a model computes.
Several models may be served at once, each under its own name; a request names the one it wants.
LoRA adapters over one base (stage checkpoints, composites) share that base, loaded once: each
request activates its model's adapter under the base's lock (`taxon.adapter_set`).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from transformers import StoppingCriteria

from taxon.adapter_set import AdapterSet, adapter_base, same_base
from taxon.errors import TaxonError
from taxon.evals.generation import _eos_ids, cut_at_stop
from taxon.identity import model_identity
from taxon.models import load_model

MAX_TOP_LOGPROBS = 20


@dataclass
class Served:
    name: str  # what requests call it
    model: object
    tokenizer: object
    identity: str
    bf16: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # shared by adapters of one base
    adapters: AdapterSet | None = None  # several adapters over one base: the set this one is in
    location: str | None = None  # the adapter's checkpoint, activated before each request's work

    def activate(self) -> None:
        """Make this model's adapter the active one (call under `lock`)."""
        if self.adapters is not None:
            self.adapters.use(self.location)  # type: ignore[arg-type]


def load(names: list[str], served_names: list[str] | None = None, bf16: bool = False) -> dict[str, Served]:
    """Load each model, named by `served_names` or by what was typed. LoRA adapters (stage
    checkpoints, composites) that share a base are served over that base loaded once, the
    request's model choosing the adapter; a LoRA checkpoint alone on its base is merged."""
    served_names = served_names or []
    if len(served_names) > len(names):
        raise TaxonError("more --name values than models; give one --name per model (or none)")
    publics = [served_names[i] if i < len(served_names) else name for i, name in enumerate(names)]
    for name, public in zip(names, publics, strict=True):
        if name.startswith("api:"):
            raise TaxonError(f"'{name}' is a model behind an API; serve a local model, folder or checkpoint")
        if publics.count(public) > 1:
            raise TaxonError(f"two models served as '{public}'; give each its own --name")
    identities = [model_identity(name) for name in names]  # an unknown model fails here, before loading
    bases = {name: base for name in names if (base := adapter_base(name)) is not None}
    shared = {name for name in bases
              if sum(same_base(bases[name], other) for other in bases.values()) > 1}
    sets: list[tuple[AdapterSet, threading.Lock]] = []
    out: dict[str, Served] = {}
    for name, public, identity in zip(names, publics, identities, strict=True):
        if name in shared:
            held = next((h for h in sets if h[0].fits(name)), None)
            if held is None:
                held = (AdapterSet(bases[name]), threading.Lock())
                sets.append(held)
            adapters, lock = held
            adapters.add(name)
            out[public] = Served(public, adapters.model, adapters.tokenizer, identity, bf16,
                                 lock=lock, adapters=adapters, location=name)
            continue
        model, tokenizer = load_model(name)
        out[public] = Served(public, model, tokenizer, identity, bf16)
    for s in out.values():  # the PeftModel wraps the base once its first adapter is added
        if s.adapters is not None:
            s.model = s.adapters.model
    return out


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _int(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    wrong = isinstance(value, bool) or not isinstance(value, int)
    if wrong or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(400, f"'{key}' must be an integer {bounds}", key)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", "stop")
    return [s for s in stop if s]


# --- the model's work (in a worker thread, under the model's lock) ------------------------------


def _encode(s: Served, prompt) -> tuple[list[int], list[int] | None, str]:
    """Token ids, each token's character offset in the text (None for token-id prompts) and the
    text."""
    tok = s.tokenizer
    if isinstance(prompt, str):
        enc = tok(prompt, return_offsets_mapping=True) if tok.is_fast else tok(prompt)
        ids = enc["input_ids"]
        offsets = [a for a, _ in enc["offset_mapping"]] if "offset_mapping" in enc else None
        return ids, offsets, prompt
    return list(prompt), None, tok.decode(prompt)


def _logprobs_of(s: Served, ids: list[int]) -> torch.Tensor:
    """log P(next token) at every position of `ids` (one plain forward pass) [len, vocab]."""
    model = s.model
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _top(s: Served, row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, idx = row.topk(k)
    return list(zip(idx.tolist(), values.tolist(), strict=True))


class _StopStrings(StoppingCriteria):
    """Stop once the generated text (after column `start`) holds a stop string. The server decodes
    one request at a time through `model.generate`, which also hands back each step's logits for
    `logprobs`; the evaluations' batched loop (evals/generation.py) checks stops its own way."""

    def __init__(self, tokenizer, stop: list[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, [s for s in stop if s], start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def _generate(s: Served, ids: list[int], max_tokens: int, stop: list[str]):
    """Greedy continuation of `ids`: (new token ids, their log-probability rows, finish reason)."""
    if max_tokens == 0:
        return [], [], "length"
    model, tok = s.model, s.tokenizer
    device = next(model.parameters()).device
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    criteria = [_StopStrings(tok, stop, len(ids))] if stop else []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        out = model.generate(input_ids=torch.tensor([ids], device=device),
                             attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                             max_new_tokens=max_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                             eos_token_id=eos, stopping_criteria=criteria, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    rows = [torch.log_softmax(step[0].float(), dim=-1).cpu() for step in out.logits]
    reason = "length"
    end = next((k for k, t in enumerate(new) if t in eos), None)
    if end is not None:
        new, rows, reason = new[:end], rows[:end], "stop"
    if stop:
        text = tok.decode(new, skip_special_tokens=True)
        cut = cut_at_stop(text, stop)
        if len(cut) < len(text):
            keep = next((k for k in range(len(new) + 1)
                         if len(tok.decode(new[:k], skip_special_tokens=True)) >= len(cut)), len(new))
            new, rows, reason = new[:keep], rows[:keep], "stop"
    return new, rows, reason


def _text_of(s: Served, new: list[int], stop: list[str]) -> str:
    return cut_at_stop(s.tokenizer.decode(new, skip_special_tokens=True), stop)


def complete(s: Served, prompt, max_tokens: int, echo: bool, k: int | None, stop: list[str]) -> dict:
    """One prompt of /v1/completions: the choice (without its index) and token counts."""
    tok = s.tokenizer
    ids, offsets, text = _encode(s, prompt)
    if not ids:
        raise RequestError(400, "empty prompt", "prompt")
    new, rows, reason = _generate(s, ids, max_tokens, stop)
    completion = _text_of(s, new, stop)
    choice: dict = {"text": (text if echo else "") + completion, "finish_reason": reason, "logprobs": None}
    if k is not None:
        tokens, values, tops, where = [], [], [], []
        if echo:
            lp = _logprobs_of(s, ids)
            if offsets is None:
                offsets = [len(tok.decode(ids[:i])) for i in range(len(ids))]
            for i, t in enumerate(ids):
                tokens.append(tok.decode([t]))
                values.append(None if i == 0 else float(lp[i - 1, t]))
                tops.append(None if i == 0 else
                            {tok.decode([j]): v for j, v in _top(s, lp[i - 1], k)} if k else None)
                where.append(offsets[i])
        at = len(text) if echo else 0
        for t, row in zip(new, rows, strict=True):
            tokens.append(tok.decode([t]))
            values.append(float(row[t]))
            tops.append({tok.decode([j]): v for j, v in _top(s, row, k)} if k else None)
            where.append(at)
            at += len(tokens[-1])
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                              "text_offset": where}
    return {"choice": choice, "prompt_tokens": len(ids), "completion_tokens": len(new)}


def chat_prompt(s: Served, msgs: list[dict]) -> str:
    tok = s.tokenizer
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n\n" for m in msgs)  # a base model: the turns as plain text


def chat(s: Served, msgs: list[dict], max_tokens: int, k: int | None, stop: list[str]) -> dict:
    tok = s.tokenizer
    # A chat template writes its own special tokens; plain turns get what the tokenizer adds (BOS).
    ids = tok(chat_prompt(s, msgs), add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"]
    new, rows, reason = _generate(s, ids, max_tokens, stop)
    content = _text_of(s, new, stop)
    logprobs = None

    def entry(token: int, value: float) -> dict:
        text = tok.decode([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    if k is not None:
        logprobs = {"content": [
            {**entry(t, float(row[t])),
             "top_logprobs": [entry(j, v) for j, v in _top(s, row, k)] if k else []}
            for t, row in zip(new, rows, strict=True)]}
    return {"choice": {"index": 0, "message": {"role": "assistant", "content": content},
                       "logprobs": logprobs, "finish_reason": reason},
            "prompt_tokens": len(ids), "completion_tokens": len(new)}


# --- the app ------------------------------------------------------------------------------------


def build_app(served: dict[str, Served]):
    """The FastAPI app serving `served` (name -> loaded model)."""
    app = FastAPI(title="taxon serve", docs_url=None, redoc_url=None)
    app.state.requests = []  # (method, path) of each request, for tests and logs

    @app.middleware("http")
    async def count(request: Request, call_next):
        app.state.requests.append((request.method, request.url.path))
        return await call_next(request)

    def error(e: RequestError) -> JSONResponse:
        kind = "invalid_request_error" if e.status == 400 else "not_found_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param,
                                       "code": None}}, status_code=e.status)

    def pick(body: dict) -> Served:
        name = body.get("model")
        if name is None and len(served) == 1:
            return next(iter(served.values()))
        if name not in served:
            raise RequestError(404, f"The model '{name}' does not exist; this server serves: "
                               f"{', '.join(served)}", "model")
        return served[name]

    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise RequestError(400, "the request body is not JSON") from e
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is served (greedy decoding)", "n")
        if body.get("stream"):
            raise RequestError(400, "streaming is not served; leave 'stream' out", "stream")
        return body

    async def run(s: Served, fn, *args):
        def locked():
            with s.lock:
                s.activate()
                return fn(s, *args)
        return await run_in_threadpool(locked)

    def envelope(kind: str, s: Served, choices: list[dict], prompt_tokens: int, completion_tokens: int):
        return {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind, "created": int(time.time()), "model": s.name,
                "system_fingerprint": s.identity, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "taxon",
             "fingerprint": s.identity} for s in served.values()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await parse(request)
            s = pick(body)
            prompt = body.get("prompt")
            if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                    isinstance(t, int) for t in prompt)):
                prompts = [prompt]
            elif isinstance(prompt, list) and prompt and all(
                    isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))
                    for p in prompt):
                prompts = prompt
            else:
                raise RequestError(400, "'prompt' must be a string, a list of strings or token ids",
                                   "prompt")
            max_tokens = _int(body, "max_tokens", 16, 0)
            k = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
            echo, stop = bool(body.get("echo", False)), _stops(body)
            if max_tokens == 0 and not echo:
                raise RequestError(400, "max_tokens 0 needs echo", "max_tokens")
            done = [await run(s, complete, p, max_tokens, echo, k, stop) for p in prompts]
        except RequestError as e:
            return error(e)
        choices = [{**d["choice"], "index": i} for i, d in enumerate(done)]
        return envelope("text_completion", s, choices, sum(d["prompt_tokens"] for d in done),
                        sum(d["completion_tokens"] for d in done))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await parse(request)
            s = pick(body)
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                    for m in msgs):
                raise RequestError(400, "'messages' must be a list of {role, content} with text "
                                   "content", "messages")
            max_tokens = _int(body, "max_completion_tokens", None, 1) or _int(body, "max_tokens", 256, 1)
            k = None
            if body.get("logprobs"):
                k = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            done = await run(s, chat, [{"role": m["role"], "content": m["content"]} for m in msgs],
                             max_tokens, k, _stops(body))
        except RequestError as e:
            return error(e)
        return envelope("chat.completion", s, [done["choice"]], done["prompt_tokens"],
                        done["completion_tokens"])

    return app


def serve(names: list[str], served_names: list[str] | None, host: str, port: int, bf16: bool,
          console=None) -> None:
    """Load the models, then serve them until interrupted."""
    import uvicorn

    served = load(names, served_names, bf16)
    if console is not None:
        for s in served.values():
            console.print(f"serving [bold]{s.name}[/bold] ({s.identity}) at http://{host}:{port}/v1",
                          highlight=False)
    uvicorn.run(build_app(served), host=host, port=port, log_level="warning")
