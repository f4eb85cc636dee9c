"""The base of every API model: camelCase on the wire, snake_case in Python, unknown fields
rejected."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

# An amount of money, as a decimal string (exact: never a float): prices and money budgets.
MONEY_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"


def money(value: Decimal) -> str:
    """A cost as shown in messages and status: at most 6 decimals, no trailing zeros."""
    text = f"{value.quantize(Decimal('0.000001')):f}".rstrip("0").rstrip(".")
    return text or "0"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The JSON form as stored in the API server (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
