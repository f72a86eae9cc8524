"""The memcached door: the text and meta protocols on the same store (docs/memcached.md)."""
