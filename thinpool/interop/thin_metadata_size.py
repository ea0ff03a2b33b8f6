"""What ``thin_metadata_size`` 0.9.0 prints: the metadata area estimate for a pool's geometry.

:func:`metadata_size_blocks` is the estimate in 4 KiB blocks; :func:`format_metadata_size` parses the
tool's -b/-s/-m/-u/-n arguments (its unit suffixes included) and prints what the tool prints, byte for
byte.  Error messages are the tool's own texts (the one for a refused block size goes on to name
the pool block sizes accepted besides powers of two).
"""

from __future__ import annotations

import math

from ..errors import InvalidArgument
from .ir import SECTOR

__all__ = ["metadata_size_blocks", "format_metadata_size"]

_U64 = (1 << 64) - 1   # the tool's unsigned 64-bit arithmetic wraps modulo 2^64


_UNIT_CHARS = "bskKmMgGtTpPeEzZyY"
_UNIT_NAMES = ("bytes", "sectors", "kibibytes", "kilobytes", "mebibytes", "megabytes",
               "gibibytes", "gigabytes", "tebibytes", "terabytes", "pebibytes", "petabytes",
               "ebibytes", "exabytes", "zebibytes", "zetabytes", "yobibytes", "yottabytes")


def _unit_factors() -> list[int]:
    f = [1, 512, 1024, 1000]
    for u in range(4, len(_UNIT_NAMES), 2):
        f.append(f[u - 2] * 1024 & _U64)   # unsigned long long: the biggest units wrap, as in the tool
        f.append(f[u - 1] * 1000 & _U64)
    return f


_UNIT_FACTORS = _unit_factors()
_MAPPINGS_PER_BLOCK = (4096 - 64) // 16   # 252, the 0.9.0 estimate
#: the tool's text for a block size it refuses; ours goes on to say what else is accepted
BLOCK_SIZE_MESSAGE = "block size must be 2^^N"
_MIN_POOL_BLOCK = (64 << 10) // SECTOR     # 128 sectors: dm-thin's smallest data block
_MAX_POOL_BLOCK = (1 << 30) // SECTOR      # 2,097,152 sectors: its largest


def _unit_index(text: str) -> int:
    """The tool's unit lookup: one character from ``bskKmM…``, else a prefix of a unit name."""
    if len(text) == 1:
        return _UNIT_CHARS.find(text)
    for i, name in enumerate(_UNIT_NAMES):
        if name.startswith(text):
            return i
    return -1


def metadata_size_blocks(block_size_bytes: int, pool_size_bytes: int, max_thins: int) -> int:
    """thin_metadata_size 0.9.0's estimate, in 4 KiB metadata blocks.

    ``1 + 2 × pool_sectors ÷ block_sectors ÷ 252 + max_thins`` (integer divisions; sizes are
    taken in whole 512-byte sectors as the tool does).  The block size may be a power of two (what
    the tool accepts) or any block size a pool accepts (a multiple of 64 KiB from 64 KiB to 1 GiB,
    dm-thin's rule; the tool refuses those that are not powers of two, the same formula covers
    them).  Raises :class:`InvalidArgument` with the tool's texts when a value is zero, the block
    size is neither ("block size must be 2^^N") or the pool is not larger than a block.
    """
    block = block_size_bytes // SECTOR
    pool = pool_size_bytes // SECTOR
    _check_sizes(block, pool, max_thins)
    return 1 + 2 * pool // block // _MAPPINGS_PER_BLOCK + max_thins


def _pool_block_size(sectors: int) -> bool:
    """Whether ``sectors`` is a block size a pool accepts: a multiple of 128 sectors (64 KiB) from 128
    to 2,097,152 (1 GiB), dm-thin's ``DATA_DEV_BLOCK_SIZE_MIN/MAX_SECTORS`` rule."""
    return _MIN_POOL_BLOCK <= sectors <= _MAX_POOL_BLOCK and sectors % _MIN_POOL_BLOCK == 0


def _check_sizes(block: int, pool: int, max_thins: int) -> None:
    if not block:
        raise InvalidArgument("block size required!")
    if not pool:
        raise InvalidArgument("pool size required!")
    if not max_thins:
        raise InvalidArgument("max thins required!")
    if block & (block - 1) and not _pool_block_size(block):
        raise InvalidArgument(f"{BLOCK_SIZE_MESSAGE} (or a multiple of 64KiB from 64KiB to 1GiB, as a pool's; "
                              f"got {block} sectors)")
    if pool <= block:
        raise InvalidArgument("pool size must be larger than block size")


def _size_option(arg: str, is_max_thins: bool, default_unit: int) -> tuple[int, str]:
    """One -b/-s/-m value as the tool reads it: (sectors, or a count for -m; its echo string)."""
    digits = arg[:len(arg) - len(arg.lstrip("0123456789"))]
    suffix = arg[len(digits):]
    # atoll saturates (and more than 19 significant digits is past 2^63: not converted, Python refuses
    # a number of more than 4,300 digits)
    significant = digits.lstrip("0")
    number = min(int(significant or "0") if len(significant) <= 19 else 1 << 63, (1 << 63) - 1)
    if suffix:
        idx = _unit_index(suffix)
        if idx < 0:
            raise InvalidArgument("Invalid unit specifier!")
        value = number * _UNIT_FACTORS[idx] & _U64
        if not is_max_thins:
            value //= SECTOR
        return value, digits + _UNIT_NAMES[idx]
    value = (number * SECTOR & _U64) // SECTOR
    return value, digits if is_max_thins else digits + _UNIT_NAMES[default_unit]


def format_metadata_size(block_size: str | int, pool_size: str | int, max_thins: str | int,
                         unit: str | None = None, numeric: bool | str = False) -> str:
    """What ``thin_metadata_size -b B -s S -m M [-u U] [-n[ARG]]`` 0.9.0 prints (with the newline).

    Values take the tool's suffixes: one of ``bskKmMgGtTpPeEzZyY`` (lower case binary, upper case
    decimal; ``s`` = sectors, the default) or a prefix of a long name (``64kibi``, ``1petabytes``,
    ``1mega``); a suffix on -m multiplies the count.  *unit* is the ``-u`` output unit (default
    sectors).  *numeric*: False prints the full sentence, True is ``-n`` (the number alone), a
    string is ``-nARG`` (a prefix of ``short`` appends the unit letter, of ``long`` the unit name).
    The number is printed as an integer when whole, else ``%0.2f`` (``%0.2e`` if the fraction is
    below 0.01).  Raises :class:`InvalidArgument` carrying the tool's message (e.g. "block size
    must be 2^^N", "Invalid unit specifier!", "output unit specifier invalid!", "-n invalid option
    argument").  The arguments are taken in the order written above (the tool's echo of a value
    without a suffix names the -u unit only if -u came first).
    """
    sectors = 1
    block, s_block = _size_option(str(block_size), False, sectors)
    pool, s_pool = _size_option(str(pool_size), False, sectors)
    thins, s_thins = _size_option(str(max_thins), True, sectors)
    out_unit = sectors
    if unit is not None:
        out_unit = _unit_index(unit)
        if out_unit < 0:
            raise InvalidArgument("output unit specifier invalid!")
    mode = "full"
    if numeric is True:
        mode = "number"
    elif isinstance(numeric, str):
        is_long = "long".startswith(numeric)
        if not numeric or not (is_long or "short".startswith(numeric)):
            raise InvalidArgument("-n invalid option argument")
        mode = "long" if is_long else "short"
    _check_sizes(block, pool, thins)

    blocks = ((2 * pool & _U64) // block // _MAPPINGS_PER_BLOCK + thins) & _U64
    r = (1.0 + float(blocks)) * 4096.0
    factor = _UNIT_FACTORS[out_unit]
    r = r / factor if factor else math.inf
    if math.isinf(r):
        text = "0"  # the tool prints (unsigned long long)inf, which is 0 on x86-64
    elif r == math.floor(r):
        text = str(int(r))
    else:
        text = ("%0.2e" if r - math.floor(r) < 1e-2 else "%0.2f") % r
    if mode == "full":
        return (f"thin_metadata_size - {text} {_UNIT_NAMES[out_unit]} estimated metadata area size for "
                f'"--block-size={s_block} --pool-size={s_pool} --max-thins={s_thins}"\n')
    if mode == "short":
        text += _UNIT_CHARS[out_unit]
    elif mode == "long":
        text += _UNIT_NAMES[out_unit]
    return text + "\n"
