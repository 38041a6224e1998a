"""`runtime.launch.child_env_defaults`: defaults for spawned ranks, the user's values kept."""

from __future__ import annotations

import os

from muon_megatron.runtime.launch import child_env_defaults


def test_sets_only_what_is_unset_and_restores_everything(monkeypatch) -> None:
    monkeypatch.setenv("MUON_TEST_SET", "mine")
    monkeypatch.setenv("MUON_TEST_EMPTY", "")
    monkeypatch.delenv("MUON_TEST_UNSET", raising=False)
    defaults = {"MUON_TEST_SET": "d1", "MUON_TEST_EMPTY": "d2", "MUON_TEST_UNSET": "d3"}
    with child_env_defaults(defaults):
        assert os.environ["MUON_TEST_SET"] == "mine"
        assert os.environ["MUON_TEST_EMPTY"] == "d2"
        assert os.environ["MUON_TEST_UNSET"] == "d3"
    assert os.environ["MUON_TEST_SET"] == "mine"
    assert os.environ["MUON_TEST_EMPTY"] == ""
    assert "MUON_TEST_UNSET" not in os.environ
