"""Records and the sets of records a privacy event was drawn from, in a compact, content-addressed form.

Every record a hospital protects has a stable id (a string: by default a digest of its image and
label, see :meth:`fedpriv.data.LabeledImages.ids`). The ledger works on 64-bit *keys*, the first 8
bytes of sha256 of the id: 100,000 records fit in 800 kB, and a membership test over them is one
vectorised ``numpy.isin``. Two ids sharing a key (odds about n^2 / 2^65, ~3e-10 for 100,000
records) can only make the ledger over-count: both records are charged every event of either.

A :class:`RecordSet` is the sorted array of keys of one event's eligible records. It is named by
the sha256 of its bytes, so a set that many events share (a hospital's records are usually the same
round after round) is stored once, and any change to a stored set is detected.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

KEY_DTYPE = np.dtype("<u8")


def record_key(record_id: str) -> int:
    """The 64-bit ledger key of one record id."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "little")


def record_keys(record_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The keys of ``record_ids``, in the same order, as an unsigned 64-bit array (read-only)."""
    ids = np.asarray(record_ids, dtype=str)
    # A round asks for the same ids' keys several times (budget check, charge, status): one digest of
    # the whole array names them, far cheaper than a digest per id.
    name = hashlib.sha256(ids.dtype.str.encode() + ids.tobytes()).digest()
    with _KEYS_LOCK:
        known = _KEYS.get(name)
    if known is None:
        known = np.fromiter((record_key(str(i)) for i in ids), dtype=KEY_DTYPE, count=len(ids))
        known.setflags(write=False)
        with _KEYS_LOCK:
            _KEYS[name] = known
            while len(_KEYS) > 8:
                _KEYS.popitem(last=False)
    return known


_KEYS: OrderedDict[bytes, np.ndarray] = OrderedDict()
_KEYS_LOCK = threading.Lock()


@dataclass(frozen=True)
class RecordSet:
    """A set of record keys, sorted and unique; ``digest`` names it in the ledger."""

    keys: np.ndarray
    digest: str

    @classmethod
    def of(cls, keys: Iterable[int] | np.ndarray) -> RecordSet:
        unique = np.unique(np.asarray(keys, dtype=KEY_DTYPE))
        unique.setflags(write=False)
        return cls(unique, set_digest(unique.tobytes()))

    @classmethod
    def from_bytes(cls, blob: bytes) -> RecordSet:
        """A stored set (its digest is recomputed from the bytes, so a changed blob shows)."""
        keys = np.frombuffer(blob, dtype=KEY_DTYPE)
        return cls(keys, set_digest(blob))

    def to_bytes(self) -> bytes:
        return self.keys.tobytes()

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A boolean mask: which of ``keys`` are in this set (a binary search: the set is sorted)."""
        return sorted_contains(self.keys, keys)


def sorted_contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A boolean mask: which of ``keys`` are in the sorted array ``sorted_keys`` (binary search)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def set_digest(blob: bytes) -> str:
    return hashlib.sha256(b"fedpriv-record-set/v1\n" + blob).hexdigest()


def signatures(membership: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group records by which sets they belong to.

    ``membership`` is a (records x sets) boolean matrix. Returns ``(patterns, inverse)``: the
    distinct rows (one per group of records with the same history) and, for each record, the index
    of its row. Records with the same row have the same epsilon, so the accountant runs once a group.
    """
    records, sets = membership.shape
    if sets == 0:
        return np.zeros((1, 0), dtype=bool), np.zeros(records, dtype=np.int64)
    packed = np.packbits(membership, axis=1, bitorder="little")
    if sets <= 64:
        # Up to 64 sets, a row is one 64-bit number: a 1-D unique, far faster than unique rows.
        codes = np.zeros((records, 8), dtype=np.uint8)
        codes[:, :packed.shape[1]] = packed
        unique, inverse = np.unique(codes.view("<u8").reshape(-1), return_inverse=True)
        unique_rows = unique.astype("<u8").view(np.uint8).reshape(-1, 8)
    else:
        unique_rows, inverse = np.unique(packed, axis=0, return_inverse=True)
    patterns = np.unpackbits(unique_rows, axis=1, count=sets, bitorder="little").astype(bool)
    return patterns, inverse.reshape(-1)


def all_distinct(keys: np.ndarray) -> bool:
    """Whether ``keys`` has no repeats (remembered for the read-only arrays `record_keys` returns)."""
    with _KEYS_LOCK:
        for known, answer in _DISTINCT:
            if known is keys:
                return answer
    answer = len(np.unique(keys)) == len(keys)
    if not keys.flags.writeable:  # an array that cannot change keeps its answer
        with _KEYS_LOCK:
            _DISTINCT.append((keys, answer))
            del _DISTINCT[:-8]
    return answer


_DISTINCT: list[tuple[np.ndarray, bool]] = []


class MembershipIndex:
    """Which of the record sets it was given hold a key: every (key, set) pair, sorted by key.

    A ledger shared by many hospitals (fedpriv's simulated hospitals share one per data source)
    holds thousands of small sets, and a hospital's records are in a few of them. Testing each set
    for each hospital costs a binary search per set per call; with this index a call costs a binary
    search per record, however many sets there are. Sets are immutable and named by their digest,
    so what the index says of a digest stays true; the ledger still reads and checks (or takes from
    the store's cache) every set it then uses.

    At most ``limit`` pairs: `add` refuses (returns False) sets that would not fit even alone.
    """

    def __init__(self, limit: int = 4_000_000) -> None:
        self.limit = limit
        self.clear()

    def clear(self) -> None:
        self._keys = np.zeros(0, dtype=KEY_DTYPE)
        self._owners = np.zeros(0, dtype=np.int64)
        self._digests: list[str] = []
        self._position: dict[str, int] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._position

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, sets: Sequence[RecordSet]) -> bool:
        """Index those of `sets` not indexed yet; over the limit, start again with just them.

        Returns False (nothing added) if they alone exceed the limit. After a fresh start, sets
        indexed before are no longer in (``digest in index`` says so).
        """
        distinct = list({s.digest: s for s in sets}.values())
        new = [s for s in distinct if s.digest not in self._position]
        if sum(len(s) for s in distinct) > self.limit:
            return False
        if len(self._keys) + sum(len(s) for s in new) > self.limit:
            self.clear()
            new = distinct
        if not new:
            return True
        first = len(self._digests)
        for offset, records in enumerate(new):
            self._position[records.digest] = first + offset
            self._digests.append(records.digest)
        keys = np.concatenate([s.keys for s in new])
        owners = np.repeat(np.arange(first, first + len(new), dtype=np.int64), [len(s) for s in new])
        order = np.argsort(keys, kind="stable")
        keys, owners = keys[order], owners[order]
        at = np.searchsorted(self._keys, keys, side="right")
        self._keys = np.insert(self._keys, at, keys)
        self._owners = np.insert(self._owners, at, owners)
        return True

    def holding(self, keys: np.ndarray) -> set[str]:
        """The digests of the indexed sets that hold at least one of `keys`."""
        if not len(self._keys) or not len(keys):
            return set()
        low = np.searchsorted(self._keys, keys, side="left")
        high = np.searchsorted(self._keys, keys, side="right")
        counts = high - low
        if not counts.any():
            return set()
        starts = np.repeat(low, counts)
        steps = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return {self._digests[i] for i in np.unique(self._owners[starts + steps]).tolist()}
