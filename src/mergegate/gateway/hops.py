"""Loops between gateways: a plan whose url model is this gateway (or a gateway whose plan leads back here) would
send each request round and round. Every upstream request carries `x-mergegate-hops`, the ids of the gateways it
passed through (this one last); a request that arrives with this gateway's id among them, or after more than
MAX_HOPS gateways, is answered 508 at once.
"""

from __future__ import annotations

import uuid

from .errors import APIError

HOP_HEADER = "x-mergegate-hops"
MAX_HOPS = 16


def new_hop_id() -> str:
    """This gateway's id in hop headers: random per process, so two gateways never share one."""
    return uuid.uuid4().hex[:16]


def hops_after(incoming: str | None, own: str) -> tuple[str, ...]:
    """The hops an upstream request made for this one carries: the incoming request's, then `own`. A 508
    APIError when the incoming request already passed through this gateway, or through too many."""
    hops = tuple(hop.strip() for hop in (incoming or "").split(",") if hop.strip())
    if len(hops) > MAX_HOPS:
        raise APIError(508, f"This request has passed through {len(hops)} gateways, more than {MAX_HOPS}: a plan's "
                            "url models probably lead round in a loop.", type="server_error", code="loop_detected")
    if own in hops:
        raise APIError(508, f"This request has already passed through this gateway ({len(hops)} hop(s) ago): a "
                            "url model of its plan leads back to it. Point that url at an upstream that is not this "
                            "gateway.", type="server_error", code="loop_detected")
    return (*hops, own)


def hop_header(hops: tuple[str, ...]) -> str:
    return ",".join(hops)
