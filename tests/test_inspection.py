"""The inspection interface in one loop: paging by snapshot, rows too large for a frame,
a flood of requests, an idle tool, a node that serves no tools, and tagged JSON."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from pgregistry.handshake import MIN_MAX_FRAME
from pgregistry.inspection import MAX_PENDING, Inspection, InspectionClient, InspectionError
from pgregistry.jsonterms import from_json, to_json
from pgregistry.node import Node
from pgregistry.registry import Registry
from pgregistry.terms import Pid, Ref

from .helpers import eventually

COOKIE = "inspection-tests"
FAST = {"tick_interval": 0.2, "down_after": 1.0}


async def test_select_pages_through_a_snapshot_and_skips_rows_too_large_to_send() -> None:
    async with Node("n", cookie=COOKIE, **FAST) as node:
        reg = await Registry.start(node, "jobs")
        for i in range(50):
            reg.register(("k", i), i)
        reg.register("huge", "x" * (2 * MIN_MAX_FRAME))  # larger than any frame the tool takes
        Inspection.serve(node, registries={"jobs": reg})
        async with await InspectionClient.connect(node.id, COOKIE, max_frame=MIN_MAX_FRAME) as tool:
            first = await tool.request("select", "jobs", 0, 20)
            assert len(first["rows"]) == 20 and first["next"] == 20 and first["total"] == 51
            for i in range(50, 80):  # writes between pages do not shift the snapshot
                reg.register(("k", i), i)
            rows, cursor, skipped = list(first["rows"]), first["next"], 0
            while cursor is not None:
                page = await tool.request("select", "jobs", cursor, 10_000)
                assert page["next"] is None or page["next"] > cursor
                rows += page["rows"]
                skipped += page["skipped"]
                cursor = page["next"]
            assert skipped == 1 and {r[0] for r in rows} == {("k", i) for i in range(50)}
            again = await tool.request("select", "jobs", 0, 10_000)  # cursor 0: a new snapshot
            assert again["total"] == 81


async def test_a_tool_flooding_requests_is_disconnected_and_the_node_carries_on() -> None:
    async with Node("n", cookie=COOKIE, **FAST) as node:
        Inspection.serve(node)
        tool = await InspectionClient.connect(node.id, COOKIE)
        try:
            flood = [asyncio.ensure_future(tool.request("info", timeout=5)) for _ in range(3 * MAX_PENDING)]
            results = await asyncio.gather(*flood, return_exceptions=True)
            assert any(isinstance(r, ConnectionError) for r in results)
        finally:
            await tool.close()
        async with await InspectionClient.connect(node.id, COOKIE) as calm:
            assert (await calm.request("info"))["id"] == node.id


async def test_an_idle_tool_outlives_the_nodes_down_after() -> None:
    async with Node("n", cookie=COOKIE, tick_interval=0.1, down_after=0.3) as node:
        Inspection.serve(node)
        async with await InspectionClient.connect(node.id, COOKIE) as tool:
            await asyncio.sleep(1.0)  # idle for more than three of the node's down_after
            assert (await tool.request("version"))["inspection"] == 1


async def test_a_node_that_serves_no_tools_refuses_them() -> None:
    async with Node("n", cookie=COOKIE, **FAST) as node:
        with pytest.raises(InspectionError, match="serves no tools"):
            await InspectionClient.connect(node.id, COOKIE)
        await eventually(lambda: node.peers() == [], 2, "no peer")


@pytest.mark.parametrize("term", [
    [(1, "a", b"\x00"), {1: 2, "$x": (3,)}, {"a": [math.inf, -math.inf, -0.0]}, None, True, 2**200],
    {"$tuple": "not a tag: a plain dict whose key starts with $"},
    [10**5000, -(10**5000)],
    [Pid("a@h:1", 3, 4), Ref("b@h:2", 5, 6), {(1, 2): [b"", ""]}],
])
def test_json_terms_round_trip(term: object) -> None:
    text = json.dumps(to_json(term), allow_nan=False)
    assert from_json(json.loads(text)) == term


def test_json_nan_is_tagged_and_malformed_tags_are_value_errors() -> None:
    text = json.dumps(to_json([math.nan]), allow_nan=False)
    assert "NaN" not in text and math.isnan(from_json(json.loads(text))[0])
    for bad in ({"$pid": [1, 2, 3]}, {"$dict": [[[1], 2]]}, {"$int": "zz"}, {"$float": "big"}):
        with pytest.raises(ValueError):
            from_json(bad)
