"""The HTTP gateway through the official `openai` client, against the real services on tiny models."""
import asyncio
import concurrent.futures
import http.client
import json
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import PROMPTS

from amusd_mq import AsyncClient, models
from amusd_mq.cli.launch import Deployment

MAX_TOKENS = 16
MODEL = "tiny-verify"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A deployment with a gateway in front: its URLs and an HTTP helper."""

    def __init__(self, deployment: Deployment, port: int):
        self.d = deployment
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self):
        """The coordinator's own counts."""
        async def ask():
            async with AsyncClient(self.d.url, timeout_s=10) as client:
                return await client.status()

        return asyncio.run(ask())

    def wait_listening(self, timeout_s: float = 60) -> tuple[int, str]:
        """Until the gateway answers /health, whatever it says."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.d.check_alive()
            try:
                return self.get("/health")
            except OSError:
                assert time.monotonic() < deadline, "the gateway never listened"
                time.sleep(0.1)

    def wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.d.check_alive()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the gateway never became healthy")

    def metrics(self) -> dict[str, float]:
        """Every sample of a scrape, by its name and labels as written."""
        _, text = self.get("/metrics")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0)


def start(tiny_cache: str, roles=("coordinator", "verify", "draft"), **env) -> Served:
    sock_dir = tempfile.mkdtemp(prefix="amg-")
    port = int(env.pop("AMUSD_HTTP_PORT", 0)) or free_port()
    d = Deployment({"AMUSD_COORDINATOR_URL": f"ipc://{sock_dir}/c", "AMUSD_DRAFT_MODEL": "tiny-draft",
                    "AMUSD_VERIFY_MODEL": MODEL, "AMUSD_DTYPE": "float32", "AMUSD_CACHE_DIR": tiny_cache,
                    "AMUSD_THREADS": "1", "AMUSD_HEARTBEAT_S": "0.25", "AMUSD_HTTP_PORT": str(port),
                    **{k: str(v) for k, v in env.items()}}, f"{sock_dir}/logs", ("gateway", *roles))
    return Served(d, port)


@pytest.fixture(scope="module")
def served(tiny_cache):
    s = start(tiny_cache, AMUSD_MAX_BATCH=8)
    try:
        s.wait_healthy()
        yield s
    finally:
        s.d.stop()
        shutil.rmtree(s.d.log_dir.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def greedy(reference, tiny_verify):
    """The verify model's own greedy text and ids for a prompt (text, or ids) or a chat."""
    tok = tiny_verify.tokenizer

    def run(prompt=None, messages=None, max_tokens=MAX_TOKENS):
        if messages is not None:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = prompt if isinstance(prompt, list) else tok(prompt)["input_ids"]
        out = reference(ids, max_tokens)
        return tok.decode(out, skip_special_tokens=True), out, ids

    return run


def test_completions_are_the_verify_models_own_output(served, greedy):
    client = served.client()
    text, ids, prompt_ids = greedy(PROMPTS[0])
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == text and r.model == MODEL and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason in ("stop", "length")
    spec = r.choices[0].speculation
    assert spec["accepted"] <= spec["proposed"] and set(spec) == {"proposed", "accepted", "rollbacks",
                                                                  "acceptance_rate"}
    as_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0)
    assert as_ids.choices[0].text == text
    several = client.completions.create(model=MODEL, prompt=PROMPTS[1:4], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [greedy(p)[0] for p in PROMPTS[1:4]]
    assert several.usage.completion_tokens == sum(len(greedy(p)[1]) for p in PROMPTS[1:4])


@pytest.mark.asyncio
async def test_the_same_through_the_python_client(served, greedy):
    async with AsyncClient(served.d.url, timeout_s=30) as client:
        r = await client.generate(PROMPTS[0], max_new_tokens=MAX_TOKENS)
    http = served.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert http.choices[0].text == r.text == greedy(PROMPTS[0])[0]


def test_chat_renders_the_models_template(served, greedy):
    messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "A stack in Python?"}]
    text, ids, prompt_ids = greedy(messages=messages)
    r = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.object == "chat.completion"


@pytest.mark.asyncio
async def test_streams_carry_the_same_text_then_usage(served, greedy):
    client = served.async_client()
    text, ids, _ = greedy(PROMPTS[2])
    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    end = chunks[-2].choices[0]
    assert end.finish_reason in ("stop", "length") and "speculation" in end.model_extra
    messages = [{"role": "user", "content": PROMPTS[3]}]
    chat = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chat) == greedy(messages=messages)[0]
    assert all(c.usage is None for c in chat)  # not asked for
    sync = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in sync) == greedy(messages=messages)[0]
    await client.close()


def test_stop_strings_end_the_text_before_them(served, greedy):
    text, _, _ = greedy(PROMPTS[5], max_tokens=40)
    stop = text[10:13]
    assert stop and text.index(stop) >= 1
    client = served.client()
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


@pytest.mark.asyncio
async def test_fifty_concurrent_streams_lose_and_duplicate_nothing(served, greedy):
    client = served.async_client()
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(50)]

    async def one(prompt: str) -> tuple[str, int]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        return "".join(pieces), usage.completion_tokens

    results = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    for prompt, (text, n) in zip(prompts, results):
        expected, ids, _ = greedy(prompt)
        assert (text, n) == (expected, len(ids)), prompt


def test_bad_parameters_get_openai_errors(served):
    client = served.client()
    bad = [dict(prompt="x", n=2), dict(prompt="x", temperature=-1), dict(prompt="x", top_p=0),
           dict(prompt="x", max_tokens=0), dict(prompt="x", logprobs=2), dict(prompt="x", echo=True),
           dict(prompt=""), dict(prompt="x", seed=-1), dict(prompt=[1, 10**6]),  # outside the vocabulary
           dict(prompt=[1] * 2040, max_tokens=16), dict(prompt=[1] * 2040, max_tokens=16, stream=True)]  # context
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, **{"max_tokens": 4, **kwargs})
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error", kwargs
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, max_tokens=4, logprobs=True,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only text"):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])
    status, body = served.post("/v1/completions", {"model": MODEL, "max_tokens": 4})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "prompt"


def test_prompts_over_the_frame_limit_are_refused_within_a_second(served, greedy):
    """Beside a request that is served: a body too large to become a frame (20 and 100 MiB) is refused before it is
    read, and a smaller one (5 MiB) by the client's frame check, each with OpenAI's error body."""
    client = served.client(timeout=30)
    text, _, _ = greedy("def fib(n):")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        normal = pool.submit(client.completions.create, model=MODEL, prompt="def fib(n):", max_tokens=MAX_TOKENS,
                             temperature=0)
        for mib in (5, 20, 100):
            prompt = "x" * (mib << 20)
            start = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
            assert time.monotonic() - start < 1.0, mib
            assert err.value.status_code == 413 and err.value.body["type"] == "invalid_request_error", mib
        assert normal.result().choices[0].text == text
    assert served.get("/health")[0] == 200
    assert served.metrics()['amusd:request_failure_total{status="413"}'] >= 3


def test_a_disconnect_frees_the_workers(served):
    """A stream abandoned after its first chunk, and a non-streamed request whose client gives up, are cancelled
    at the coordinator at once, long before their 1500 tokens could be done; the next request is served."""
    cancelled = served.status().cancelled
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1500,
                                                        "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read(6) == b"data: "
    conn.close()
    with pytest.raises(openai.APITimeoutError), served.client(timeout=0.5) as impatient:  # closed: it hangs up
        impatient.completions.create(model=MODEL, prompt="y", max_tokens=1500, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 2
    while (status := served.status()).cancelled < cancelled + 2 or status.active:
        assert time.monotonic() < deadline, f"the abandoned requests are not cancelled: {status}"
        time.sleep(0.1)
    r = served.client().completions.create(model=MODEL, prompt="z", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_metrics_move_and_their_acceptance_matches_the_requests(served):
    before = served.metrics()
    client = served.client()
    results = [client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
               for p in PROMPTS[6:10]]
    after = served.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    spec = [r.choices[0].speculation for r in results]
    proposed, accepted = sum(s["proposed"] for s in spec), sum(s["accepted"] for s in spec)
    assert delta("amusd:spec_decode_num_draft_tokens_total") == proposed
    assert delta("amusd:spec_decode_num_accepted_tokens_total") == accepted
    assert delta("amusd:spec_decode_num_rollbacks_total") == sum(s["rollbacks"] for s in spec)
    tokens = sum(r.usage.completion_tokens for r in results)
    assert delta("amusd:generation_tokens_total") == tokens
    assert delta("amusd:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert delta("amusd:time_to_first_token_seconds_count") == 4
    assert delta("amusd:e2e_request_latency_seconds_count") == 4
    assert delta("amusd:request_queue_time_seconds_count") == 4
    assert delta("amusd:inter_token_latency_seconds_count") == tokens - 4  # one per token after each first
    assert delta("amusd:spec_decode_num_verify_steps_total") > 0
    if proposed:  # the aggregate rate is the per-request rates weighted by what each proposed
        rate = delta("amusd:spec_decode_num_accepted_tokens_total") / delta("amusd:spec_decode_num_draft_tokens_total")
        assert rate == pytest.approx(sum(s["acceptance_rate"] * s["proposed"] for s in spec) / proposed)
    assert after['amusd:workers{role="verify"}'] == 1 and after['amusd:workers{role="draft"}'] == 1
    assert after["amusd:num_requests_waiting"] == 0
    assert re.search(r"^# TYPE amusd:inter_token_latency_seconds histogram$", served.get("/metrics")[1], re.M)


def test_models_and_health(served):
    status, body = served.get("/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [MODEL]
    assert [m.id for m in served.client().models.list()] == [MODEL]
    status, body = served.get("/health")
    assert status == 200 and json.loads(body)["verifiers"] == 1


def test_an_api_key_is_required_when_set(served, tiny_cache):
    """A second gateway in front of the same deployment, with a key."""
    port = free_port()
    served.d.start("gateway", name="keyed", AMUSD_HTTP_PORT=str(port), AMUSD_API_KEY="sesame")
    keyed = Served(served.d, port)
    keyed.wait_healthy(60)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=keyed.base + "/v1", api_key="sesame", max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert keyed.get("/health")[0] == 200  # probes and scrapes need no key
    served.d.procs.pop("keyed").terminate()


def test_a_request_before_the_workers_waits_for_them(tiny_cache, greedy):
    """The gateway answers at once; without a verifier /health is 503, and a request sent then is served once one
    registers."""
    s = start(tiny_cache, roles=("coordinator",))
    try:
        status, body = s.wait_listening()
        assert status == 503 and json.loads(body)["verifiers"] == 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            early = pool.submit(s.client(timeout=120).completions.create, model=MODEL, prompt=PROMPTS[0],
                                max_tokens=MAX_TOKENS, temperature=0)
            time.sleep(1.0)
            assert not early.done()
            s.d.start("verify")
            assert early.result().choices[0].text == greedy(PROMPTS[0])[0]
        assert s.get("/health")[0] == 200
    finally:
        s.d.stop()


def test_no_verifier_in_time_is_a_503(tiny_cache):
    s = start(tiny_cache, roles=("coordinator",), AMUSD_QUEUE_TIMEOUT_S=0.5)
    try:
        s.wait_listening()
        with pytest.raises(openai.InternalServerError) as err:
            s.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert err.value.status_code == 503 and "no verify worker" in str(err.value)
    finally:
        s.d.stop()


def test_a_deadline_past_is_a_504(served):
    with pytest.raises(openai.InternalServerError) as err:
        served.client().completions.create(model=MODEL, prompt="x", max_tokens=1500,
                                           extra_body={"ignore_eos": True, "deadline_s": 0.3})
    assert err.value.status_code == 504 and err.value.body["type"] == "timeout"


def test_a_chat_for_a_model_without_a_template_is_a_400(tiny_cache, tmp_path):
    bare = tmp_path / "bare-verify"
    shutil.copytree(models.resolve("tiny-verify", tiny_cache), bare)
    (bare / "chat_template.jinja").unlink()
    s = start(tiny_cache, roles=("coordinator", "verify"), AMUSD_VERIFY_MODEL=str(bare))
    try:
        s.wait_healthy()
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            s.client().chat.completions.create(model=str(bare), max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
        assert s.client().completions.create(model=str(bare), prompt="hi", max_tokens=4).usage.completion_tokens
    finally:
        s.d.stop()


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(tiny_cache):
    """The verifier killed mid-stream with no spare: the stream, already answered 200, ends with one error event
    and [DONE]."""
    s = start(tiny_cache, roles=("coordinator", "verify"), AMUSD_FAILOVER_S=0.5, AMUSD_VERIFY_DELAY_MS=20)
    try:
        s.wait_healthy()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1500,
                                                            "ignore_eos": True, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        s.d.procs["verify"].kill()
        events = [line for line in response.read().decode().splitlines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and error["code"] == "worker_lost"
        assert all("choices" in json.loads(e.removeprefix("data: ")) for e in events[:-2])
    finally:
        s.d.stop()


def test_a_taken_port_is_a_clear_error_and_exit_code_2(tiny_cache):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s = start(tiny_cache, roles=(), AMUSD_HTTP_PORT=taken.getsockname()[1])
        try:
            assert s.d.procs["gateway"].wait(30) == 2
            assert "cannot listen on http://127.0.0.1" in s.d.log_tail("gateway")
        finally:
            s.d.stop()
