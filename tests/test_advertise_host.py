"""`Node(advertise_host=...)`: the host in the node id when it is not the address bound."""

from __future__ import annotations

import pytest

from pgregistry.node import Node

from .helpers import eventually

COOKIE = "advertise-test-cookie"
T = 5.0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_an_unspecified_host_without_advertise_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="advertise_host") as caught:
        Node("a", host=host, cookie=COOKIE)
    assert "could not dial" in str(caught.value)


def test_advertise_host_is_checked_and_defaults_to_host() -> None:
    assert Node("a", host="127.0.0.1", cookie=COOKIE).advertise_host == "127.0.0.1"
    with pytest.raises(TypeError, match="advertise_host"):
        Node("a", advertise_host=5, cookie=COOKIE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="advertise_host"):
        Node("a", advertise_host="a host", cookie=COOKIE)


async def test_a_node_bound_to_every_address_is_dialled_at_its_advertised_host() -> None:
    async with Node("wide", host="0.0.0.0", advertise_host="127.0.0.1", cookie=COOKIE) as wide:
        assert wide.id == f"wide@127.0.0.1:{wide.port}" and wide.host == "0.0.0.0"
        async with Node("near", cookie=COOKIE) as near:
            assert await near.connect(wide.id) == wide.id  # near dials the advertised id
            await eventually(lambda: wide.peers() == [near.id], T, "wide to see near")
        async with Node("other", cookie=COOKIE) as other:
            assert await wide.connect(other.id) == other.id  # and wide dials out
            await eventually(lambda: other.peers() == [wide.id], T, "other to see wide by its advertised id")
