"""A store in Redis: budgets shared by processes on many hosts.

Each operation is one Lua script, which Redis runs atomically: no other
command on the budget's keys runs between reading the totals and holding the
ask. A key's data lives in three Redis keys::

    {prefix}{key}:spent    hash   calls, input_tokens, output_tokens, cost_usd, expire_at
    {prefix}{key}:leases   hash   lease_id -> "calls input_tokens output_tokens cost_usd until"
    {prefix}{key}:markers  set    markers already recorded

``expire_at`` in the spent hash is the window's end as the callers last named
it: a reservation whose ``now`` is past it forgets the window first, as
MemoryStore does. Redis deletes all three keys by itself an hour after the
window ends (by the server's clock; the hour absorbs clock skew), so ended
windows never pile up.

Errors reaching Redis are raised, never retried here: the caller decides
whether a budget it cannot check fails open or closed, and a retried settle
could count a call twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from . import Amounts, Limits

__all__ = ["RedisStore"]

#: how long after a window's end Redis keeps its keys
EXPIRY_MARGIN_SECONDS = 3600

# Shared by the scripts. KEYS: spent, leases, markers. Lua numbers are doubles,
# as Python floats are: token counts are exact below 2**53, and a cost is added
# with the same double arithmetic as MemoryStore's and kept as "%.17g" text,
# which reads back as the same double (Redis would truncate a Lua number reply
# to an integer, and HINCRBYFLOAT rounds through long double).
_COMMON = """
local function expire(expire_at, margin)
    local at = math.ceil(tonumber(expire_at) + tonumber(margin))
    for _, name in ipairs(KEYS) do redis.call('EXPIREAT', name, at) end
end
local function cost(value) return string.format('%.17g', value) end
"""

# ARGV: now, expire_at, lease_id, lease_until, ask calls, input, output, cost,
#       limit calls, input, output, total tokens, cost ("" for no limit), margin
_RESERVE = (
    _COMMON
    + """
local now = tonumber(ARGV[1])
local ended = tonumber(redis.call('HGET', KEYS[1], 'expire_at'))
if ended and ended < now then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end

local spent = redis.call('HMGET', KEYS[1], 'calls', 'input_tokens', 'output_tokens', 'cost_usd')
local total = {}
for i = 1, 4 do total[i] = tonumber(spent[i]) or 0 end
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
    local held = {}
    for word in string.gmatch(leases[i + 1], '%S+') do held[#held + 1] = tonumber(word) end
    if held[5] <= now then
        redis.call('HDEL', KEYS[2], leases[i])
    else
        for j = 1, 4 do total[j] = total[j] + held[j] end
    end
end

local after = {}
for i = 1, 4 do after[i] = total[i] + tonumber(ARGV[4 + i]) end
-- in the order of Limits: calls, input, output, total tokens, cost
local checked = {after[1], after[2], after[3], after[2] + after[3], after[4]}
local ok = 1
for i = 1, 5 do
    local limit = ARGV[8 + i]
    if limit ~= '' and checked[i] > tonumber(limit) then ok = 0 end
end

redis.call('HSET', KEYS[1], 'expire_at', ARGV[2])
if ok == 1 then
    local lease = {ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[4]}
    redis.call('HSET', KEYS[2], ARGV[3], table.concat(lease, ' '))
end
expire(ARGV[2], ARGV[14])
return {ok, total[1], total[2], total[3], cost(total[4])}
"""
)

# ARGV: lease_id, calls, input, output, cost, expire_at, margin
_SETTLE = (
    _COMMON
    + """
redis.call('HDEL', KEYS[2], ARGV[1])
local calls = redis.call('HINCRBY', KEYS[1], 'calls', ARGV[2])
local input_tokens = redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[3])
local output_tokens = redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[4])
local cost_usd = cost((tonumber(redis.call('HGET', KEYS[1], 'cost_usd')) or 0) + tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'cost_usd', cost_usd, 'expire_at', ARGV[6])
expire(ARGV[6], ARGV[7])
return {calls, input_tokens, output_tokens, cost_usd}
"""
)

# ARGV: marker, expire_at, margin
_FIRST = (
    _COMMON
    + """
redis.call('HSET', KEYS[1], 'expire_at', ARGV[2])
local added = redis.call('SADD', KEYS[3], ARGV[1])
expire(ARGV[2], ARGV[3])
return added
"""
)


class RedisStore:
    """Budget totals in Redis, shared by every process that uses the same server and prefix.

    ``client`` is an existing ``redis.Redis`` to use instead of one made from
    ``url``; its own timeouts and retries apply then. Otherwise the client
    waits at most ``socket_timeout`` seconds to connect or for a reply, and
    never retries, so an unreachable server fails a call fast.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "runguard:",
        client: Any = None,
        socket_timeout: float = 1.0,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            try:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry
            except ImportError as e:
                raise ImportError(
                    "RedisStore needs the redis package: pip install agent-runguard[redis]"
                ) from e
            client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        self.name = _without_password(url)
        self.prefix = prefix
        self._client: Any = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._first = client.register_script(_FIRST)

    def reserve(
        self,
        key: str,
        ask: Amounts,
        limits: Limits,
        lease_id: str,
        lease_until: float,
        now: float,
        expire_at: float,
    ) -> tuple[bool, Amounts]:
        from . import Amounts

        ok, calls, input_tokens, output_tokens, cost_usd = self._reserve(
            keys=self._keys(key),
            args=[
                repr(float(now)),
                repr(float(expire_at)),
                lease_id,
                repr(float(lease_until)),
                *_amounts(ask),
                *("" if limit is None else repr(float(limit)) for limit in limits),
                EXPIRY_MARGIN_SECONDS,
            ],
        )
        return bool(ok), Amounts(int(calls), int(input_tokens), int(output_tokens), float(cost_usd))

    def settle(self, key: str, lease_id: str, actual: Amounts, expire_at: float) -> Amounts:
        from . import Amounts

        calls, input_tokens, output_tokens, cost_usd = self._settle(
            keys=self._keys(key),
            args=[lease_id, *_amounts(actual), repr(float(expire_at)), EXPIRY_MARGIN_SECONDS],
        )
        return Amounts(int(calls), int(input_tokens), int(output_tokens), float(cost_usd))

    def first(self, key: str, marker: str, expire_at: float) -> bool:
        added = self._first(
            keys=self._keys(key),
            args=[marker, repr(float(expire_at)), EXPIRY_MARGIN_SECONDS],
        )
        return bool(added)

    def close(self) -> None:
        """Close the connections of the client this store made (a client passed in is left open)."""
        if self._owns_client:
            self._client.close()

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{key}"
        return [f"{base}:spent", f"{base}:leases", f"{base}:markers"]


def _amounts(amounts: Amounts) -> tuple[str, str, str, str]:
    # repr of a float is the shortest text that reads back as the same double
    return (
        str(int(amounts.calls)),
        str(int(amounts.input_tokens)),
        str(int(amounts.output_tokens)),
        repr(float(amounts.cost_usd)),
    )


def _without_password(url: str) -> str:
    """The url to show in messages: a password in it is left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))
