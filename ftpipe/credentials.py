"""Mask credentials in any text before it is printed, logged or written to a report.

A tracking URI may carry a user:password or a token in its query string, and MLflow's error
messages quote the URL they failed on; a secret set in the environment may be echoed by a library.
`redact` masks all three wherever they appear in the text.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

MASK = "***"
# Secrets MLflow and its artifact stores read from the environment: masked whenever set.
NAMED_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_SUFFIXES = ("_TOKEN", "_PASSWORD", "_SECRET", "_SECRET_ACCESS_KEY")
# A shorter value of a variable only named like a secret is more likely a flag ("1", "true") than a
# secret, and masking it would garble the text.
MIN_SECRET_LEN = 6
MIN_NAMED_LEN = 3

# scheme://userinfo@ : the userinfo runs to the last "@" before the path, query or whitespace.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")
# ?name=value / &name=value / ;name=value where the name looks secret.
_SECRET_PARAM = re.compile(
    r"(?i)([?&;][\w.%-]*(?:token|passw(?:or)?d|pwd|secret|key|sig|auth|credential|session)[\w.%-]*=)"
    r"[^&;#\s'\"<>]+")


# URIs whose password and secret query values are masked wherever they appear, URL or not.
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def secret_values() -> list[str]:
    """Values of the secret environment variables that are set, longest first."""
    values = set()
    for name, value in os.environ.items():
        named = name in NAMED_SECRETS and len(value) >= MIN_NAMED_LEN
        if named or (name.upper().endswith(SECRET_SUFFIXES) and len(value) >= MIN_SECRET_LEN):
            values |= {value, quote(value, safe="")}  # a URI carries it percent-encoded
    for name in URI_VARIABLES:
        values |= _uri_secrets(os.environ.get(name, ""))
    return sorted(values, key=len, reverse=True)


def _uri_secrets(uri: str) -> set[str]:
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return set()
    found = {unquote(password)} if password else set()
    found |= {value for key, value in parse_qsl(parts.query) if _SECRET_PARAM.match(f"?{key}=x")}
    return {v for v in found | {quote(v, safe="") for v in found} if len(v) >= MIN_NAMED_LEN}


def redact_logging() -> None:
    """Mask secrets in every log record as it is made: libraries log the URLs they call (urllib3's
    "Retrying ... url: /?token=..."), and a handler (Prefect's console and API log handlers among
    them) shows or stores the record as it comes. The traceback of a logged exception is masked too."""
    import logging
    import traceback

    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    factory.redacts = True
    logging.setLogRecordFactory(factory)


def redact(text: str) -> str:
    """`text` with URL credentials, secret-looking query values and secret env values masked."""
    for value in secret_values():
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    return _SECRET_PARAM.sub(rf"\1{MASK}", text)
