"""Property-based fuzzing of `response_format` schemas (hypothesis): bounded schemas the model can
finish (objects, arrays, enums, strings, integers, nested), sometimes broken on purpose (recursive
or dangling $ref, unknown types, impossible ranges, bad patterns, non-schemas, JSON text). Every
request gets a 200 whose output validates against its schema, or a 400 naming response_format;
never a 5xx. In-process against the real app and stories260K; derandomized, EXAMPLES cases."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pydantic")
pytest.importorskip("llguidance")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_helpers import app_client_fixture  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "stories260K"
EXAMPLES = 100
MAX_TOKENS = 160  # every bounded schema below ends well within this
SETTINGS = dict(deadline=None, derandomize=True, database=None, max_examples=EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

name = st.text("abcdefghij_", min_size=1, max_size=6)
leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(name, st.integers(-9, 9), st.booleans()), min_size=1, max_size=4, unique=True)
      .map(lambda values: {"enum": values}),
    st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(["^[a-c]{1,3}$", "^x?y$", "^[0-9]{2}$"])),
)


def _object(props, required_all):
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": list(props) if required_all else list(props)[:1]}


bounded = st.recursive(leaf, lambda inner: st.one_of(
    st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 3)),
    st.builds(_object, st.dictionaries(name, inner, min_size=1, max_size=3), st.booleans()),
    st.lists(inner, min_size=1, max_size=3).map(lambda options: {"anyOf": options}),
), max_leaves=6)

BREAKAGE = [
    lambda s: {"$ref": "#"},
    lambda s: _object({"self": {"$ref": "#"}, "v": s}, False),
    lambda s: {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    lambda s: {"$ref": "#/$defs/missing"},
    lambda s: {"type": "objectt"},
    lambda s: {"type": "integer", "minimum": 5, "maximum": 2},
    lambda s: {"type": "string", "pattern": "[a-"},
    lambda s: {"type": "string", "format": "no-such-format"},
    lambda s: [s],
    lambda s: 17,
    lambda s: json.dumps(s),  # a schema as JSON text: served like the object
    lambda s: "[" * 100 + "]" * 100,
]
schema = st.one_of(bounded, st.tuples(st.sampled_from(BREAKAGE), bounded).map(lambda fs: fs[0](fs[1])))


client = app_client_fixture(MODEL, max_batch=4, max_queue=8)


@settings(**SETTINGS)
@given(schema=schema, seed=st.integers(1, 1000), chat=st.booleans())
def test_schemas_get_valid_output_or_a_400(client, schema, seed, chat):
    fmt = {"type": "json_schema", "json_schema": {"name": "fuzz", "schema": schema}}
    body = {"model": MODEL, "seed": seed, "temperature": 1.0, "max_tokens": MAX_TOKENS, "response_format": fmt}
    if chat:
        r = client.post("/v1/chat/completions", json=dict(body, messages=[{"role": "user", "content": "JSON!"}]))
    else:
        r = client.post("/v1/completions", json=dict(body, prompt="Once upon a time"))
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])
    if r.status_code == 400:
        error = r.json()["error"]
        assert error["param"].startswith("response_format"), error
        assert "\n" not in error["message"] and "Traceback" not in error["message"]
        return
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert choice["finish_reason"] == "stop", (schema, text)
    jsonschema.validate(json.loads(text), json.loads(schema) if isinstance(schema, str) else schema)
