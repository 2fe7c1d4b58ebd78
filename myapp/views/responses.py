"""Small error responses with a JSON reason."""

from django.http import JsonResponse

from myapp.conf import setting

__all__ = ["error", "unavailable"]


def error(status, reason, headers=None):
    """Return a JsonResponse ``{"error": reason}`` with ``status`` and extra ``headers``."""
    response = JsonResponse({"error": reason}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def unavailable(reason, status=503, headers=None):
    """Return ``error`` with a Retry-After of MYAPP_RETRY_AFTER_SECONDS (503 or 429)."""
    return error(status, reason, {**(headers or {}), "Retry-After": str(setting("MYAPP_RETRY_AFTER_SECONDS"))})
