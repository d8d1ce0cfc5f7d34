"""Models behind an OpenAI-compatible API, end to end over real HTTP: `taxon serve`'s app on tiny
models (and a LoRA checkpoint) evaluated through `taxon eval --model api:...`, and small FastAPI
stand-ins for providers that throttle, refuse, or hide prompt log-probabilities."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_servers import endpoints_file, start
from cli_runner import run_taxon
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from taxon import endpoints
from taxon.config import DataRef, LoraSpec, StageSpec
from taxon.evals.api_eval import parse_choice
from taxon.evals.metrics import classification_report
from taxon.models import resolve_targets
from taxon.study.store import Store

KEY = "sk-taxon-test-9f8e7d6c5b4a39281706f5e4"
LIMIT = "6"


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, data_dir) -> Path:
    from taxon.train import train_stage

    spec = resolve_targets(StageSpec(objective="sft", data=(DataRef(dataset="fpb"),), steps=2, batch_size=2,
                                     lr=5e-2, warmup_ratio=0.0, max_length=96,
                                     lora=LoraSpec(r=4, alpha=8, dropout=0.0)), "tiny-gpt2")
    out = tmp_path_factory.mktemp("lora") / "ckpt"
    train_stage(spec, "tiny-gpt2", out, desc="test-api-lora")
    return out


@pytest.fixture(scope="module")
def served(lora_checkpoint):
    """tiny-gpt2 (no chat template), tiny (SmolLM2's chat template) and a LoRA checkpoint."""
    from taxon.serve import load

    return load(["tiny-gpt2", "tiny", str(lora_checkpoint)], ["base", "chat", "lora"])


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated API cache and the test key in the environment; returns a function that points
    endpoint `t` (and others) at a running server."""
    monkeypatch.setenv("TAXON_API_CACHE", str(tmp_path / "api-cache.sqlite"))
    monkeypatch.setenv("TAXON_TEST_KEY", KEY)
    monkeypatch.setattr(endpoints, "_recent", {})

    def point(server, **fields):
        entry = {"base_url": server.base_url, "key_env": "TAXON_TEST_KEY", "probe_ttl_s": 0,
                 "choice_method": "loglikelihood-echo", "rpm": 100000, "concurrency": 2, **fields}
        monkeypatch.setenv("TAXON_ENDPOINTS", endpoints_file(tmp_path / "endpoints.yaml", t=entry))
    return point


@pytest.fixture
def taxon_server(served):
    from taxon.serve import build_app

    running = start(build_app(served))
    yield running
    running.stop()


def posts(server) -> int:
    return sum(1 for method, _ in server.app.state.requests if method == "POST")


def only_result(path: Path):
    s = Store(path)
    (exp,) = s.experiments()
    (result,) = s.experiment_results(exp)
    return s, exp, result, s.predictions(exp["model_key"], result["eval_key"])


# --- log-likelihoods through the server equal the local scorer's -------------------------------


@pytest.mark.parametrize("served_name", ["base", "lora"])
def test_echo_loglikelihoods_equal_the_local_scorer(env, taxon_server, lora_checkpoint, tmp_path,
                                                    served_name):
    env(taxon_server)
    local_model = {"base": "tiny-gpt2", "lora": str(lora_checkpoint)}[served_name]
    remote = run_taxon("eval", "--model", f"api:t/{served_name}", "--tasks", "fpb", "--limit", LIMIT,
                       "--shots", "2", "--store", tmp_path / "api.sqlite")
    assert remote.returncode == 0, remote.stderr
    local = run_taxon("eval", "--model", local_model, "--tasks", "fpb", "--limit", LIMIT, "--shots", "2",
                      "--precision", "fp32", "--store", tmp_path / "local.sqlite")
    assert local.returncode == 0, local.stderr
    _, exp, result, api_preds = only_result(tmp_path / "api.sqlite")
    _, _, _, local_preds = only_result(tmp_path / "local.sqlite")
    assert exp["model"] == f"api:t/{served_name}"
    assert exp["model_key"].startswith(f"api:t/{served_name}@")
    diff = max(abs(a - b) for p, q in zip(api_preds, local_preds, strict=True)
               for a, b in zip(p["scores"], q["scores"], strict=True))
    assert diff < 1e-4, diff
    assert [p["pred"] for p in api_preds] == [p["pred"] for p in local_preds]
    api = result["metrics"]["settings"]["api"]
    assert api["method"] == "loglikelihood-echo" and api["endpoint"] == "t" and api["unparsed"] == 0
    assert api["model"] == served_name and api["prompt_tokens"] > 0 and api["cost_usd"] == 0
    assert exp["model_key"].endswith("@" + api["fingerprint"])
    assert "Sentiment:" in result["metrics"]["settings"]["prompt_example"]
    assert result["metrics"]["unparsed"] == {"count": 0, "rate": 0.0}


def test_lora_and_base_have_their_own_identities(env, taxon_server, lora_checkpoint):
    from taxon.identity import model_identity

    env(taxon_server)
    base, lora = model_identity("api:t/base"), model_identity("api:t/lora")
    assert base == "api:t/base@" + model_identity("tiny-gpt2")
    assert lora == "api:t/lora@" + model_identity(str(lora_checkpoint))
    assert model_identity("api:t/base@pinned") == "api:t/base@pinned"


# --- the cache: a rerun sends nothing; a killed run keeps what it received ----------------------


def test_a_rerun_sends_no_request(env, taxon_server, tmp_path):
    env(taxon_server, probe_ttl_s=3600)
    args = ("eval", "--model", "api:t/base", "--tasks", "fpb", "--limit", LIMIT)
    first = run_taxon(*args, "--store", tmp_path / "a.sqlite")
    assert first.returncode == 0, first.stderr
    sent = len(taxon_server.app.state.requests)
    assert sent == 1 + 1 + int(LIMIT)  # the model listing, the echo check, one per item
    endpoints._recent.clear()  # as a new process would
    second = run_taxon(*args, "--store", tmp_path / "b.sqlite")
    assert second.returncode == 0, second.stderr
    assert len(taxon_server.app.state.requests) == sent  # not one HTTP request
    assert "0 requests" in second.stdout and f"{int(LIMIT) + 1} from the cache" in second.stdout
    a, b = only_result(tmp_path / "a.sqlite")[3], only_result(tmp_path / "b.sqlite")[3]
    assert a == b
    # A local server (probe_ttl_s 0, the default there) is asked which weights it serves, and only that.
    env(taxon_server)
    endpoints._recent.clear()
    third = run_taxon(*args, "--store", tmp_path / "c.sqlite")
    assert third.returncode == 0, third.stderr
    assert taxon_server.app.state.requests[sent:] == [("GET", "/v1/models")]


def test_a_killed_run_keeps_every_reply_it_received(env, served, tmp_path):
    from taxon.serve import build_app

    app = build_app(served)
    fail = {"after": 4}

    @app.middleware("http")
    async def flaky(request: Request, call_next):
        if request.url.path.endswith("/completions"):
            fail["after"] -= 1
            if fail["after"] < 0:
                return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        return await call_next(request)

    server = start(app)
    try:
        env(server, concurrency=1)
        args = ("eval", "--model", "api:t/base", "--tasks", "fpb", "--limit", LIMIT, "--store",
                tmp_path / "s.sqlite")
        broken = run_taxon(*args)
        assert broken.returncode == 2 and "400" in broken.stderr
        assert len(broken.stderr.strip().splitlines()) == 1
        fail["after"] = 10**6
        before = posts(server)
        again = run_taxon(*args)
        assert again.returncode == 0, again.stderr
        # 4 replies were kept (echo check + 3 items): only the other items are asked again.
        assert posts(server) - before == int(LIMIT) - 3
    finally:
        server.stop()


# --- chat-only classification: constrained answer, unparsed replies counted --------------------


def test_constrained_choice_counts_unparsed_replies(env, taxon_server, tmp_path):
    env(taxon_server)
    r = run_taxon("eval", "--model", "api:t/chat", "--tasks", "fpb", "--limit", LIMIT, "--api-method",
                  "constrained-choice", "--store", tmp_path / "s.sqlite")
    assert r.returncode == 0, r.stderr
    _, _, result, preds = only_result(tmp_path / "s.sqlite")
    m = result["metrics"]
    unparsed = [p for p in preds if p["pred"] == -1]
    assert m["settings"]["api"]["method"] == "constrained-choice"
    assert m["settings"]["api"]["unparsed"] == len(unparsed) == m.get("unparsed", {}).get("count", 0)
    assert all(set(p["scores"]) == {"unparsed"} for p in unparsed)
    assert "Answer with one of: negative, neutral, positive." in m["settings"]["prompt_example"]
    assert m["settings"]["prompt_messages"][-1]["role"] == "user"
    right = sum(p["pred"] == p["gold"] for p in preds)
    assert m["accuracy"]["value"] == pytest.approx(right / len(preds))  # unparsed counted wrong


def stand_in(replies: list[str], top: list[dict] | None = None, echo_logprobs: bool = True,
             status: list[tuple[int, dict]] | None = None) -> FastAPI:
    """A provider: lists model `m`, answers chat with `replies` in turn (after the `status`
    answers, e.g. [(429, {"Retry-After": "1"})]), and completions with echo (or without prompt
    log-probabilities)."""
    app = FastAPI()
    app.state.requests = []
    state = {"i": 0, "status": list(status or [])}

    @app.middleware("http")
    async def count(request: Request, call_next):
        app.state.requests.append((request.method, request.url.path, request.headers.get("authorization")))
        if state["status"] and request.method == "POST":
            code, headers = state["status"].pop(0)
            return JSONResponse({"error": {"message": f"slow down ({request.headers.get('authorization')})"}},
                                status_code=code, headers=headers)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "x"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        text = replies[state["i"] % len(replies)]
        state["i"] += 1
        logprobs = {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": top}]} if top else None
        return {"id": "c", "object": "chat.completion", "created": 1, "model": "m-2024",
                "system_fingerprint": "fp_1", "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": text}, "logprobs": logprobs}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            words = p.split(" ")
            tokens = [w if j == 0 else " " + w for j, w in enumerate(words)]
            offsets = list(np.cumsum([0] + [len(t) for t in tokens[:-1]]))
            values = [None] + [-1.0] * (len(tokens) - 1) if echo_logprobs else [None] * len(tokens)
            choices.append({"index": i, "text": p + " x", "finish_reason": "length",
                            "logprobs": {"tokens": tokens + [" x"], "token_logprobs": values + [-1.0],
                                         "text_offset": [int(o) for o in offsets] + [len(p)],
                                         "top_logprobs": None}})
        return {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": choices,
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}

    return app


def test_parse_choice_is_robust_and_refuses_to_guess():
    labels = ["negative", "neutral", "positive"]
    for reply, want in [("positive", 2), (" Positive.", 2), ("**negative**", 0), ("Answer: neutral", 1),
                        ("The sentiment is positive.", 2), ("neutral - the sentence reports a fact", 1),
                        ("I think it is negative", 0), ("banana", None), ("", None), (None, None),
                        ("positive or negative", 2), ("it could be negative or positive", None)]:
        assert parse_choice(reply, labels) == want, reply
    assert parse_choice("The sentences are not equivalent.", ["equivalent", "not_equivalent"]) == 1
    assert parse_choice("equivalent", ["equivalent", "not_equivalent"]) == 0
    assert parse_choice("(B)", ["A", "B", "C", "D"]) == 1
    assert parse_choice("A bank", ["A", "B", "C", "D"]) == 0  # a reply starting with a letter answer


def test_stand_in_provider_constrained_and_top_logprobs(env, tmp_path):
    server = start(stand_in(["Positive.", "banana", "**neutral**", "I'd say negative"]))
    try:
        env(server, model="m", price={"prompt": 2.0, "completion": 10.0})
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "4", "--api-method",
                      "constrained-choice", "--store", tmp_path / "c.sqlite")
        assert r.returncode == 0, r.stderr
        _, exp, result, preds = only_result(tmp_path / "c.sqlite")
        api = result["metrics"]["settings"]["api"]
        assert exp["model"] == "api:t" and exp["model_key"] == "api:t/m@created-1"
        assert api["unparsed"] == 1 and [p["pred"] for p in preds].count(-1) == 1
        assert api["prompt_tokens"] == 400 and api["completion_tokens"] == 8
        assert api["cost_usd"] == pytest.approx((400 * 2.0 + 8 * 10.0) / 1e6)
        assert "system_fingerprint=fp_1" in api["served"] and "model=m-2024" in api["served"]
    finally:
        server.stop()
    top = [{"token": "pos", "logprob": -0.2}, {"token": " neg", "logprob": -2.0},
           {"token": "ne", "logprob": -1.0}]
    server = start(stand_in(["whatever"], top=top))
    try:
        env(server, model="m")
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "2", "--api-method",
                      "top-logprobs", "--store", tmp_path / "t.sqlite")
        assert r.returncode == 0, r.stderr
        _, _, result, preds = only_result(tmp_path / "t.sqlite")
        assert result["metrics"]["settings"]["api"]["method"] == "top-logprobs"
        assert all(p["pred"] == 2 for p in preds)  # "ne" begins two labels: it counts for neither
        assert preds[0]["scores"]["logprobs"] == [pytest.approx(-2.0), None, pytest.approx(-0.2)]
    finally:
        server.stop()


# --- robustness: retries, one-line refusals -----------------------------------------------------


def test_retries_429_honouring_retry_after_then_succeeds(env, tmp_path):
    server = start(stand_in(["positive"], status=[(429, {"Retry-After": "1"}), (503, {"Retry-After": "0"}),
                                                  (429, {"Retry-After": "1"})]))
    try:
        env(server, model="m", concurrency=1)
        t0 = time.monotonic()
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "2", "--api-method",
                      "constrained-choice", "--store", tmp_path / "s.sqlite")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 >= 2.0  # two Retry-After: 1 honoured
        _, _, result, _ = only_result(tmp_path / "s.sqlite")
        assert result["metrics"]["settings"]["api"]["retries"] == 3
        assert sum(1 for m, _, _ in server.app.state.requests if m == "POST") == 5
    finally:
        server.stop()


def test_gives_up_after_the_wait_cap(env, tmp_path):
    server = start(stand_in(["positive"], status=[(429, {"Retry-After": "30"})] * 5))
    try:
        env(server, model="m", max_wait_s=5)
        t0 = time.monotonic()
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "2", "--api-method",
                      "constrained-choice", "--store", tmp_path / "s.sqlite")
        assert r.returncode == 2 and "gave up after 1 tries" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 5
    finally:
        server.stop()


@pytest.mark.parametrize("status, words", [(401, "check the key in TAXON_TEST_KEY"),
                                           (404, "check the model name"), (400, "refused the request")])
def test_client_errors_fail_at_once_with_one_line(env, tmp_path, status, words):
    server = start(stand_in(["positive"], status=[(status, {})] * 3))
    try:
        env(server, model="m")
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "2", "--api-method",
                      "constrained-choice", "--store", tmp_path / "s.sqlite")
        assert r.returncode == 2 and words in r.stderr and f"{status} from" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert sum(1 for m, _, _ in server.app.state.requests if m == "POST") == 1  # no retry
        assert KEY not in r.stderr and KEY[:12] not in r.stderr  # the server echoed it; redacted
        assert not Store(tmp_path / "s.sqlite").experiments()
    finally:
        server.stop()


def test_a_server_without_prompt_logprobs_refuses_loglikelihood_tasks(env, tmp_path):
    server = start(stand_in(["positive"], echo_logprobs=False))
    try:
        env(server, model="m")
        r = run_taxon("eval", "--model", "api:t", "--tasks", "fpb", "--limit", "2", "--store",
                      tmp_path / "s.sqlite")
        assert r.returncode == 2 and "cannot score log-likelihoods" in r.stderr
        assert "constrained-choice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "s.sqlite").exists() or not Store(tmp_path / "s.sqlite").experiments()
        posted = [p for m, p, _ in server.app.state.requests if m == "POST"]
        assert posted == ["/v1/completions"]  # the one check, then nothing
    finally:
        server.stop()


@pytest.mark.parametrize("name, words", [
    ("api:", "give api:<endpoint>/<model>"), ("api:nowhere/x", "unknown API endpoint 'nowhere'"),
    ("api:vllm-local", "has no default model"),
    ("api:openai/gpt-4o", "set the environment variable OPENAI_API_KEY"),
    ("api:t/m@", "nothing after '@'"),
])
def test_bad_api_names_are_one_line_before_any_request(env, tmp_path, monkeypatch, name, words):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("TAXON_ENDPOINTS", endpoints_file(tmp_path / "e.yaml", t={"base_url": "http://127.0.0.1:9/v1"}))
    r = run_taxon("eval", "--model", name, "--tasks", "fpb", "--store", tmp_path / "s.sqlite")
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_api_model_cannot_be_trained_or_served(env, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    r = run_taxon("train", "--model", "api:openai/gpt-4o", "--dataset", "fpb", "--output", tmp_path / "x")
    assert r.returncode == 2
    r = run_taxon("serve", "api:openai/gpt-4o")
    assert r.returncode == 2 and "behind an API" in r.stderr
    r = run_taxon("serve", "no-such-model")
    assert r.returncode == 2 and "unknown model" in r.stderr


# --- the key is written nowhere ----------------------------------------------------------------


def test_the_key_appears_in_no_file_a_run_writes(env, taxon_server, tmp_path, monkeypatch):
    env(taxon_server)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for args in (("--tasks", "fpb", "--limit", "3"),
                 ("--tasks", "fpb", "--limit", "3", "--api-method", "constrained-choice")):
        r = run_taxon("eval", "--model", "api:t/chat", *args, "--store", tmp_path / "s.sqlite")
        assert r.returncode == 0, r.stderr
        outputs += [r.stdout, r.stderr]
    r = run_taxon("report", "--store", tmp_path / "s.sqlite", "--json", tmp_path / "json")
    assert r.returncode == 0, r.stderr
    outputs += [r.stdout, r.stderr]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "api-cache.sqlite" for p in files) and any(p.suffix == ".json" for p in files)
    for p in files:
        data = p.read_bytes()
        assert KEY.encode() not in data and KEY[:12].encode() not in data, p
    assert all(KEY not in o for o in outputs)


# --- the server's shape --------------------------------------------------------------------------


def test_served_responses_have_openai_shapes(taxon_server):
    url = taxon_server.base_url
    listing = httpx.get(url + "/models").json()
    assert {m["id"] for m in listing["data"]} == {"base", "chat", "lora"}
    r = httpx.post(url + "/completions", json={"model": "base", "prompt": ["Sales rose", "Profit fell"],
                                               "max_tokens": 3, "echo": True, "logprobs": 2,
                                               "temperature": 0}, timeout=60).json()
    assert r["object"] == "text_completion" and len(r["choices"]) == 2
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(lp["text_offset"])
    assert r["choices"][0]["text"].startswith("Sales rose") and len(lp["top_logprobs"][1]) <= 2
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    c = httpx.post(url + "/chat/completions", json={"model": "chat", "messages": [
        {"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 3},
        timeout=60).json()
    assert c["object"] == "chat.completion" and c["choices"][0]["message"]["role"] == "assistant"
    assert all(len(t["top_logprobs"]) == 3 for t in c["choices"][0]["logprobs"]["content"])
    bad = httpx.post(url + "/chat/completions", json={"model": "nope", "messages": []})
    assert bad.status_code == 404 and "does not exist" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/completions", json={"model": "base", "prompt": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_generation_task_through_chat(env, taxon_server, tmp_path):
    env(taxon_server)
    r = run_taxon("eval", "--model", "api:t/chat", "--tasks", "gsm8k", "--limit", "2", "--shots", "1",
                  "--store", tmp_path / "s.sqlite")
    assert r.returncode == 0, r.stderr
    _, _, result, preds = only_result(tmp_path / "s.sqlite")
    settings = result["metrics"]["settings"]
    assert settings["api"]["method"] == "generate" and settings["chat"] is True
    assert [m["role"] for m in settings["prompt_messages"]] == ["user", "assistant", "user"]
    assert all("output" in p["scores"] for p in preds) and "numeric_accuracy" in result["metrics"]


def test_unparsed_predictions_count_wrong_in_every_metric():
    from sklearn.metrics import f1_score

    gold = [0, 1, 2, 2, 1, 0]
    pred = [0, -1, 2, -1, 1, 1]
    probs = np.full((6, 3), 1 / 3)
    m = classification_report(gold, pred, probs, ["a", "b", "c"], ["accuracy", "macro_f1", "weighted_f1"],
                              n_resamples=10)
    assert m["accuracy"]["value"] == pytest.approx(3 / 6)
    assert m["macro_f1"]["value"] == pytest.approx(f1_score(gold, pred, labels=[0, 1, 2], average="macro"))
    assert m["weighted_f1"]["value"] == pytest.approx(
        f1_score(gold, pred, labels=[0, 1, 2], average="weighted"))
    assert m["unparsed"] == {"count": 2, "rate": pytest.approx(2 / 6)}
    assert json.dumps(m)  # storable


def test_perplexity_through_an_api_is_refused_in_one_line(env, taxon_server, tmp_path):
    env(taxon_server)
    r = run_taxon("eval", "--model", "api:t/base", "--tasks", "fpb,eval_domain", "--store",
                  tmp_path / "s.sqlite")
    assert r.returncode == 2 and "cannot be scored through an API" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert posts(taxon_server) <= 1 and not (tmp_path / "s.sqlite").exists()  # fpb's echo check at most
