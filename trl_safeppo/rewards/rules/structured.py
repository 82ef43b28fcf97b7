"""JSON output: validity and optional JSON-schema conformance (``jsonschema``)."""

from __future__ import annotations

import json
import re
from typing import Any

from ..base import Rule, answer_region, check_extract

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.DOTALL)


def extract_json_text(region: str) -> str:
    """The last fenced code block (```json ... ```) if any, else the stripped region."""
    blocks = _FENCE.findall(region)
    return (blocks[-1] if blocks else region).strip()


class JSONRule(Rule):
    def __init__(
        self,
        schema: dict | None = None,
        schema_column: str | None = None,
        extract: str = "answer",
        valid_score: float | None = None,
    ):
        if schema is not None and schema_column is not None:
            raise ValueError("reward rule 'json': give `schema` or `schema_column`, not both")
        self.__name__ = "json"
        self.schema = schema
        self.schema_column = schema_column
        self.columns = (schema_column,) if schema_column else ()
        self.extract = check_extract("json", extract)
        has_schema = schema is not None or schema_column is not None
        self.valid_score = float(valid_score if valid_score is not None else (0.5 if has_schema else 1.0))
        if schema is not None:
            self._check_schema(schema)

    @staticmethod
    def _check_schema(schema: Any) -> None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"reward rule 'json': the schema is not a valid JSON schema: {err.message}") from None

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        schema = self.schema
        if self.schema_column is not None:
            schema = row[self.schema_column]
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError:
                    return None
            if not isinstance(schema, dict):
                return None
        candidate = extract_json_text(answer_region(text, self.extract))
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            return 0.0
        if schema is None:
            return self.valid_score
        import jsonschema

        try:
            validator = jsonschema.validators.validator_for(schema)(schema)
            errors = next(iter(validator.iter_errors(value)), None)
        except jsonschema.SchemaError:
            return None
        return 1.0 if errors is None else self.valid_score


def json_reward(
    schema: dict | None = None, schema_column: str | None = None, extract: str = "answer",
    valid_score: float | None = None,
) -> JSONRule:
    """JSON validity and optional schema conformance.

    Without a schema: 1.0 if the answer (the last fenced ```json block if any, else the answer region) is valid JSON,
    else 0.0. With a ``schema`` (fixed) or ``schema_column`` (per row, a dict or JSON string): 1.0 if valid and
    conforming, ``valid_score`` (default 0.5) if valid JSON that breaks the schema, 0.0 if not JSON. An invalid
    per-row schema gives ``None``.

    Example:
    ```python
    >>> rule = json_reward(schema={"type": "object", "required": ["x"]})
    >>> rule(completions=['<answer>{"x": 1}</answer>', '<answer>{"y": 1}</answer>', "<answer>{x: 1}</answer>"])
    [1.0, 0.5, 0.0]

    ```
    """
    return JSONRule(schema=schema, schema_column=schema_column, extract=extract, valid_score=valid_score)
