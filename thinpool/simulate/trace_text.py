"""Vectorised text primitives for the trace readers (:mod:`thinpool.simulate.traces`).

A trace file is read in blocks of whole lines (:func:`iter_blocks`); each block is one ``uint8`` numpy
array that the helpers here cut into fields and convert with a fixed number of numpy operations per
block -- never a Python loop per line:

* :func:`split_whitespace` / :func:`split_delimited`: field boundaries (start, end), the line of every
  field and every line's first field and field count;
* :func:`parse_uint`: unsigned decimal fields to ``int64``, with a mask of malformed ones;
* :func:`parse_decimal`: ``[-]digits[.digits]`` fields to an exact (integer part, fraction in 10^-9)
  pair;
* :func:`words` / :func:`token_equals`: fields compared with short keywords through 8-byte words;
* :class:`Interner`: names (file names, host/disk pairs) to stable indices, one dictionary lookup per
  *change* of name between consecutive records.

Every block carries 8 bytes of zero padding after its last newline so that an 8-byte word can be read
at any field start (:func:`word_view`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

#: bytes per block read from a trace file (about 25,000 fio iolog lines: the temporaries stay in cache)
BLOCK_BYTES = 1 << 20
#: the longest line accepted (a longer one is malformed: nothing in these formats is that long)
MAX_LINE = 1 << 20
PAD = 8
_POW10 = 10 ** np.arange(19, dtype=np.int64)


class LineTooLong(Exception):
    """Raised by :func:`iter_blocks` for a line longer than :data:`MAX_LINE` (``line`` is its number)."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def iter_blocks(f: BinaryIO, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[np.ndarray, int, int]]:
    """Yield ``(buf, size, first_line)`` for consecutive blocks of whole lines of ``f``.

    ``buf[:size]`` is the text, always ending with a newline (one is added after a last line that lacks
    it), followed by :data:`PAD` zero bytes; ``first_line`` is the 1-based number of its first line.
    """
    carry = b""
    line = 1
    while True:
        data = f.read(block_bytes)
        if not data:
            if carry:
                yield _padded(carry + b"\n"), len(carry) + 1, line
            return
        if carry:
            data = carry + data
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) > MAX_LINE:
                raise LineTooLong(line)
            carry = data
            continue
        block = data[:cut + 1]
        carry = data[cut + 1:]
        if len(carry) > MAX_LINE:
            raise LineTooLong(line + block.count(b"\n"))   # once, on the way out
        buf = _padded(block)
        yield buf, len(block), line
        line += int(np.count_nonzero(buf == 10))


def _padded(block: bytes) -> np.ndarray:
    buf = np.empty(len(block) + PAD, dtype=np.uint8)
    buf[:len(block)] = np.frombuffer(block, dtype=np.uint8)
    buf[len(block):] = 0
    return buf


@dataclass
class Fields:
    """Fields of one block: ``start``/``end`` byte positions (end exclusive) of every field, the line
    (0-based within the block) of every field, and per line its first field and field count."""

    start: np.ndarray
    end: np.ndarray
    line_of: np.ndarray | None      # only split_delimited fills it
    first: np.ndarray
    count: np.ndarray

    @property
    def nlines(self) -> int:
        return len(self.count)


def _per_line(line_of: np.ndarray, nlines: int) -> tuple[np.ndarray, np.ndarray]:
    count = np.bincount(line_of, minlength=nlines).astype(np.int64)
    first = np.cumsum(count) - count
    return first, count


def split_whitespace(buf: np.ndarray, size: int) -> Fields:
    """Fields separated by runs of blanks (space, tab, carriage return, any byte below 32)."""
    text = buf[:size]
    sep = text <= 32
    edges = np.flatnonzero(sep[1:] != sep[:-1]) + 1    # where a field starts or ends, alternately
    if size and not sep[0]:
        edges = np.concatenate(([0], edges))
    start = edges[0::2]
    end = edges[1::2]                                  # the text ends with a newline: every field ends
    last = np.flatnonzero(text[end] == 10)             # fields right before a newline
    if len(last) == int(np.count_nonzero(text == 10)):
        # every line ends right after its last field: line i's fields are last[i-1]+1 .. last[i]
        count = np.diff(last, prepend=-1)
        first = last - count + 1
    else:                                              # blank lines or trailing blanks somewhere
        newlines = np.flatnonzero(text == 10)
        before = np.searchsorted(start, newlines)      # fields that start before each newline
        count = np.diff(before, prepend=0).astype(np.int64)
        first = before - count
    return Fields(start, end, None, first, count)


def split_delimited(buf: np.ndarray, size: int, delimiter: int = 44) -> Fields:
    """Fields separated by one delimiter byte (a comma by default); empty fields count, a carriage
    return before a newline is dropped.  No quoting (the trace formats read here never quote)."""
    text = buf[:size]
    is_nl = text == 10
    stops = np.flatnonzero((text == delimiter) | is_nl)
    nl_at = is_nl[stops]
    start = np.empty(len(stops), dtype=np.int64)
    start[0] = 0
    start[1:] = stops[:-1] + 1
    end = stops - ((text[np.maximum(stops - 1, 0)] == 13) & nl_at & (stops > start))
    last = np.flatnonzero(nl_at)                       # the last field of every line
    count = np.diff(last, prepend=-1)
    first = last - count + 1
    # a line with nothing on it has one empty field: report it as zero fields (a blank line)
    count[(count == 1) & (end[first] == start[first])] = 0
    return Fields(start, end, None, first, count)


def word_view(buf: np.ndarray) -> np.ndarray:
    """An unaligned little-endian ``uint64`` view of ``buf``: element ``i`` is bytes ``i..i+7``."""
    n = len(buf) - 7
    return np.ndarray(shape=(max(n, 0),), dtype="<u8", buffer=buf, offset=0, strides=(1,))


_FULL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _shift(length: np.ndarray) -> np.ndarray:
    """Bits to drop from an 8-byte word to keep ``length`` bytes: (8 - min(length, 8)) * 8, as uint64
    (64 for an empty field: numpy shifts a uint64 by 64 to 0)."""
    return (np.uint64(8) - np.minimum(length, 8).astype(np.uint64)) << np.uint64(3)


def _mask(length: np.ndarray) -> np.ndarray:
    return _FULL >> _shift(length)


def words(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The first (up to) 8 bytes of every field as one ``uint64`` (bytes past the field's end are 0)."""
    return word_view(buf)[start] & _mask(end - start)


def words_folded(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """:func:`words` with every byte OR 0x20: ASCII upper-case letters become lower-case, digits and
    lower-case letters stay, and no other byte becomes a letter (compare with lower-case keywords)."""
    mask = _mask(end - start)
    return (word_view(buf)[start] | np.uint64(0x2020202020202020)) & mask


def keyword(text: bytes) -> int:
    """The :func:`words` value of a keyword of at most 8 bytes."""
    assert len(text) <= 8
    return int.from_bytes(text.ljust(8, b"\0"), "little")


_ZEROS = np.uint64(0x3030303030303030)
_HIGH = np.uint64(0x8080808080808080)
_SIX = np.uint64(0x4646464646464646)
_LOW_PAIRS = np.uint64(0x000000FF000000FF)
_MUL1 = np.uint64(100 + (1000000 << 32))
_MUL2 = np.uint64(1 + (10000 << 32))


def _parse8(view: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to 8 decimal digits at ``start`` (``length`` of them, 0..8) -> (uint64 value, malformed mask),
    all digits of a field at once in one 64-bit word (SWAR)."""
    shift = _shift(length)
    mask = _FULL >> shift
    w = view[start]
    w &= mask
    w |= _ZEROS & ~mask                                  # bytes past the field read as '0'
    t = w + _SIX
    w -= _ZEROS                                          # digit values; a byte below '0' borrows
    t |= w
    t &= _HIGH
    bad = t != 0                                         # a byte outside '0'..'9'
    w <<= shift                                          # the digits to the top: leading zeros
    v = w * np.uint64(10)
    w >>= np.uint64(8)
    v += w                                               # pairs of digits
    hi = v >> np.uint64(16)
    hi &= _LOW_PAIRS
    hi *= _MUL2
    v &= _LOW_PAIRS
    v *= _MUL1
    v += hi
    v >>= np.uint64(32)
    return v, bad


def parse_uint(buf: np.ndarray, start: np.ndarray, end: np.ndarray, max_digits: int = 18
               ) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned decimal fields -> (``int64`` values, bool mask of malformed fields).

    A field is malformed when empty, longer than ``max_digits`` (<= 18, so every value fits ``int64``)
    or holding a byte other than ``0``-``9``; its value is then 0.  Eight digits at a time."""
    length = end - start
    bad = (length < 1) | (length > max_digits)
    value = np.zeros(len(start), dtype=np.uint64)
    if len(start) == 0:
        return value.view(np.int64), bad
    view = word_view(buf)
    longest = int(min(length.max(), max_digits))
    for part in range((longest + 7) // 8):           # part 0: the last 8 digits
        plen = np.clip(length - 8 * part, 0, 8)
        pstart = np.maximum(end - 8 * part - plen, 0)
        v, b = _parse8(view, pstart, plen)
        bad |= b
        value += v * np.uint64(10 ** (8 * part))
    value[bad] = 0
    return value.view(np.int64), bad


def parse_decimal(buf: np.ndarray, start: np.ndarray, end: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[-]digits[.digits]`` fields -> (integer part, fraction in units of 10^-9, malformed mask).

    The value is ``int_part + sign * frac_ns / 1e9`` with ``int_part`` carrying the sign; digits of the
    fraction past the ninth are ignored (truncated).  Both parts are exact integers, so time stamps
    keep nanosecond resolution whatever their magnitude."""
    n = len(start)
    neg = np.zeros(n, dtype=bool)
    if n:
        neg = (end > start) & (buf[start] == 45)
    s = start + neg
    # the decimal point: the first '.' in the field, found by scanning at most 20 bytes
    length = end - s
    dot = end.copy()
    if n:
        for j in range(int(min(length.max(), 20)) - 1, -1, -1):
            here = (length > j) & (buf[np.where(length > j, s + j, 0)] == 46)
            dot = np.where(here, s + j, dot)
    whole, bad_w = parse_uint(buf, s, dot)
    has_frac = dot < end
    fs = np.where(has_frac, dot + 1, end)
    fe = np.where(has_frac, np.minimum(end, dot + 10), end)
    frac, bad_f = parse_uint(buf, fs, fe, max_digits=9)
    bad_f &= has_frac
    # digits past the ninth must still be digits
    extra_bad = np.zeros(n, dtype=bool)
    if n and (end - fe).max() > 0:
        tail_len = end - fe
        for j in range(int(tail_len.max())):
            inside = tail_len > j
            d = buf[np.where(inside, fe + j, 0)] - np.uint8(48)
            extra_bad |= inside & (d > 9)
    frac *= _POW10[9 - np.clip(fe - fs, 0, 9)]
    bad = bad_w | bad_f | extra_bad | (has_frac & (fe <= fs))
    whole = np.where(neg, -whole, whole)
    frac = np.where(neg, -frac, frac)
    whole[bad] = 0
    frac[bad] = 0
    return whole, frac, bad


def equal_to_previous(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Bool per field: the same bytes as the field before it (False for the first)."""
    n = len(start)
    same = np.zeros(n, dtype=bool)
    if n < 2:
        return same
    length = end - start
    same[1:] = length[1:] == length[:-1]
    view = word_view(buf)
    mask = _mask(length)
    for k in range(0, int(length.max()), 8):
        off = start + np.minimum(k, np.maximum(length - 8, 0))
        w = view[off] & mask
        same[1:] &= w[1:] == w[:-1]
    return same


class Interner:
    """Names -> indices in order of first appearance (``names``), kept across blocks."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[bytes, int] = {}

    def add(self, name: bytes) -> int:
        """The index of ``name``, adding it when new."""
        i = self._index.get(name)
        if i is None:
            i = self._index[name] = len(self.names)
            self.names.append(name.decode("utf-8", "backslashreplace"))
        return i

    def intern(self, buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """The index of every field's bytes (``int32``).  Only fields that differ from the one before
        them are looked up; when there are many such (volumes interleaved record by record), their
        distinct values are found with one ``np.unique`` over fixed-width rows first, so the dictionary
        sees each distinct name of the block once."""
        out = np.empty(len(start), dtype=np.int32)
        if len(start) == 0:
            return out
        heads = np.flatnonzero(~equal_to_previous(buf, start, end))
        hs, he = start[heads], end[heads]
        width = int((he - hs).max())
        if len(heads) > 256 and width <= 256:
            # rows: the name's bytes, zero-padded, then its length (so a trailing NUL stays distinct)
            k = np.arange(width)
            rows = np.zeros((len(heads), width + 2), dtype=np.uint8)
            inside = k < (he - hs)[:, None]
            rows[:, :width] = np.where(inside, buf[np.where(inside, hs[:, None] + k, 0)], 0)
            rows[:, width] = (he - hs) & 0xFF
            rows[:, width + 1] = (he - hs) >> 8
            keys = np.ascontiguousarray(rows).view(np.dtype((np.void, width + 2))).ravel()
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")     # add in order of first appearance
            ids = np.empty(len(first), dtype=np.int32)
            for j in order.tolist():
                i = int(first[j])
                ids[j] = self.add(buf[hs[i]:he[i]].tobytes())
            head_idx = ids[inverse.ravel()]
        else:
            head_idx = np.empty(len(heads), dtype=np.int32)
            for n, (s, e) in enumerate(zip(hs.tolist(), he.tolist())):
                head_idx[n] = self.add(buf[s:e].tobytes())
        is_head = np.zeros(len(start), dtype=bool)
        is_head[heads] = True
        out[:] = head_idx[np.cumsum(is_head) - 1]
        return out
