"""The fallback helper: a stdlib-only Python program p2v streams to the production target.

It runs as ``python3 -c HELPER_SOURCE MODE ...`` on any Linux host with python3 >= 3.5
(Debian's python3-minimal is enough: no mmap, no concurrent.futures, no queue) and speaks
frames ``kind (1 byte) | a (u64) | n (u32)`` followed by ``n`` payload bytes, big-endian.

**scan** ``DEVICE BLOCK START END READ``: compare the target with a hash map.
The DR side sends, without framing, the 16-byte digests of the blocks from ``START`` to
``END`` (``END`` = the protected disk's size; both multiples of ``BLOCK`` except ``END``).
The helper reads the device once in ``READ``-byte pieces, hashes each block the way
:func:`p2v.replication.model.digest` does, and replies only with the blocks whose digest
differs: ``M`` frames (``a`` = count) of ``index (u64) | target digest (16)`` records.
Traffic: the map upstream (1/4096 of the disk at 64 KiB blocks) and 24 bytes per
mismatching block downstream.

**write** ``DEVICE BLOCK LIMIT``: apply writes. The DR side sends ``W`` (offset, length,
data), ``Z`` (offset, length: write zeros) and finally ``F``. Nothing is written at or past
``LIMIT`` (the disk size). On ``F`` the helper fsyncs, reads back every block it touched and
replies ``D`` frames of ``index | digest`` records for them, so the DR side verifies what
really reached the device.

Both modes start with ``H`` (a = device size, n = block size), send ``P`` (a = offset)
about once a second while scanning, and end with ``E`` (a = bytes read or written,
n = 16) followed by two u64: blocks compared or touched, mismatches or 0.
Exit status: 3 the device cannot be opened, 2 a read or write failed, 4 the DR side went
away or sent a bad frame, 0 done.
"""

from __future__ import annotations

import struct

FRAME = struct.Struct(">cQI")
RECORD = struct.Struct(">Q16s")
END_TOTALS = struct.Struct(">QQ")
HELLO, MISMATCHES, PROGRESS, END = b"H", b"M", b"P", b"E"
WRITE, ZERO, FINISH, DIGESTS = b"W", b"Z", b"F", b"D"
EXIT_OPEN, EXIT_IO, EXIT_PEER = 3, 2, 4

# Keep this Python 3.5 compatible: no f-strings, no annotations, no walrus
# (tests/unit/test_fallback_helper.py parses it with feature_version=(3, 5)).
HELPER_SOURCE = r"""
import hashlib, os, struct, sys, time

F = struct.Struct('>cQI')
R = struct.Struct('>Q16s')
T = struct.Struct('>QQ')
ZD = bytes(16)
UD = b'\xff' * 16


class PeerGone(Exception):
    pass


def digest(b):
    if b.count(0) == len(b):
        return ZD
    d = hashlib.sha256(b).digest()[:16]
    if d == ZD or d == UD:
        d = b'\x01' + d[1:]
    return d


class Out(object):
    def __init__(self):
        self.buf = bytearray()

    def put(self, b):
        self.buf += b
        if len(self.buf) >= 262144:
            self.flush()

    def flush(self):
        view = memoryview(self.buf)
        done = 0
        try:
            while done < len(view):
                done += os.write(1, view[done:])
        except (BrokenPipeError, ConnectionResetError):
            raise PeerGone()
        finally:
            view.release()
        del self.buf[:]


def read_exact(n):
    parts = []
    got = 0
    while got < n:
        b = os.read(0, min(n - got, 1048576))
        if not b:
            raise PeerGone()
        parts.append(b)
        got += len(b)
    return b''.join(parts)


def pread_full(fd, n, off):
    parts = []
    got = 0
    while got < n:
        b = os.pread(fd, n - got, off + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b''.join(parts)


def open_dev(dev, flags):
    try:
        fd = os.open(dev, flags)
        return fd, os.lseek(fd, 0, 2)
    except OSError as e:
        sys.stderr.write('p2v-fallback: cannot open %s: %s\n' % (dev, e.strerror))
        sys.exit(3)


def records(out, kind, recs):
    for i in range(0, len(recs), 4096):
        part = recs[i:i + 4096]
        out.put(F.pack(kind, len(part), len(part) * R.size))
        out.put(b''.join(R.pack(j, d) for j, d in part))


def scan(dev, bs, start, end, rsize):
    fd, size = open_dev(dev, os.O_RDONLY)
    out = Out()
    out.put(F.pack(b'H', size, bs))
    out.flush()
    if end > size:
        return 0  # the DR side sees the size and stops
    if hasattr(os, 'posix_fadvise'):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    rsize = max(bs, rsize // bs * bs)
    pos = start
    compared = mismatched = 0
    last = time.time()
    while pos < end:
        n = min(rsize, end - pos)
        first = pos // bs
        count = (n + bs - 1) // bs
        expected = read_exact(count * 16)
        try:
            data = pread_full(fd, n, pos)
        except OSError as e:
            sys.stderr.write('p2v-fallback: %s: read error at offset %d: %s\n' % (dev, pos, e.strerror))
            return 2
        if len(data) < n:
            sys.stderr.write('p2v-fallback: %s: ended at offset %d\n' % (dev, pos + len(data)))
            return 2
        found = []
        for k in range(count):
            d = digest(data[k * bs:(k + 1) * bs])
            if d != expected[k * 16:(k + 1) * 16]:
                found.append((first + k, d))
        compared += count
        mismatched += len(found)
        records(out, b'M', found)
        pos += n
        now = time.time()
        if now - last >= 1.0:
            out.put(F.pack(b'P', pos, 0))
            out.flush()
            last = now
    out.put(F.pack(b'E', pos - start, T.size) + T.pack(compared, mismatched))
    out.flush()
    os.close(fd)
    return 0


def write(dev, bs, limit):
    fd, size = open_dev(dev, os.O_RDWR)
    out = Out()
    out.put(F.pack(b'H', size, bs))
    out.flush()
    if limit > size:
        return 0
    touched = set()
    written = 0
    zeros = bytes(1048576)
    while True:
        kind, off, n = F.unpack(read_exact(F.size))
        if kind == b'F':
            break
        if kind not in (b'W', b'Z') or off + n > limit or n == 0:
            sys.stderr.write('p2v-fallback: bad frame %r at offset %d (%d bytes)\n' % (kind, off, n))
            return 4
        data = read_exact(n) if kind == b'W' else None
        try:
            done = 0
            while done < n:
                if data is not None:
                    piece = memoryview(data)[done:]
                else:
                    piece = zeros[:min(len(zeros), n - done)]
                done += os.pwrite(fd, piece, off + done)
        except OSError as e:
            sys.stderr.write('p2v-fallback: %s: write error at offset %d: %s\n' % (dev, off, e.strerror))
            return 2
        written += n
        touched.update(range(off // bs, (off + n - 1) // bs + 1))
    try:
        os.fsync(fd)
        found = []
        for i in sorted(touched):
            n = min(bs, limit - i * bs)
            found.append((i, digest(pread_full(fd, n, i * bs))))
    except OSError as e:
        sys.stderr.write('p2v-fallback: %s: fsync or read-back failed: %s\n' % (dev, e.strerror))
        return 2
    records(out, b'D', found)
    out.put(F.pack(b'E', written, T.size) + T.pack(len(touched), 0))
    out.flush()
    os.close(fd)
    return 0


def main(argv):
    mode, dev = argv[0], argv[1]
    nums = [int(a) for a in argv[2:]]
    try:
        if mode == 'scan':
            return scan(dev, nums[0], nums[1], nums[2], nums[3])
        if mode == 'write':
            return write(dev, nums[0], nums[1])
    except PeerGone:
        return 4
    sys.stderr.write('p2v-fallback: unknown mode %r\n' % mode)
    return 4

sys.exit(main(sys.argv[1:]))
"""
