"""The multi-rank helper: ranks fork from a long-lived server yet see the caller's state now."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import run_ranks


def _record(rank: int, out: str) -> None:
    state = {"probe": os.environ.get("CIL_HELPER_PROBE"), "cwd": os.getcwd(), "pid": os.getpid()}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(state))


def test_ranks_see_the_callers_environment_and_folder(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    run_ranks(_record, 2, str(first))  # the forkserver exists from here on
    monkeypatch.setenv("CIL_HELPER_PROBE", "set after the server started")
    monkeypatch.chdir(second)
    run_ranks(_record, 2, str(second))
    before = [json.loads((first / f"rank{r}.json").read_text()) for r in range(2)]
    after = [json.loads((second / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["probe"] for s in after] == ["set after the server started"] * 2
    assert [s["cwd"] for s in after] == [str(second)] * 2
    assert all(s["probe"] is None for s in before)
    assert len({s["pid"] for s in before + after} | {os.getpid()}) == 5  # a process per rank
