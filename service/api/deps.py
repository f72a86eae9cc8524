"""Dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.state import AppState


async def get_state(request: Request) -> AppState:
    # async: a plain def dependency runs in a thread pool on every request.
    state: AppState = request.app.state.wb
    return state


StateDep = Annotated[AppState, Depends(get_state)]
