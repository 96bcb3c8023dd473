"""Who may call the API and how often: API keys (CASTBOT_API_KEYS) and per-client rate limits (CASTBOT_RATE_LIMIT).

    CASTBOT_API_KEYS="web:k3y-one,telegram:k3y-two"     # name:key pairs; the name is the client's identity
    CASTBOT_API_KEYS_FILE=/run/secrets/castbot-keys      # the same pairs in a file (one per line or comma-separated)
    CASTBOT_RATE_LIMIT=30/minute                         # per client: per key, or per address when open

With no keys the service runs open and says so at start-up; every client is then its address (address_client: an
IPv6 client by its /64, which one host holds whole). Keys are compared in constant time and never logged: a refusal
names the header, not the key.
"""

import contextvars
import hmac
import ipaddress
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
# takes between sweeps of idle buckets: SWEEP_EVERY, or as many as the buckets the last sweep left (O(1) a take)
SWEEP_EVERY = 1000
# who sent the request being answered: set at the door (castbot/serve/admission.py), read where turns are logged
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("castbot_client", default="")
logger = logging.getLogger("castbot.service")


class AccessConfigError(ValueError):
    """CASTBOT_API_KEYS* or CASTBOT_RATE_LIMIT cannot be read; the message names the variable, never a key."""


def parse_keys(text: str, source: str) -> dict[str, str]:
    """'name:key,name:key' (commas or newlines) -> {key: name}. Names and keys are non-empty and unique."""
    keys: dict[str, str] = {}
    names: set[str] = set()
    for i, pair in enumerate(p.strip() for p in text.replace("\n", ",").split(",")):
        if not pair or pair.startswith("#"):
            continue
        name, sep, key = pair.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise AccessConfigError(f"{source}: entry {i + 1} is not name:key")
        if name in names:
            raise AccessConfigError(f"{source}: the name '{name}' is given twice")
        if key in keys:
            raise AccessConfigError(f"{source}: two names share one key ('{keys[key]}' and '{name}')")
        keys[key], names = name, names | {name}
    return keys


def keys_from_env(env=os.environ) -> dict[str, str]:
    """{key: client name} from CASTBOT_API_KEYS and CASTBOT_API_KEYS_FILE (both may be set); {} means open."""
    keys = parse_keys(env.get("CASTBOT_API_KEYS", ""), "CASTBOT_API_KEYS")
    path = env.get("CASTBOT_API_KEYS_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise AccessConfigError(f"CASTBOT_API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
        for key, name in parse_keys(text, "CASTBOT_API_KEYS_FILE").items():
            if key in keys or name in keys.values():
                raise AccessConfigError(f"CASTBOT_API_KEYS_FILE: '{name}' is also in CASTBOT_API_KEYS")
            keys[key] = name
    return keys


def client_of(keys: dict[str, str], authorization: str | None) -> str | None:
    """The client name for an `Authorization: Bearer KEY` header, or None when it names no key."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    token = token.strip().encode()
    found = None
    for key, name in keys.items():  # every key is compared: the time does not tell which one nearly matched
        if hmac.compare_digest(key.encode(), token):
            found = name
    return found


def address_client(host: str) -> str:
    """The client an open service sees at an address: 'address:203.0.113.9'; an IPv6 address by its /64
    ('address:2001:db8:1:2::/64'), the block a single host or home network gets, so rotating addresses inside it
    does not dodge the rate limit; an IPv4 address mapped into IPv6 (::ffff:203.0.113.9) as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "unknown", a Unix socket's name
        return f"address:{host}"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        return f"address:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"address:{ip}"


@dataclass(frozen=True)
class RateLimit:
    """`requests` per `period` seconds for each client, with bursts up to `requests`."""

    requests: int
    period: float

    @classmethod
    def parse(cls, text: str) -> "RateLimit":
        """'30/minute', '5/second', '1000/hour', '10000/day'."""
        count, sep, unit = text.strip().partition("/")
        unit = unit.strip().lower().removesuffix("s")
        if not sep or not count.strip().isdigit() or int(count) < 1 or unit not in PERIODS:
            raise AccessConfigError(f"CASTBOT_RATE_LIMIT: '{text}' is not N/second, N/minute, N/hour or N/day")
        return cls(int(count), PERIODS[unit])


def rate_limit_from_env(env=os.environ) -> RateLimit | None:
    text = env.get("CASTBOT_RATE_LIMIT", "").strip()
    return RateLimit.parse(text) if text else None


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per client: each holds `requests` tokens and refills at requests/period per second, so one
    client's burst empties its own bucket and nobody else's. A bucket idle for a period is full again: it is dropped
    (swept every SWEEP_EVERY takes or more), so memory holds only the clients of the last period."""

    limit: RateLimit
    clock: callable = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _takes: int = 0  # since the last sweep
    _sweep_at: int = SWEEP_EVERY

    def held(self) -> int:
        """Clients whose buckets are held (not __len__: an empty limiter must stay truthy)."""
        return len(self._buckets)

    def take(self, client: str, cost: int = 1) -> float:
        """Spend `cost` requests of `client`'s allowance: 0.0 when allowed, else the seconds to wait (Retry-After)."""
        rate = self.limit.requests / self.limit.period  # requests per second
        cost = min(cost, self.limit.requests)  # a request larger than the whole allowance waits for a full bucket
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(client) or _Bucket(float(self.limit.requests), now)
            bucket.tokens = min(self.limit.requests, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            self._buckets[client] = bucket
            if bucket.tokens >= cost:
                bucket.tokens -= cost
                wait = 0.0
            else:
                wait = (cost - bucket.tokens) / rate
            self._takes += 1
            if self._takes >= self._sweep_at:
                self._forget_idle(now)
        return wait

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets untouched for a period: refilled by now, they are what a new client gets."""
        idle = [client for client, bucket in self._buckets.items() if now - bucket.updated >= self.limit.period]
        for client in idle:
            del self._buckets[client]
        self._takes, self._sweep_at = 0, max(SWEEP_EVERY, len(self._buckets))


def retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def announce(keys: dict[str, str], limit: RateLimit | None) -> None:
    """Say at start-up who may call: the key names (never the keys), or that the service is open to anyone."""
    if keys:
        logger.info("API keys required on every API route: %d clients (%s)", len(keys),
                    ", ".join(sorted(keys.values())))
    else:
        logger.warning("no CASTBOT_API_KEYS: the API is open to anyone who can reach it; clients are told apart by "
                       "address")
    if limit:
        logger.info("rate limit: %d requests per %g s per client (CASTBOT_RATE_LIMIT)", limit.requests, limit.period)
