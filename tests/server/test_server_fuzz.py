"""Property-based fuzzing of both endpoints (hypothesis): arbitrary JSON in every field, plausible
and implausible values, lone surrogates, huge integers, non-finite numbers, arbitrary extra nesting,
and raw bytes. Every body gets 200 or a 4xx in OpenAI's error shape, never a 5xx, and the server
still answers /health afterwards. Runs in-process against the real app and stories260K; derandomized
so CI sees the same cases each run (FUZZ_EXAMPLES per endpoint, RAW_EXAMPLES raw bodies)."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pydantic")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_helpers import JSON, app_client_fixture  # noqa: E402

pytestmark = pytest.mark.slow


MODEL = "stories260K"
FUZZ_EXAMPLES = 300
RAW_EXAMPLES = 100
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ----------------------------------------------------------------------------------

text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\0", "Once upon a time", "Lily", " ", "<|im_start|>", "[INST]", "\ud800",
                     "a\udfffb", "\U0001f600", "x" * 3000]),
)
huge = st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 2 ** 31, -1, 0])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), huge,
                   st.floats(allow_nan=True, allow_infinity=True), text)
anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(text, inner, max_size=4), max_leaves=12)


def field(plausible):
    """Mostly plausible (so that later fields get checked too), sometimes anything at all."""
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda junk: anything if junk else plausible)


part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": field(text)}), anything)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "wizard"]),
                           "content": field(st.one_of(text, st.lists(part, max_size=3)))},
                          optional={"name": field(text)}),
    anything)
response_format = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                          optional={"json_schema": field(st.fixed_dictionaries(
                              {"name": field(st.sampled_from(["a", "x_y-1", "bad name", ""]))},
                              optional={"schema": anything, "strict": field(st.booleans())}))}),
    anything)
COMMON = {
    "temperature": field(st.one_of(st.floats(0, 2), st.sampled_from([0.0, 1e-45, 1e-38, 1e-30]))),
    "top_p": field(st.one_of(st.floats(0, 1), st.sampled_from([1e-40, 0.0, 1.0]))),
    "seed": field(st.integers()),
    "stop": field(st.one_of(text, st.lists(text, max_size=5))),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "n": field(st.integers(0, 3)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "logit_bias": field(st.dictionaries(text, field(st.floats(-200, 200)), max_size=2)),
    "top_logprobs": field(st.integers(-1, 21)),
    "response_format": response_format,
    "tools": anything,
    "user": field(text),
}
COMPLETION = {**COMMON, "echo": field(st.booleans()), "best_of": field(st.integers(0, 3)),
              "logprobs": field(st.integers(-1, 6)), "suffix": field(text)}
CHAT = {**COMMON, "logprobs": field(st.booleans()), "max_completion_tokens": field(st.integers(1, 4))}
prompt = field(st.one_of(text, st.lists(st.integers(-2, 600), max_size=8), st.lists(text, max_size=2),
                         st.lists(st.lists(st.integers(0, 511), max_size=3), max_size=2)))
model = field(st.just(MODEL))
max_tokens = field(st.integers(1, 3))  # mostly small: valid requests stay quick
depth = st.sampled_from([0] * 12 + [3, 63, 64, 65, 1000, 100_000])


def body(required: dict, optional: dict):
    return st.tuples(st.fixed_dictionaries(required, optional=optional), depth)


def encode(fields: dict, nesting: int) -> bytes:
    """The body as JSON (lone surrogates escaped, NaN/Infinity as Python writes them), with an
    unknown field nested `nesting` deep spliced in as text."""
    data = json.dumps(fields, allow_nan=True)
    if nesting:
        extra = '"deep": ' + "[" * nesting + "]" * nesting
        data = "{" + extra + ("," if fields else "") + data[1:]
    return data.encode()


# -- the app ---------------------------------------------------------------------------------------

client = app_client_fixture(MODEL, max_batch=4, max_queue=8)


def check(r):
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)
        assert "Traceback" not in error["message"] and "Error(" not in error["message"]
    elif r.headers["content-type"].startswith("application/json"):
        assert r.json()["choices"]
    else:
        assert r.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
@given(case=body({"model": model, "prompt": prompt, "max_tokens": max_tokens}, COMPLETION))
def test_completions_never_5xx(client, case):
    check(client.post("/v1/completions", content=encode(*case), headers=JSON))


@settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
@given(case=body({"model": model, "messages": field(st.lists(message, max_size=4)),
                  "max_tokens": max_tokens}, CHAT))
def test_chat_never_5xx(client, case):
    check(client.post("/v1/chat/completions", content=encode(*case), headers=JSON))


@settings(max_examples=RAW_EXAMPLES, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_raw_bodies_never_5xx(client, data, path):
    check(client.post(path, content=data, headers=JSON))


def test_health_answers_after_fuzzing(client):
    assert client.get("/health").json()["status"] == "ok"
