"""Files through the E2B SDK (sync and async): envd's ``/files`` and ``filesystem.Filesystem`` over Corral's
file operations and watches."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from conftest import Box
from e2b import FileNotFoundException, FilesystemEventType, FileType, NotFoundException


def test_write_and_read_text_bytes_and_streams(box: Box) -> None:
    sbx = box.e2b()
    info = sbx.files.write("/tmp/f/hello.txt", "héllo")  # parents are made, as envd does
    assert info.path == "/tmp/f/hello.txt" and info.name == "hello.txt" and info.type is FileType.FILE
    assert sbx.files.read("/tmp/f/hello.txt") == "héllo"
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sbx.files.write("/tmp/f/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/f/blob.bin", format="bytes")) == blob
    assert b"".join(sbx.files.read("/tmp/f/blob.bin", format="stream")) == blob
    sbx.files.write("/tmp/f/io.bin", io.BytesIO(b"from a file object"))  # octet-stream, streamed
    assert sbx.files.read("/tmp/f/io.bin") == "from a file object"
    assert sbx.files.write("rel.txt", "in home").path == "/home/user/rel.txt"
    assert sbx.commands.run("cat ~/rel.txt; echo; stat -c %U /tmp/f/hello.txt").stdout == "in home\nuser\n"


def test_write_many_files_in_one_multipart_request(box: Box) -> None:
    sbx = box.e2b()
    files = [{"path": f"/tmp/many/{i}.txt", "data": f"file {i}"} for i in range(20)]
    written = sbx.files.write_files(files)  # type: ignore[arg-type]
    assert [w.path for w in written] == [f["path"] for f in files]
    assert sbx.commands.run("cat /tmp/many/7.txt; echo; ls /tmp/many | wc -l").stdout == "file 7\n20\n"


def test_gzip_both_ways(box: Box) -> None:
    sbx = box.e2b()
    text = "compressible " * 10_000
    sbx.files.write("/tmp/gz.txt", text, gzip=True)
    assert sbx.commands.run("wc -c < /tmp/gz.txt").stdout.strip() == str(len(text))
    assert sbx.files.read("/tmp/gz.txt", gzip=True) == text
    # on the wire the download really is gzip
    r = httpx.get(
        f"{box.url}/files",
        params={"path": "/tmp/gz.txt"},
        headers={**_headers(box), "Accept-Encoding": "gzip"},
    )
    assert r.headers["content-encoding"] == "gzip" and len(r.content) == len(text)  # httpx decoded it
    raw = httpx.post(
        f"{box.url}/files",
        params={"path": "/tmp/bad.gz"},
        content=b"not gzip at all",
        headers={**_headers(box), "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert raw.status_code == 400 and "gzip" in raw.json()["message"]
    assert not sbx.files.exists("/tmp/bad.gz")  # nothing half-written


def _headers(box: Box) -> dict[str, str]:
    return {"E2b-Sandbox-Id": box.sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": box.token}


def test_list_stat_exists_mkdir_rename_remove(box: Box) -> None:
    sbx = box.e2b()
    assert sbx.files.make_dir("/tmp/tree/a/b") is True
    assert sbx.files.make_dir("/tmp/tree/a/b") is False  # envd's ALREADY_EXISTS
    sbx.files.write("/tmp/tree/a/b/leaf.txt", "x")
    sbx.commands.run("ln -s /tmp/tree/a /tmp/tree/link")
    top = sbx.files.list("/tmp/tree")
    assert sorted(e.name for e in top) == ["a", "link"]
    deep = sbx.files.list("/tmp/tree", depth=3)
    assert {e.path for e in deep} == {
        "/tmp/tree/a",
        "/tmp/tree/a/b",
        "/tmp/tree/a/b/leaf.txt",
        "/tmp/tree/link",
    }
    link = next(e for e in top if e.name == "link")
    assert link.type is None or link.symlink_target == "/tmp/tree/a"
    d = sbx.files.get_info("/tmp/tree/a")
    assert d.type is FileType.DIR and d.permissions == "drwxr-xr-x" and d.owner == "user" and d.mode == 0o755
    f = sbx.files.get_info("/tmp/tree/a/b/leaf.txt")
    assert f.type is FileType.FILE and f.size == 1 and f.permissions == "-rw-r--r--"
    assert abs(f.modified_time.timestamp() - time.time()) < 120
    moved = sbx.files.rename("/tmp/tree/a/b/leaf.txt", "/tmp/tree/leaf2.txt")
    assert moved.path == "/tmp/tree/leaf2.txt" and moved.name == "leaf2.txt"
    assert sbx.files.exists("/tmp/tree/leaf2.txt") and not sbx.files.exists("/tmp/tree/a/b/leaf.txt")
    sbx.files.remove("/tmp/tree")  # recursive, as envd's
    assert not sbx.files.exists("/tmp/tree")
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/tmp/tree/leaf2.txt")
    with pytest.raises(NotFoundException):
        sbx.files.get_info("/tmp/tree")


def test_root_and_user_files(box: Box) -> None:
    sbx = box.e2b()
    sbx.files.write("/root/secret.txt", "root only", user="root")
    assert sbx.files.read("/root/secret.txt", user="root") == "root only"
    assert sbx.files.get_info("/root/secret.txt", user="root").owner == "root"
    with pytest.raises(Exception, match=r"[Pp]ermission"):
        sbx.files.read("/root/secret.txt")  # the default user cannot


def test_signed_urls(box: Box) -> None:
    sbx = box.e2b()
    sbx.files.write("/tmp/signed.txt", "signed content")
    url = sbx.download_url("/tmp/signed.txt")
    assert "signature=v1_" in url
    r = httpx.get(url)  # single-URL mode: no sandbox id in the URL; the signature picks the sandbox
    assert r.status_code == 200 and r.text == "signed content"
    up = sbx.upload_url("/tmp/uploaded.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("uploaded.txt", b"via signed url")})
    assert r.status_code == 200, r.text
    assert sbx.files.read("/tmp/uploaded.txt") == "via signed url"
    # a signature is for one path and one direction
    other = url.replace("signed.txt", "other.txt")
    assert httpx.get(other).status_code == 502
    assert (
        httpx.post(url, content=b"x", headers={"Content-Type": "application/octet-stream"}).status_code == 502
    )
    expired = sbx.download_url("/tmp/signed.txt", use_signature_expiration=-10)
    r = httpx.get(expired)
    assert r.status_code == 401 and "expired" in r.json()["message"]


def test_watch_dir_polling(box: Box) -> None:
    sbx = box.e2b()
    sbx.files.make_dir("/tmp/watched")
    watcher = sbx.files.watch_dir("/tmp/watched")
    try:
        sbx.files.write("/tmp/watched/new.txt", "1")
        sbx.commands.run("mkdir /tmp/watched/sub && rm /tmp/watched/new.txt")
        seen: list[tuple[str, FilesystemEventType]] = []
        deadline = time.monotonic() + 20
        while ("new.txt", FilesystemEventType.REMOVE) not in seen and time.monotonic() < deadline:
            seen += [(e.name, e.type) for e in watcher.get_new_events()]
            time.sleep(0.05)
    finally:
        watcher.stop()
    assert seen[:2] == [("new.txt", FilesystemEventType.CREATE), ("new.txt", FilesystemEventType.WRITE)]
    assert ("sub", FilesystemEventType.CREATE) in seen and ("new.txt", FilesystemEventType.REMOVE) in seen
    assert not any("corral-upload" in name for name, _ in seen)  # Corral's temporary file stays hidden
    with pytest.raises(Exception, match="stopped"):
        watcher.get_new_events()


def test_watch_a_missing_directory_fails_at_once(box: Box) -> None:
    with pytest.raises(NotFoundException):
        box.e2b().files.watch_dir("/tmp/no/such/dir")


@pytest.mark.anyio
async def test_async_files_and_streaming_watch(box: Box) -> None:
    sbx = box.e2b_async()
    await sbx.files.make_dir("/tmp/awatch")
    events: list[tuple[str, FilesystemEventType, int | None]] = []
    got_remove = __import__("anyio").Event()

    def on_event(e) -> None:  # type: ignore[no-untyped-def]
        events.append((e.name, e.type, e.entry.size if getattr(e, "entry", None) else None))
        if e.type is FilesystemEventType.REMOVE:
            got_remove.set()

    handle = await sbx.files.watch_dir("/tmp/awatch", on_event, recursive=True, include_entry=True)
    try:
        await sbx.files.write("/tmp/awatch/x.txt", "four")
        await sbx.commands.run("mkdir -p /tmp/awatch/d && echo hi > /tmp/awatch/d/y && rm /tmp/awatch/x.txt")
        import anyio

        with anyio.fail_after(20):
            await got_remove.wait()
    finally:
        await handle.stop()
    names = [(n, t) for n, t, _ in events]
    assert ("x.txt", FilesystemEventType.CREATE) in names and ("d/y", FilesystemEventType.CREATE) in names
    sizes = [s for n, t, s in events if n == "x.txt" and t is FilesystemEventType.WRITE]
    assert sizes == [4]  # include_entry: the entry as it was when the event was seen
    assert await sbx.files.read("/tmp/awatch/d/y") == "hi\n"
    assert [e.name for e in await sbx.files.list("/tmp/awatch")] == ["d"]


def test_bad_uploads_are_clear_errors(box: Box) -> None:
    headers = _headers(box)
    r = httpx.post(
        f"{box.url}/files",
        content=b"--x\r\nnot a part",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 400 and "code" in r.json()
    r = httpx.post(
        f"{box.url}/files", params={"path": "/tmp/a"}, content=b"x", headers={**headers, "X-Metadata-k": "v"}
    )
    assert r.status_code == 501 and "metadata" in r.json()["message"]
    r = httpx.post(
        f"{box.url}/files", params={"path": "/tmp/a", "username": "mallory"}, content=b"x", headers=headers
    )
    assert r.status_code == 401
    r = httpx.get(f"{box.url}/files", params={"path": "/tmp"}, headers=headers)  # a directory
    assert r.status_code == 400
