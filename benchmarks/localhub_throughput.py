"""localhub throughput: upload and download a large file through huggingface_hub, against a plain file copy.

Starts `python -m localhub serve` as a subprocess (so its memory is measured alone), then
  1. copies the file with shutil (the disk's own speed, the yardstick),
  2. uploads it with `HfApi.upload_file` (sha256 + LFS multipart + server-side verification),
  3. downloads it with `hf_hub_download` into an empty cache,
and prints MB/s for each and the server's peak RSS during each phase (downloads must stream:
the peak should not grow with the file).

Usage: python benchmarks/localhub_throughput.py [--size-mb 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 1024 * 1024


class PeakRss:
    """Samples a process's resident memory in the background; `phase` records the peak of a block."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._current_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._current_peak = max(self._current_peak, self._process.memory_info().rss)
            time.sleep(0.02)

    @contextmanager
    def phase(self, peaks: dict[str, int], name: str) -> Iterator[None]:
        self._current_peak = self._process.memory_info().rss
        yield
        time.sleep(0.05)
        peaks[name] = self._current_peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_random_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MB)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block[:-8] + os.urandom(8))  # distinct blocks, cheap to make
        f.write(os.urandom(size % len(block)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="localhub-bench-", dir=args.workdir))
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HOME"] = str(work / "hf-home")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub import HfApi, hf_hub_download

    from localhub.cli import main as localhub_main

    size = args.size_mb * MB
    source = work / "weights.safetensors"
    print(f"writing a {args.size_mb} MB test file ...", flush=True)
    write_random_file(source, size)

    data = work / "hub-data"
    localhub_main(["add-user", "--data", str(data), "bench", "--token", "tok-bench-123456"])
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localhub",
            "serve",
            "--port",
            str(port),
            "--data",
            str(data),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    peaks: dict[str, int] = {}
    try:
        endpoint = f"http://127.0.0.1:{port}"
        api = HfApi(endpoint=endpoint, token="tok-bench-123456")
        for _ in range(200):
            try:
                api.whoami()
                break
            except Exception:
                time.sleep(0.1)
        api.create_repo("bench/big")
        rss = PeakRss(server.pid)
        with rss.phase(peaks, "idle"):
            time.sleep(0.3)
        copy_s = timed(lambda: shutil.copyfile(source, work / "copy.bin"))
        (work / "copy.bin").unlink()
        with rss.phase(peaks, "upload"):
            upload_s = timed(
                lambda: api.upload_file(
                    path_or_fileobj=str(source), path_in_repo=source.name, repo_id="bench/big"
                )
            )
        downloaded: list[str] = []
        with rss.phase(peaks, "download"):
            download_s = timed(
                lambda: downloaded.append(
                    hf_hub_download("bench/big", source.name, endpoint=endpoint, cache_dir=work / "cache")
                )
            )
        rss.close()
        ok = os.path.getsize(downloaded[0]) == size
    finally:
        server.terminate()
        server.wait(timeout=30)
    mb = size / MB
    print(f"\nlocalhub throughput, {args.size_mb} MB file, same disk, same run")
    print(f"{'operation':<34}{'seconds':>9}{'MB/s':>9}{'vs copy':>9}")
    for name, seconds in (
        ("file copy (shutil.copyfile)", copy_s),
        ("upload (HfApi.upload_file)", upload_s),
        ("download (hf_hub_download)", download_s),
    ):
        print(f"{name:<34}{seconds:>9.2f}{mb / seconds:>9.0f}{copy_s / seconds:>9.2f}")
    print(
        f"\nserver peak RSS: idle {peaks['idle'] / MB:.0f} MB, upload {peaks['upload'] / MB:.0f} MB, "
        f"download {peaks['download'] / MB:.0f} MB (file: {mb:.0f} MB)"
    )
    print("downloaded file complete:", ok)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
