import httpx

async def test_a(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/users/alice", json={"name": "Alice"})
    assert r.status_code == 201
