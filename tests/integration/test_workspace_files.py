"""Files into the workspace archive, from a real HTTP server and the Files API routes on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging

import pytest

from sandboxd.workspace import Workspaces
from tests.integration.conftest import GitFixture, prepare_archive
from tests.integration.git_server import FileServer

pytestmark = pytest.mark.anyio


async def test_a_url_with_its_sha256_lands_owned_by_the_sandbox_user(
    workspaces: Workspaces, file_server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    digest = file_server.add("d/data.csv", b"a,b\n1,2\n")
    ws = await prepare_archive(workspaces, {"file": f"{file_server.url('d/data.csv')}?sig=s3cret sha256={digest}"})
    assert ws.contents["data.csv"] == b"a,b\n1,2\n"
    info = ws.members["data.csv"]
    assert (info.uid, info.gid, info.mode, info.uname) == (10001, 10002, 0o644, "")
    assert (f"workspace_file work_id=work_test source={file_server.url('d/data.csv')}?… sha256={digest} bytes=8 "
            "path=data.csv") in caplog.text
    # A query may be a signature: sandboxd's lines never carry it (httpx2's own INFO line is the logging set-up's).
    assert not any("s3cret" in r.getMessage() for r in caplog.records if r.name.startswith("sandboxd"))


async def test_nested_paths_get_sandbox_owned_directories(workspaces: Workspaces, file_server: FileServer) -> None:
    file_server.add("x.bin", b"\x00" * 1000)
    ws = await prepare_archive(workspaces, {"file.x": file_server.url("x.bin") + " path=/workspace/data/raw/x.bin"})
    assert ws.contents["data/raw/x.bin"] == b"\x00" * 1000
    for name in ("data", "data/raw"):
        assert ws.members[name].isdir() and ws.members[name].mode == 0o755 and ws.members[name].uid == 10001


async def test_files_api_downloads_take_the_files_name(
    workspaces: Workspaces, file_server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    file_server.api_files["file_011abc"] = ("report.pdf", b"%PDF-1.7 report")
    file_server.api_files["file_022def"] = ("../../etc/cron.d/evil", b"* * * * * root x")
    file_server.api_files["file_033ghi"] = ("notes.txt", b"notes")
    ws = await prepare_archive(workspaces, {
        "file": "file_011abc", "file.b": "file_022def", "file.c": "file_033ghi path=in/notes.md",
    })
    assert ws.contents["report.pdf"] == b"%PDF-1.7 report"
    assert ws.contents["evil"] == b"* * * * * root x"  # only the last component of a name is used
    assert ws.contents["in/notes.md"] == b"notes"
    digest = hashlib.sha256(b"%PDF-1.7 report").hexdigest()
    assert f"workspace_file work_id=work_test source=file_011abc sha256={digest} bytes=15 path=report.pdf" in (
        caplog.text)
    assert file_server.api_key not in caplog.text
    assert all(h.get("Authorization") == f"Bearer {file_server.api_key}" or h.get("x-api-key")
               for path, h in file_server.requests if path.startswith("/v1/files/"))


async def test_an_unusable_files_api_name_falls_back_to_the_file_id(
    workspaces: Workspaces, file_server: FileServer
) -> None:
    file_server.api_files["file_044"] = ("..", b"x")
    file_server.api_files["file_055"] = ("skills", b"y")
    ws = await prepare_archive(workspaces, {"file": "file_044", "file.2": "file_055"})
    assert ws.contents["file_044"] == b"x" and ws.contents["file_055"] == b"y"


async def test_a_file_may_replace_a_file_of_a_checkout(
    workspaces: Workspaces, file_server: FileServer, git_fixture: GitFixture
) -> None:
    file_server.add("readme", b"replaced\n")
    ws = await prepare_archive(workspaces, {
        "repo": git_fixture.url(git_fixture.repos.app),
        "file": file_server.url("readme") + " path=app/README.md",
        "file.2": file_server.url("readme") + " path=app/conf/new.txt",
    })
    assert ws.contents["app/README.md"] == b"replaced\n"
    assert ws.contents["app/conf/new.txt"] == b"replaced\n"


async def test_a_file_through_an_inside_symlink_of_a_checkout(
    workspaces: Workspaces, file_server: FileServer, git_fixture: GitFixture
) -> None:
    file_server.add("f", b"through\n")
    ws = await prepare_archive(workspaces, {
        "repo": git_fixture.url(git_fixture.repos.escaping_link),
        "file": file_server.url("f") + " path=links/good-link",
    })
    # The symlink is replaced by the file, never written through.
    assert ws.contents["links/good-link"] == b"through\n" and ws.contents["links/inside.txt"] == b"inside\n"


async def test_redirects_within_the_allow_list_are_followed(workspaces: Workspaces, file_server: FileServer) -> None:
    file_server.add("real.txt", b"real")
    ws = await prepare_archive(workspaces, {
        "file": file_server.url(f"redirect/a?to={file_server.url('real.txt')}") + " path=r.txt",
    })
    assert ws.contents["r.txt"] == b"real"


async def test_a_file_without_content_length_within_the_cap(
    make_workspaces: object, file_server: FileServer
) -> None:
    file_server.add("big", b"y" * 4096)
    ws = await prepare_archive(make_workspaces(file_max_bytes=4096), {  # type: ignore[operator]
        "file": file_server.url("unsized/big")})
    assert ws.contents["big"] == b"y" * 4096
