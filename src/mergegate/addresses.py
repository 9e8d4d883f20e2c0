"""Network addresses read from input, each checked by one rule wherever it is read: a model's url (a models file's
`base_url`, a rollout plan's `url`, a `NAME=URL` spelling, any `ModelRef`), the gateway's OTLP endpoint, and the
port a command listens on (`--port`), which is also tried before anything slow starts (`bind_port`)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from .errors import AddressError

URL_SCHEMES = ("http", "https")
PORTS = range(1, 65536)


def check_url(url: object) -> str:
    """`url` as given, or AddressError saying what is wrong: it must be an http(s) URL with a host, a port (if any)
    in 1-65535, no credentials (an API key goes in an environment variable, never in a url that is logged) and no
    fragment, and hold no spaces or control characters. A refusal never repeats the url's credentials."""
    if not isinstance(url, str) or not url:
        raise AddressError(f"url {url!r}: expected an http:// or https:// URL")
    shown = f"url {without_credentials(url)!r}"
    if any(c.isspace() or not c.isprintable() for c in url):
        raise AddressError(f"{shown}: a url cannot contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise AddressError(f"{shown}: not a valid url ({exc})") from None
    if parts.scheme.lower() not in URL_SCHEMES:
        raise AddressError(f"{shown}: the scheme must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise AddressError(f"{shown}: the url has no host")
    if port is not None and port not in PORTS:
        raise AddressError(f"{shown}: port {port} is out of range (1-65535)")
    if parts.username is not None or parts.password is not None:
        raise AddressError(f"{shown}: a url cannot carry credentials (name the API key's environment variable in "
                           "api_key_env)")
    if parts.fragment or url.endswith("#"):
        raise AddressError(f"{shown}: a url cannot have a fragment ('#...'); name the served model apart")
    return url


def check_port(port: object, option: str = "--port") -> int:
    """`port` as given, or AddressError naming `option`: a port is an integer in 1-65535."""
    if not isinstance(port, int) or isinstance(port, bool) or port not in PORTS:
        raise AddressError(f"{option} {port!r}: a port must be an integer from 1 to 65535")
    return port


def bind_port(host: str, port: int, option: str = "--port") -> socket.socket:
    """A socket bound to (host, port) — the port checked (`check_port`) and taken now, before models load, so a
    busy port is refused in a second, not after a long start. The server then listens on this socket."""
    check_port(port, option)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a just-closed port is free
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AddressError(f"{option} {port}: cannot listen on {host}:{port}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    sock.set_inheritable(True)
    return sock


def without_credentials(url: str) -> str:
    """`url` with any user:password@ before its host shown as ***@."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{slash}{path}"
