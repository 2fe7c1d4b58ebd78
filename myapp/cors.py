"""Cross-origin streams with credentials (Fetch standard, CORS protocol).

An EventSource created with ``{withCredentials: true}`` on another origin
sends cookies only if the response echoes that exact origin with
``Access-Control-Allow-Credentials: true``; ``*`` is never valid with
credentials. Origins are allowed by MYAPP_CORS_ALLOWED_ORIGINS.
"""

from myapp.conf import setting

__all__ = ["cors_headers", "preflight_headers", "ORIGIN_REFUSED"]

#: Returned by ``cors_headers`` for an Origin that is not allowed.
ORIGIN_REFUSED = None


def cors_headers(request):
    """Return the CORS response headers for ``request`` (dict), or ORIGIN_REFUSED.

    No Origin header (same-origin GET) or the server's own origin gives {}.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    if origin == f"{request.scheme}://{request.get_host()}":
        return {}
    if origin in setting("MYAPP_CORS_ALLOWED_ORIGINS"):
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}
    return ORIGIN_REFUSED


def preflight_headers(headers):
    """Return ``headers`` plus what a preflight (OPTIONS) answer needs."""
    return {
        **headers,
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Last-Event-ID, Cache-Control, Accept",
        "Access-Control-Max-Age": "600",
    }
