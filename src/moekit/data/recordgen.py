"""Seeded structured documents: JSON payloads, CSV tables and log files of made-up records.

Real structured files with a clear licence are few on a machine (the corpus adds the tzdata and
iso-codes tables where they exist); this generator supplies the bulk of the structured domain with
the syntax a model meets in practice. Document `i` of seed `s` depends only on `(s, i)`. All
addresses are documentation ranges and example domains, so nothing points at a real host.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import MappingProxyType


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _words(
    "Ada Bruno Chen Dana Emeka Farah Goran Hana Ivan Juno Kofi Lena "
    "Mateo Nia Oskar Priya Quinn Rosa Sven Tara Umar Vera Wei Yara"
)
_LAST = _words(
    "Alvarez Berg Costa Dubois Eze Fischer Garcia Haddad Ito Jensen "
    "Kowalski Larsen Moreau Nakamura Okafor Petrov Rossi Silva Tanaka Weber"
)
_CITIES = _words(
    "Lisbon Osaka Nairobi Toronto Lyon Krakow Austin Pune Leeds Porto Seoul Quito Tartu Perth Bergen Cusco"
)
_PRODUCTS = (
    "desk lamp",
    "water bottle",
    "notebook",
    "usb cable",
    "backpack",
    "headphones",
    "mug",
    "keyboard",
    "monitor stand",
    "plant pot",
    "umbrella",
    "bike light",
)
_CATEGORIES = ("home", "office", "outdoor", "electronics", "kitchen")
_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled", "refunded")
_CURRENCIES = ("EUR", "USD", "JPY", "GBP")
_EVENTS = ("login", "logout", "page_view", "search", "add_to_cart", "checkout", "error")
_SERVICES = ("api", "auth", "billing", "worker", "scheduler", "gateway")
_PATHS = (
    "/api/v1/users",
    "/api/v1/orders",
    "/api/v1/products",
    "/health",
    "/login",
    "/static/app.js",
    "/api/v2/search",
    "/metrics",
)
_METHODS = ("GET", "GET", "GET", "POST", "PUT", "DELETE")
_HTTP = (200, 200, 200, 201, 204, 301, 304, 400, 401, 403, 404, 500, 503)
_LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR")
_MESSAGES = (
    "connection established to {host}",
    "request completed in {ms} ms",
    "cache miss for key user:{id}",
    "retrying job {id} (attempt {n})",
    "worker {n} started",
    "timeout after {ms} ms contacting {host}",
    "queue depth is {n}",
    "user {id} authenticated",
    "scheduled task finished with status {status}",
    "disk usage at {n}%",
)
_HOSTS = ("db-1.example.internal", "cache-2.example.internal", "queue.example.internal", "api.example.com")
_EPOCH = datetime(2021, 1, 1, tzinfo=UTC)


def _timestamp(rng: random.Random) -> datetime:
    return _EPOCH + timedelta(seconds=rng.randint(0, 4 * 365 * 86400))


def _ip(rng: random.Random) -> str:
    prefix = rng.choice(("192.0.2", "198.51.100", "203.0.113"))  # RFC 5737 documentation ranges
    return f"{prefix}.{rng.randint(1, 254)}"


def _person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    domain = rng.choice(("example.com", "example.org", "example.net"))
    return f"{first} {last}", f"{first.lower()}.{last.lower()}@{domain}"


def _user(rng: random.Random, i: int) -> dict:
    name, email = _person(rng)
    return {
        "id": 1000 + i * rng.randint(1, 7),
        "name": name,
        "email": email,
        "age": rng.randint(18, 80),
        "city": rng.choice(_CITIES),
        "active": rng.random() < 0.8,
        "signup_date": _timestamp(rng).date().isoformat(),
    }


def _order(rng: random.Random, i: int) -> dict:
    quantity = rng.randint(1, 5)
    price = round(rng.uniform(2, 250), 2)
    return {
        "order_id": f"ORD-{rng.randint(10000, 99999)}",
        "customer_id": rng.randint(1000, 9999),
        "sku": f"SKU-{rng.randint(100, 999)}",
        "quantity": quantity,
        "unit_price": price,
        "total": round(quantity * price, 2),
        "currency": rng.choice(_CURRENCIES),
        "status": rng.choice(_STATUSES),
        "created_at": _timestamp(rng).isoformat().replace("+00:00", "Z"),
    }


def _reading(rng: random.Random, i: int) -> dict:
    return {
        "sensor_id": f"s-{rng.randint(1, 64):03d}",
        "location": rng.choice(_CITIES),
        "timestamp": (_EPOCH + timedelta(minutes=15 * i)).isoformat().replace("+00:00", "Z"),
        "temperature_c": round(rng.gauss(18, 8), 1),
        "humidity_pct": rng.randint(10, 100),
        "battery_v": round(rng.uniform(3.1, 4.2), 2),
    }


def _product(rng: random.Random, i: int) -> dict:
    return {
        "sku": f"SKU-{rng.randint(100, 999)}",
        "name": rng.choice(_PRODUCTS),
        "category": rng.choice(_CATEGORIES),
        "price": round(rng.uniform(1, 300), 2),
        "stock": rng.randint(0, 500),
        "rating": round(rng.uniform(1, 5), 1),
    }


def _event(rng: random.Random, i: int) -> dict:
    return {
        "event_id": f"{rng.getrandbits(64):016x}",
        "type": rng.choice(_EVENTS),
        "user_id": rng.randint(1000, 9999),
        "timestamp": _timestamp(rng).isoformat().replace("+00:00", "Z"),
        "duration_ms": rng.randint(1, 5000),
        "success": rng.random() < 0.9,
    }


_SCHEMAS: MappingProxyType[str, Callable[[random.Random, int], dict]] = MappingProxyType(
    {"users": _user, "orders": _order, "readings": _reading, "products": _product, "events": _event}
)


def _records(rng: random.Random) -> tuple[str, list[dict]]:
    schema = rng.choice(sorted(_SCHEMAS))
    make = _SCHEMAS[schema]
    return schema, [make(rng, i) for i in range(rng.randint(3, 30))]


def _json_document(rng: random.Random) -> str:
    schema, rows = _records(rng)
    shape = rng.choice(("array", "page", "keyed"))
    if shape == "page":
        payload: object = {schema: rows, "count": len(rows), "page": rng.randint(1, 20), "next": None}
    elif shape == "keyed":
        key = next(iter(rows[0]))
        payload = {str(row[key]): {k: v for k, v in row.items() if k != key} for row in rows}
    else:
        payload = rows
    indent = rng.choice((2, 2, 4, None))
    return json.dumps(payload, indent=indent, ensure_ascii=False)


def _csv_document(rng: random.Random) -> str:
    _, rows = _records(rng)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")


def _message(rng: random.Random) -> str:
    return rng.choice(_MESSAGES).format(
        host=rng.choice(_HOSTS),
        ms=rng.randint(1, 30000),
        id=rng.randint(1, 99999),
        n=rng.randint(1, 99),
        status=rng.choice(("ok", "failed", "skipped")),
    )


def _log_document(rng: random.Random) -> str:
    style = rng.choice(("app", "access", "jsonl"))
    when = _timestamp(rng)
    service = rng.choice(_SERVICES)
    lines = []
    for _ in range(rng.randint(5, 40)):
        when += timedelta(milliseconds=rng.randint(1, 90000))
        if style == "app":
            stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
            lines.append(
                f"{stamp} {service}[{rng.randint(100, 9999)}] {rng.choice(_LEVELS):<5} {_message(rng)}"
            )
        elif style == "access":
            stamp = when.strftime("%d/%b/%Y:%H:%M:%S +0000")
            request = f"{rng.choice(_METHODS)} {rng.choice(_PATHS)} HTTP/1.1"
            lines.append(f'{_ip(rng)} - - [{stamp}] "{request}" {rng.choice(_HTTP)} {rng.randint(0, 90000)}')
        else:
            record = {
                "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": rng.choice(_LEVELS).lower(),
                "service": service,
                "msg": _message(rng),
            }
            lines.append(json.dumps(record))
    return "\n".join(lines)


_KINDS: MappingProxyType[str, Callable[[random.Random], str]] = MappingProxyType(
    {"json": _json_document, "csv": _csv_document, "log": _log_document}
)
RECORD_KINDS: tuple[str, ...] = tuple(sorted(_KINDS))


def generate_record_document(seed: int, index: int) -> tuple[str, str]:
    """Document `index` of the stream for `seed`, as (kind, text); kind is json, csv or log."""
    rng = random.Random(f"moekit-records:{seed}:{index}")
    kind = rng.choice(RECORD_KINDS)
    return kind, _KINDS[kind](rng)
