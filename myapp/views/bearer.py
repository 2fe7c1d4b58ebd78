"""Bearer tokens (RFC 6750 section 2.1): read one from a request, compare it in constant time."""

import hmac

__all__ = ["bearer_token", "token_matches"]


def bearer_token(request):
    """Return the token of ``Authorization: Bearer <token>`` (str), or None without one."""
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def token_matches(given, tokens):
    """Return True if ``given`` (str) equals one of ``tokens`` (iterable of str), in constant time.

    Every token is compared, with no early exit: the time taken does not
    depend on which token matched, nor on how much of one did.
    """
    given = given.encode("utf-8", "surrogateescape")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode("utf-8"))
    return matched
