"""A batch the flush path claimed: its keys' writes (member, version, document), and the
dead letters of the writes Postgres refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from service.core.redis_keys import split_member


class Item(NamedTuple):
    """One key's write in a batch (a tuple: a batch builds one per key, and a frozen
    dataclass' __init__ made decoding a claim's reply ~1.7 times slower)."""

    member: str
    version: str
    document: bytes | None  # None: a delete

    @property
    def collection(self) -> str:
        return split_member(self.member)[0]

    @property
    def key(self) -> str:
        return split_member(self.member)[1]


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    items: list[Item]
    shard: int = 0  # a batch holds keys of one shard: its scripts touch one slot


@dataclass(frozen=True, slots=True)
class DeadLetter:
    item: Item
    sqlstate: str | None
    error: str


def decode_claim(raw: Sequence[bytes | None]) -> list[Item]:
    """claim.lua's reply: member, version, document (None for a delete), ..."""
    members = [m.decode() for m in raw[0::3]]  # type: ignore[union-attr]
    versions = [v.decode() for v in raw[1::3]]  # type: ignore[union-attr]
    return list(map(Item, members, versions, raw[2::3]))
