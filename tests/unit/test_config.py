"""Settings: those the Lua scripts depend on are bounded at start, not at the first flush;
every one is documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


@pytest.mark.parametrize("size", [0, 3001, 10_000])
def test_batch_size_outside_what_the_scripts_take_is_refused(size: int) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        Settings(batch_size=size)


def test_batch_size_bounds_are_accepted() -> None:
    assert Settings(batch_size=1).batch_size == 1
    assert Settings(batch_size=3000).batch_size == 3000


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"| `{name.upper()}` |" not in readme]
    assert not missing, f"settings without a README row: {missing}"
