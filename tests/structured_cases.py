"""JSON schemas and regexes that structured-output tests sample against (Python API, CLI, server)."""

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "owner": {"type": "object",
                      "properties": {"first": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 1, "maximum": 99}},
                      "required": ["first", "age"], "additionalProperties": False}},
        "required": ["name", "owner"], "additionalProperties": False},
    "array_bounds": {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                 "minItems": 2, "maxItems": 4}},
        "required": ["words"], "additionalProperties": False},
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False},
    "number_ranges": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -5.5, "maximum": 10},
                       "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
                       "ok": {"type": "boolean"}},
        "required": ["x", "n", "ok"], "additionalProperties": False},
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "note": {"type": "string", "maxLength": 15},
                       "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                       "extra": {"type": ["null", "boolean"]}},
        "required": ["id"], "additionalProperties": False},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50},
                        "minItems": 1, "maxItems": 5},
}

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe), [a-z]{1,10}\.",
    r"(Once|One day) [a-z]+( [a-z]+){0,6}\.",
    r"(café|naïve|😀) [A-Z][a-z]{0,5}",  # multi-byte characters: byte-fallback pieces
]


def json_format(name, schema):
    """OpenAI's response_format for `schema`, strict."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
