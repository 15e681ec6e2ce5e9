"""nodes/run_files.read_plain: a file that is not there or is a link is None quietly; one that cannot be opened for
another reason (permissions, an I/O error) is None and says so in the log."""

from __future__ import annotations

import errno
import logging
import os

from test_nodes_support import pack_module

run_files = pack_module("nodes.run_files")


def test_missing_and_linked_files_are_none_without_a_warning(tmp_path, caplog):
    target = tmp_path / "real.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    with caplog.at_level(logging.WARNING):
        assert run_files.read_plain(tmp_path / "missing.json", 100) is None
        assert run_files.read_plain(tmp_path / "link.json", 100) is None
        assert run_files.read_plain(target, 100) == b"{}"
    assert not caplog.records


def test_a_file_that_cannot_be_opened_is_none_and_logged(tmp_path, caplog, monkeypatch):
    path = tmp_path / "status.json"
    path.write_text("{}")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refused)  # as root, chmod cannot refuse a read
    with caplog.at_level(logging.WARNING):
        assert run_files.read_plain(path, 100) is None
    assert f"{path} could not be opened (Permission denied): not read" in caplog.text
