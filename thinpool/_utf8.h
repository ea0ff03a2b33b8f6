/* Strict UTF-8 validation (what Python's "utf-8" decoder accepts), shared by thinpool/_lscols.c and
 * thinpool/cli/_tablefmt.c. */
#ifndef THINPOOL_UTF8_H
#define THINPOOL_UTF8_H

/* length of the valid UTF-8 sequence at s (< end), or 0 if it is not one (RFC 3629, as Python's
 * strict decoder: no overlong forms, no surrogates, nothing past U+10FFFF) */
static inline int
utf8_seq(const unsigned char *s, const unsigned char *end)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    Py_ssize_t left = end - s;
#define CONT(i) (left > (i) && (s[i] & 0xC0) == 0x80)
    if (c >= 0xC2 && c <= 0xDF)
        return CONT(1) ? 2 : 0;
    if (c == 0xE0)
        return (left > 1 && s[1] >= 0xA0 && s[1] <= 0xBF && CONT(2)) ? 3 : 0;
    if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
        return (CONT(1) && CONT(2)) ? 3 : 0;
    if (c == 0xED)
        return (left > 1 && s[1] >= 0x80 && s[1] <= 0x9F && CONT(2)) ? 3 : 0;
    if (c == 0xF0)
        return (left > 1 && s[1] >= 0x90 && s[1] <= 0xBF && CONT(2) && CONT(3)) ? 4 : 0;
    if (c >= 0xF1 && c <= 0xF3)
        return (CONT(1) && CONT(2) && CONT(3)) ? 4 : 0;
    if (c == 0xF4)
        return (left > 1 && s[1] >= 0x80 && s[1] <= 0x8F && CONT(2) && CONT(3)) ? 4 : 0;
#undef CONT
    return 0;
}

static inline int
valid_utf8(const unsigned char *s, Py_ssize_t n)
{
    const unsigned char *end = s + n;
    while (s < end) {
        if (*s < 0x80) {
            s++;
            continue;
        }
        int k = utf8_seq(s, end);
        if (!k)
            return 0;
        s += k;
    }
    return 1;
}

#endif
