"""Token authentication that reports whether django-rest-knox-redis used its cache.

Behaviour is exactly knox_redis's; the subclass only records which path decided, so the
protected view can tell the test driver whether an entry written by another program was
accepted as a cache hit.
"""

from knox_redis.auth import TokenAuthentication


class ObservedRedisTokenAuthentication(TokenAuthentication):
    #: "hit" (cached entry accepted), "stale" (entry present but rejected), "miss" (no entry)
    cache_outcome = None

    def _authenticate_authoritative_hit(self, *args, **kwargs):
        result = super()._authenticate_authoritative_hit(*args, **kwargs)
        self.cache_outcome = "hit" if result is not None else "stale"
        return result

    def _authenticate_database_miss(self, token):
        if self.cache_outcome is None:
            self.cache_outcome = "miss"
        return super()._authenticate_database_miss(token)
