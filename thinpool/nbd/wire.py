"""NBD wire constants: magic numbers, flags, option / command / reply numbers, error values, sizes and
limits, as the NBD protocol specification (``doc/proto.md`` of the NetworkBlockDevice project) names
them.  Plain integers and strings; the encoders and decoders are :mod:`thinpool.nbd.protocol`, which
re-exports every name here (``protocol.CMD_READ`` is ``wire.CMD_READ``).
"""

from __future__ import annotations

# --------------------------------------------------------------------------- magic numbers
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", a.k.a. INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --------------------------------------------------------------------------- handshake flags (server, 16 bits)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# client flags (32 bits)
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --------------------------------------------------------------------------- transmission flags (16 bits)
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --------------------------------------------------------------------------- options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_INFO_* information types (NBD_OPT_INFO / NBD_OPT_GO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --------------------------------------------------------------------------- commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags and chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --------------------------------------------------------------------------- error values
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

META_CONTEXT_BASE_ALLOCATION = "base:allocation"

# --------------------------------------------------------------------------- sizes and limits
GREETING_SIZE = 18
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_HEADER_SIZE = 16
STRUCTURED_REPLY_HEADER_SIZE = 20
EXPORT_NAME_PADDING = 124

MAX_STRING = 4096  # the spec's hard limit for names and messages
MAX_PAYLOAD = 32 * 1024 * 1024  # 2^25: largest READ/WRITE/WRITE_ZEROES we accept
MAX_OPTION_DATA = 64 * 1024  # option data above this is treated as a denial of service

__all__ = [
    "NBDMAGIC",
    "IHAVEOPT",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_NO_ZEROES",
    "FLAG_C_FIXED_NEWSTYLE",
    "FLAG_C_NO_ZEROES",
    "KNOWN_CLIENT_FLAGS",
    "FLAG_HAS_FLAGS",
    "FLAG_READ_ONLY",
    "FLAG_SEND_FLUSH",
    "FLAG_SEND_FUA",
    "FLAG_ROTATIONAL",
    "FLAG_SEND_TRIM",
    "FLAG_SEND_WRITE_ZEROES",
    "FLAG_SEND_DF",
    "FLAG_CAN_MULTI_CONN",
    "FLAG_SEND_RESIZE",
    "FLAG_SEND_CACHE",
    "FLAG_SEND_FAST_ZERO",
    "OPT_EXPORT_NAME",
    "OPT_ABORT",
    "OPT_LIST",
    "OPT_PEEK_EXPORT",
    "OPT_STARTTLS",
    "OPT_INFO",
    "OPT_GO",
    "OPT_STRUCTURED_REPLY",
    "OPT_LIST_META_CONTEXT",
    "OPT_SET_META_CONTEXT",
    "OPT_EXTENDED_HEADERS",
    "REP_ACK",
    "REP_SERVER",
    "REP_INFO",
    "REP_META_CONTEXT",
    "REP_FLAG_ERROR",
    "REP_ERR_UNSUP",
    "REP_ERR_POLICY",
    "REP_ERR_INVALID",
    "REP_ERR_PLATFORM",
    "REP_ERR_TLS_REQD",
    "REP_ERR_UNKNOWN",
    "REP_ERR_SHUTDOWN",
    "REP_ERR_BLOCK_SIZE_REQD",
    "REP_ERR_TOO_BIG",
    "INFO_EXPORT",
    "INFO_NAME",
    "INFO_DESCRIPTION",
    "INFO_BLOCK_SIZE",
    "CMD_READ",
    "CMD_WRITE",
    "CMD_DISC",
    "CMD_FLUSH",
    "CMD_TRIM",
    "CMD_CACHE",
    "CMD_WRITE_ZEROES",
    "CMD_BLOCK_STATUS",
    "CMD_RESIZE",
    "CMD_NAMES",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_DF",
    "CMD_FLAG_REQ_ONE",
    "CMD_FLAG_FAST_ZERO",
    "REPLY_FLAG_DONE",
    "REPLY_TYPE_NONE",
    "REPLY_TYPE_OFFSET_DATA",
    "REPLY_TYPE_OFFSET_HOLE",
    "REPLY_TYPE_BLOCK_STATUS",
    "REPLY_TYPE_ERROR",
    "REPLY_TYPE_ERROR_OFFSET",
    "EPERM",
    "EIO",
    "ENOMEM",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
    "STATE_HOLE",
    "STATE_ZERO",
    "META_CONTEXT_BASE_ALLOCATION",
    "GREETING_SIZE",
    "CLIENT_FLAGS_SIZE",
    "OPTION_HEADER_SIZE",
    "OPTION_REPLY_HEADER_SIZE",
    "REQUEST_HEADER_SIZE",
    "SIMPLE_REPLY_HEADER_SIZE",
    "STRUCTURED_REPLY_HEADER_SIZE",
    "EXPORT_NAME_PADDING",
    "MAX_STRING",
    "MAX_PAYLOAD",
    "MAX_OPTION_DATA",
]
