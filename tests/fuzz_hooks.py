"""schemathesis hooks (SCHEMATHESIS_HOOKS) for tests/test_fuzz.py.

The OpenAPI document says in JSON Schema what JSON Schema can say; the rules it can only say
in words (api_doc.py's docstring lists them, each operation's description states its own)
are applied here to the fuzzer's *valid* examples, so that a "schema-valid request rejected"
is always a real mismatch. Negative (schema-violating) examples are left as generated: the
server must reject every one of them. Each rule is written from the contract's words, not by
calling the server's validators (Frankfurter's Ruby to_f excepted: frankfurter.py is that
rule, tested against Ruby's own behaviour in test_frankfurter.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import schemathesis
from schemathesis import GenerationMode

import frankfurter

MIN_RATE, MAX_RATE, MAX_DIGITS = Decimal("1e-12"), Decimal("1e12"), 15
MAX_SPAN_DAYS = 3652
SEEDED_VERSIONS = 2  # test_fuzz.seed_rows writes two rows before the fuzzer starts
# A Frankfurter amount this large overflows a double once multiplied by a rate (v1: 422).
FK_AMOUNT_CEILING = 1e290


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _decimal_ok(value: Any) -> bool:
    """The contract's rate rule: at least 1e-12, below 1e12, at most 15 significant digits."""
    if isinstance(value, bool):
        return False
    try:
        number = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        return False
    if not number.is_finite() or not MIN_RATE <= number < MAX_RATE:
        return False
    digits = number.normalize().as_tuple().digits
    return len(digits) <= MAX_DIGITS


def _as_of_ok(value: Any) -> bool:
    """`as_of`: after 1900 and not more than a day ahead (the format itself is the schema's)."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return True  # not ours to judge: the schema's date-time format is
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.year >= 1900 and moment <= datetime.now(UTC) + timedelta(days=1)


def _pair_differs(case: Any) -> bool:
    path = case.path_parameters or {}
    if "base" in path and "quote" in path and _upper(path["base"]) == _upper(path["quote"]):
        return False
    body = case.body if isinstance(case.body, dict) else {}
    base, quote = body.get("base", path.get("base")), body.get("quote", path.get("quote"))
    return base is None or quote is None or _upper(base) != _upper(quote)


def _body_matches_path(case: Any) -> bool:
    path, body = case.path_parameters or {}, case.body if isinstance(case.body, dict) else {}
    return all(_upper(body[name]) == _upper(path[name]) for name in ("base", "quote")
               if name in body and name in path)


def _rate_fields_ok(case: Any) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    if "rate" in body and not _decimal_ok(body["rate"]):
        return False
    return "as_of" not in body or _as_of_ok(body["as_of"])


def _query(case: Any) -> dict[str, Any]:
    return case.query or {}


def _convert_ok(case: Any) -> bool:
    query = _query(case)
    if "from" in query and "to" in query and _upper(query["from"]) == _upper(query["to"]):
        return False
    return "amount" not in query or _decimal_ok(query["amount"])


def _source_needs_date(case: Any) -> bool:
    query = _query(case)
    return "source" not in query or "date" in query


def _history_range_ok(case: Any) -> bool:
    query = _query(case)
    if "start" not in query:
        return True
    start = date.fromisoformat(query["start"])
    end = date.fromisoformat(query["end"]) if "end" in query else datetime.now(UTC).date()
    return start <= end and (end - start).days <= MAX_SPAN_DAYS


def _min_version_issued(case: Any) -> bool:
    """Header and query agree, and name a version already issued (above it is 422): the
    fuzz test seeds rows first, so versions up to SEEDED_VERSIONS exist."""
    header = (case.headers or {}).get("X-Xrates-Min-Version")
    query = _query(case).get("min_version")
    if header is not None and query is not None and str(header).strip() != str(query).strip():
        return False
    given = header if header is not None else query
    return given is None or int(str(given).strip()) <= SEEDED_VERSIONS


def _fk_query_ok(case: Any) -> bool:
    query = _query(case)
    if "amount" in query:
        amount = frankfurter.ruby_to_f(query["amount"])
        if not 0 < amount < FK_AMOUNT_CEILING:
            return False
    base = next((query[name] for name in ("from", "base") if name in query), None)
    symbols = next((query[name] for name in ("to", "symbols") if name in query), None)
    if base is None or symbols is None:
        return True
    split = [part for part in symbols.upper().split(",")]
    while split and split[-1] == "":
        split.pop()
    return split != [base.upper()]


Rule = Callable[[Any], bool]
# By operation path (as documented); every rule must hold for a valid example.
RULES: dict[str, tuple[Rule, ...]] = {
    "/v1/rates": (_pair_differs, _rate_fields_ok),
    "/v1/rates/{base}/{quote}": (_pair_differs, _body_matches_path, _rate_fields_ok,
                                 _source_needs_date, _min_version_issued),
    "/v1/rates/{base}/{quote}/history": (_pair_differs, _history_range_ok),
    "/v1/convert": (_convert_ok, _source_needs_date),
    **{path: (_fk_query_ok,) for path in ("/latest", "/current", "/v1/latest", "/v1/current",
                                          "/{when}", "/v1/{when}")},
}


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.generation.mode == GenerationMode.POSITIVE


@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    """Keep a valid example only if it keeps the rules the document states in words."""
    if not _positive(case):
        return True
    return all(rule(case) for rule in RULES.get(case.operation.path, ()))
