"""The OpenAI-compatible server, run as a user runs it: `pudding serve` in its own process on a loopback port, the
real SmolLM2-135M behind it, talked to with the openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import SETS, ServerProcess, assert_clean_failure, pudding, synthetic_table
from pudding.bundle import Bundle, CandidateSet
from pudding.engine import Engine
from pudding.router import RouterSettings
from pudding.router_training import save_router, train_router
from pudding.serve import StopScanner

MAX_LEN = 512
MODEL = "smollm2-135m"


class Server(ServerProcess):
    """A real `pudding serve` process, with an openai client and a raw-HTTP helper."""

    def __init__(self, log: Path, *args: str) -> None:
        try:
            super().__init__(list(args), log)
        except RuntimeError as failed:
            pytest.fail(str(failed))
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, path: str, body: dict | bytes) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2):
    """A bundle for the real model with a router trained one epoch on synthetic labels: enough to route."""
    table = synthetic_table(32)
    settings = RouterSettings(epochs=1, warmup_steps=1, batch_size=16, max_length=32, val_fraction=0.25)
    router, tokenizer, history, meta = train_router(table, settings)
    model = {"name": smollm2.name, "fingerprint": smollm2.fingerprint, "num_blocks": smollm2.decoder.num_blocks}
    opened = Bundle.create_or_open(tmp_path_factory.mktemp("serve") / "bundle", model, 2, {})
    opened.write_candidates([CandidateSet(s, []) for s in SETS], {})
    save_router(opened.router_dir(), router, tokenizer, settings, SETS, history, meta, model)
    return opened.path


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """Routed by the bundle's router; one request may wait behind the running one."""
    running = Server(tmp_path_factory.mktemp("log") / "serve.log", "--bundle", str(bundle), "--max-len", str(MAX_LEN),
                     "--queue-size", "1", "--device", "cpu")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine.from_model(smollm2.model, smollm2.tokenizer, max_len=MAX_LEN)


def _streamed_completion(client, **request) -> tuple[str, list]:
    chunks = list(client.completions.create(stream=True, **request))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_completions_stream_and_engine_agree(server, engine):
    prompts = ["Question: what does a cow eat?\nAnswer:", "The woman opened the window and"]
    for prompt in prompts:
        whole = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10)
        streamed, chunks = _streamed_completion(server.client, model=MODEL, prompt=prompt, max_tokens=10,
                                                stream_options={"include_usage": True})
        info = whole.pudding
        assert info["routed"] and info["set_index"] in range(len(SETS)) and info["router_ms"] > 0
        assert info["omitted_blocks"] == SETS[info["set_index"]]
        reference = engine.generate(prompt, engine.omission(info["omitted_blocks"]), max_new_tokens=10)
        assert whole.choices[0].text == streamed == reference.text and streamed
        assert whole.usage.prompt_tokens == len(engine.encode(prompt)) == reference.prompt_tokens
        assert whole.usage.completion_tokens == len(reference.tokens)
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        assert chunks[-1].usage == whole.usage and chunks[-1].choices == []  # include_usage: a last usage chunk
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].pudding["omitted_blocks"] == info["omitted_blocks"]
        assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_honours_a_forced_set(server, engine):
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    forced = {"pudding": {"set": 2}}
    whole = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=forced)
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=forced,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.pudding["set_index"] == 2 and whole.pudding["omitted_blocks"] == SETS[2] and not whole.pudding["routed"]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reference = engine.generate(text, engine.omission(SETS[2]), max_new_tokens=8)
    assert whole.choices[0].message.content == streamed == reference.text
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    assert whole.usage.prompt_tokens == reference.prompt_tokens and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("forced, omitted, index", [
    ({"set": "dense"}, [], None),
    ({"omit": [17, 4]}, [4, 17], None),
    ({"omit": [20, 11]}, [11, 20], 1),  # the same blocks as the router's set 1
])
def test_dense_and_explicit_blocks_can_be_forced(server, engine, forced, omitted, index):
    prompt = "The three primary colours are"
    response = server.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 6, "pudding": forced})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pudding"]["omitted_blocks"] == omitted and body["pudding"]["set_index"] == index
    assert body["choices"][0]["text"] == engine.generate(prompt, engine.omission(omitted), max_new_tokens=6).text


def test_stop_strings_cut_the_text_in_both_modes(server, engine):
    prompt = "Here is a list of fruits: apple, banana,"
    full = engine.generate(prompt, engine.omission(SETS[0]), max_new_tokens=16).text
    stop = full[6:9]
    assert stop.strip(), full
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "stop": [stop, "never appears"],
               "extra_body": {"pudding": {"set": 0}}}
    whole = server.client.completions.create(**request)
    streamed, chunks = _streamed_completion(server.client, **request)
    assert whole.choices[0].text == streamed == full[: full.find(stop)]
    assert whole.choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": ', 400),  # malformed JSON
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "caf\xe9 \xff"}', 400),  # not UTF-8
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"model": MODEL}, 400),
    ("/v1/completions", {"prompt": "hello"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "8"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "   \n"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400),  # a token id outside the vocabulary
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 2, "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 2}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"50256": -100}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": 1}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_LEN}, 400),  # beyond the context
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**40}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * (MAX_LEN + 10)}, 400),  # prompt over the context
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi", "temperature": 1e999}', 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"set": 4}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"set": -1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"set": 10**30}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"set": "sparse"}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"set": True}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"omit": [30]}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"omit": [3, 3]}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"omit": list(range(30))}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"omit": [1], "set": 0}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "pudding": {"blocks": [1]}}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "only a system turn"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": " "}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, 400),
    ("/v1/nothing", {"model": MODEL}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_input_gets_an_openai_error_and_the_server_lives_on(server, path, body, status):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert server.healthy()


def test_the_openai_client_sees_the_error_message(server):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens"):
        server.client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="gpt-9", prompt="hi")


SURROGATES = [  # raw JSON with an escaped lone surrogate, and the field the error must name
    (b'{"model": "smollm2-135m", "prompt": "caf\\ud800"}', "prompt"),
    (b'{"model": "smollm2-135m", "prompt": ["ok", "x\\udfff"]}', "prompt[1]"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "stream": true, "user": "\\udc00"}', "user"),
    (b'{"model": "smollm2-135m", "prompt": "hi", "\\ud800": 1}', "\\ud800"),  # a key: named escaped
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800"}]}]}',
     "messages[0].content[0].text"),
]


@pytest.mark.parametrize("body, param", SURROGATES, ids=range(len(SURROGATES)))
def test_text_that_is_not_unicode_is_refused_naming_its_field(server, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = server.post(path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_text" and "surrogate" in error["message"]
    assert error["param"] == param
    assert server.healthy()


def test_a_body_that_is_not_json_is_refused_saying_why(server):
    sent = httpx.post(f"{server.url}/v1/completions", content=b"prompt=hi", timeout=30,
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_content_type"
    assert "application/json" in sent.json()["error"]["message"]
    bare = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "smollm2-135m", "prompt": "hi"}', timeout=30)
    assert bare.status_code == 400 and "no Content-Type" in bare.json()["error"]["message"]


def test_a_body_over_the_limit_is_refused_413_declared_or_chunked(server):
    """The default limit is 4 MB; a bigger body is refused before it is read whole, whether it declares its length
    or arrives in chunks without one."""
    big = json.dumps({"model": MODEL, "prompt": "word " * 1_000_000}).encode()  # 5 MB
    declared = server.post("/v1/completions", big)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def pieces():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    chunked = httpx.post(f"{server.url}/v1/completions", content=pieces(), timeout=60,
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "--max-body-mb" in chunked.json()["error"]["message"]
    assert server.healthy()


def test_neutral_values_of_unsupported_parameters_are_accepted(server):
    response = server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "best_of": 1,
                                               "presence_penalty": 0, "logit_bias": {}, "suffix": None, "seed": 7})
    assert response.status_code == 200, response.text


def _reference_logprobs(smollm2, ids: list[int]) -> torch.Tensor:
    """Each token's log-probability given the ones before it, from a plain transformers forward (dense)."""
    with torch.inference_mode():
        logits = smollm2.model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_returns_the_prompt_and_its_log_probabilities(server, smollm2, engine):
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = engine.encode(prompt)
    reference = _reference_logprobs(smollm2, ids)
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0, "pudding": {"set": "dense"}}
    only_prompt = server.post("/v1/completions", body).json()
    [choice] = only_prompt["choices"]
    scored = choice["logprobs"]
    assert choice["text"] == prompt and "".join(scored["tokens"]) == prompt and len(scored["tokens"]) == len(ids)
    assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
    assert torch.allclose(torch.tensor(scored["token_logprobs"][1:]), reference, atol=1e-3)
    for logprob, top in zip(scored["token_logprobs"][1:], scored["top_logprobs"][1:]):
        assert len(top) == 3 and max(top.values()) >= logprob - 1e-5
    assert scored["text_offset"][1] == len(scored["tokens"][0])
    assert only_prompt["usage"]["completion_tokens"] == 0

    generated = server.post("/v1/completions", {**body, "max_tokens": 4}).json()["choices"][0]
    expected = engine.generate(prompt, engine.omission([]), max_new_tokens=4)
    assert generated["text"] == prompt + expected.text
    tail = generated["logprobs"]
    assert len(tail["tokens"]) == len(ids) + 4
    assert tail["token_logprobs"][1 : len(ids)] == pytest.approx(scored["token_logprobs"][1:], abs=1e-4)
    for logprob, top in zip(tail["token_logprobs"][len(ids):], tail["top_logprobs"][len(ids):]):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the likeliest


def test_several_prompts_and_token_ids_get_one_choice_each(server, engine):
    first, second = "Water boils at", "The sky is"
    ids = [engine.encode(first), engine.encode(second)]
    response = server.post("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 3,
                                               "pudding": {"omit": [11, 17, 20]}}).json()
    texts = [c["text"] for c in response["choices"]]
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert texts == [engine.generate(p, engine.omission([11, 17, 20]), max_new_tokens=3).text for p in (first, second)]
    assert response["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert [p["omitted_blocks"] for p in response["pudding"]] == [[11, 17, 20]] * 2
    as_text = server.post("/v1/completions", {"model": MODEL, "prompt": [first, second], "max_tokens": 3,
                                              "pudding": {"omit": [11, 17, 20]}}).json()
    assert [c["text"] for c in as_text["choices"]] == texts


def test_chat_log_probabilities_follow_the_generated_tokens(server):
    response = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, logprobs=True,
        top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    assert "".join(t.token for t in content).startswith(response.choices[0].message.content)
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-5)


@pytest.mark.slow
def test_a_client_leaving_before_a_whole_answer_stops_its_generation(server):
    before = server.health()["requests"]["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                         "max_tokens": MAX_LEN - 16}, timeout=1.5)
    deadline = time.monotonic() + 60
    while server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = server.health()
    assert not health["busy"] and health["requests"]["cancelled"] == before + 1


@pytest.mark.slow
def test_a_full_queue_is_answered_503(server):
    """Queue size 1: of four simultaneous slow requests one runs, one waits, the others are turned away."""
    barrier = threading.Barrier(4)
    responses = []

    def ask():
        barrier.wait()
        responses.append(server.post("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24}))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1 and set(statuses) == {200, 503}, statuses
    refused = next(r.json()["error"] for r in responses if r.status_code == 503)
    assert refused["type"] == "server_error" and refused["code"] == "server_overloaded"
    assert server.health()["requests"]["refused"] >= 1


@pytest.mark.slow
def test_a_client_leaving_mid_stream_stops_its_generation(server):
    before = server.health()["requests"]["cancelled"]
    request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_LEN - 16, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the first piece came; now hang up
    deadline = time.monotonic() + 60
    while server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = server.health()
    assert not health["busy"] and health["requests"]["cancelled"] == before + 1
    after = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert after.usage.completion_tokens == 3


def test_models_and_health_describe_the_server(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    info = models.data[0].pudding
    assert info["routed"] and info["sets"] == SETS and info["context"] == MAX_LEN and "greedy" in info["decoding"]
    health = server.health()
    assert health["routed"] and health["queue_size"] == 1


@pytest.mark.slow
def test_a_model_without_router_serves_its_fixed_set(tmp_path, engine):
    running = Server(tmp_path / "serve.log", "--model", MODEL, "--omit", "11,17,20", "--max-len", "256",
                     "--queue-size", "0", "--device", "cpu")
    try:
        info = running.client.models.list().data[0].pudding
        assert not info["routed"] and info["default_omit"] == [11, 17, 20] and info["sets"] == []
        prompt = "The capital of France is"
        response = running.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
        assert response.pudding["omitted_blocks"] == [11, 17, 20] and response.pudding["set_index"] is None
        assert response.choices[0].text == engine.generate(prompt, engine.omission([11, 17, 20]), max_new_tokens=5).text
        numbered = running.post("/v1/completions", {"model": MODEL, "prompt": prompt, "pudding": {"set": 0}})
        assert numbered.status_code == 400 and "pudding.omit" in numbered.json()["error"]["message"]
    finally:
        running.stop()


@pytest.mark.slow
def test_a_router_on_the_decoders_embeddings_routes_requests_from_their_token_ids(tmp_path, smollm2, engine):
    """Served with a router on the decoder's input embeddings, a completion is routed from the prompt's token ids the
    server has already made (no second tokenizer pass), and chooses what routing its text chooses; a chat request is
    routed by its last user message, whose ids are not the prompt's."""
    from pudding.policy import RoutedPolicy
    from pudding.router_training import train_bundle_router
    from pudding.serve.service import Service
    from pudding.serve.wire import OpenAIRequest

    model = {"name": smollm2.name, "fingerprint": smollm2.fingerprint, "num_blocks": smollm2.decoder.num_blocks}
    opened = Bundle.create_or_open(tmp_path / "bundle", model, 2, {})
    opened.write_candidates([CandidateSet(s, []) for s in SETS], {})
    settings = RouterSettings(encoder="embeddings", max_length=32, val_fraction=0.25)
    train_bundle_router(opened, synthetic_table(32), settings, decoder=(smollm2.tokenizer, smollm2.decoder.embed_tokens.weight))
    router = opened.router()
    prompts = ["Question: what does a cat eat?\nAnswer:", "The man opened the door and"]
    service = Service(engine, RoutedPolicy(router), MODEL, 1)
    request = OpenAIRequest(model=MODEL)
    job = service.job(prompts[0], prompts[0], request, 4, None, "prompt")
    assert job.route_tokens == engine.text_tokens(prompts[0]) and job.ids == engine.encode(prompts[0])
    chat = service.job("<|im_start|>user\n" + prompts[0], prompts[0], request, 4, None, "messages")
    assert chat.route_tokens is None
    running = Server(tmp_path / "serve.log", "--bundle", str(opened.path), "--max-len", str(MAX_LEN), "--device", "cpu")
    try:
        for prompt in prompts:
            info = running.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2).pudding
            assert info["routed"] and info["set_index"] == router.route([prompt]).choices[0]
        chatted = running.client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": prompts[1]}])
        assert chatted.pudding["set_index"] == router.route([prompts[1]]).choices[0]
    finally:
        running.stop()


def test_serve_command_rejects_bad_options(bundle):
    assert_clean_failure(pudding("serve", "--bundle", str(bundle), "--omit", "3"), "--omit is for a model")
    assert_clean_failure(pudding("serve", "--omit", "30"), "out of range")
    assert_clean_failure(pudding("serve", "--bundle", "/nonexistent"), "bundle directory not found")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_clean_failure(pudding("serve", "--port", str(taken.getsockname()[1])), "cannot listen")


def test_stop_scanner_holds_back_a_stop_string_split_across_pieces():
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.feed("hello E") == ("hello ", False)  # "E" may start "END"
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("Dless") == ("", True)
    scanner = StopScanner(["END"])
    assert scanner.feed("a bE") == ("a b", False)
    assert scanner.feed("x") == ("Ex", False)  # it was not a stop after all
    assert scanner.feed("yE") == ("y", False) and scanner.flush() == "E"
