"""The hash-mode reader p2v streams to a source host (``python3 -c HELPER_SOURCE ...``).

It runs on the source with Python 3.5+ and the standard library only. It reads the device
once, sequentially, in large reads; hashes each coarse block exactly like
:func:`p2v.replication.model.digest`; and compares with the DR side's map, which it asks
for a chunk at a time (so its memory stays flat whatever the disk size). Changed blocks
are refined at 4 KiB with one round trip that does not stall the read: the helper keeps
a bounded window of changed blocks while it reads on, and the DR side answers as the
CHANGED frames arrive.

Every frame is :data:`FRAME` (type, a, b) then ``b`` payload bytes, unless said otherwise.

Helper -> DR (stdout):

``H`` hello         a = device size, b = block size
``M`` map request   a = first block, b = block count; the DR answers with ``m``
``C`` changed       a = block; payload = new digest + one digest per 4 KiB piece;
                    the DR answers with ``N``
``S`` seeded block  a = block; payload = new digest; the DR holds zeros there, so the
                    non-zero pieces follow at once as ``D``/``X`` frames (no round trip)
``Z`` zero block    a = block, b = 0: the block became all zeros
``D`` data          a = disk offset, payload = the bytes
``X`` compressed    a = disk offset, payload = zlib data (level 1)
``0`` zero data     a = disk offset, b = length; no payload: these pieces are zeros
``P`` progress      a = position reached (at least once a second)
``E`` end           a = where this run stopped; payload = :data:`TOTALS`

DR -> helper (stdin):

``m`` map chunk     a = first block, payload = the digests
``N`` need          a = block, payload = bitmask of the pieces to send (bit j of byte
                    j//8 = piece j); an empty mask releases the block

Arguments: ``DEVICE START END BLOCK READ WINDOW BUDGET FLAGS MAPCHUNK THREADS``. The helper
reads blocks from byte ``START`` to ``END`` (0 = end of device) in ``READ``-byte reads (a
thread reads ahead), hashes each read with up to ``THREADS`` threads (hashlib releases the
GIL; at most the host's CPU count), holds at most ``WINDOW`` bytes of changed blocks waiting
for an answer, and stops at the first read boundary after ``BUDGET`` bytes went out, so each
SSH channel carries a bounded amount (see ``ssh_session`` on re-keying). FLAGS bit 0: compress
data. Exit status 3 when the
device cannot be opened, 2 when it cannot be read, 4 when the DR side went away.
"""

from __future__ import annotations

import struct

FRAME = struct.Struct(">cQI")
# bytes read, blocks changed, data bytes, zero bytes, data frames; then milliseconds the helper
# was blocked on a full window, on the map, on the disk, on its output; its CPU; its wall time
TOTALS = struct.Struct(">QQQQQQQQQQQ")
HELPER_TIMINGS = ("window_wait", "map_wait", "disk_wait", "output_wait", "cpu", "wall")
HELLO, MAP_REQUEST, CHANGED, SEEDED, ZERO_BLOCK = b"H", b"M", b"C", b"S", b"Z"
DATA, COMPRESSED, ZERO_DATA, PROGRESS, END = b"D", b"X", b"0", b"P", b"E"
MAP_CHUNK, NEED = b"m", b"N"
FLAG_COMPRESS = 1
EXIT_OPEN, EXIT_READ, EXIT_PEER_GONE = 3, 2, 4

# Keep this Python 3.5 compatible: no f-strings, no annotations, no walrus
# (tests/unit/test_delta_helper.py parses it with feature_version=(3, 5)).
HELPER_SOURCE = r"""
import errno, hashlib, os, select, struct, sys, threading, time, zlib
try:
    import mmap  # not in Debian's python3-minimal: then no O_DIRECT reads
except ImportError:
    mmap = None

F = struct.Struct('>cQI')
T = struct.Struct('>QQQQQQQQQQQ')
ZD = bytes(16)
UD = b'\xff' * 16
SUB = 4096
ZSUB = bytes(SUB)


class PeerGone(Exception):
    pass


def is_zero(p):
    return p == ZSUB[:len(p)]


def digest(b, zero):
    if (len(b) == len(zero) and b == zero) or (len(b) != len(zero) and b.count(0) == len(b)):
        return ZD
    d = hashlib.sha256(b).digest()[:16]
    if d == ZD or d == UD:
        d = b'\x01' + d[1:]
    return d


class Reader(threading.Thread):
    # reads ahead so the disk works while the main thread hashes; with O_DIRECT where the
    # device allows it (no page-cache copy: a third of the CPU of a cold read, and the
    # source's cache is left alone), else through the page cache
    def __init__(self, fd, dfd, pos, end, rsize):
        threading.Thread.__init__(self)
        self.daemon = True
        self.fd, self.dfd, self.pos, self.end, self.rsize = fd, dfd, pos, end, rsize
        self.cond = threading.Condition()
        self.items = []
        self.stop = False
        self.direct = False

    def read_direct(self, m, pos, want):
        aligned = (want + 4095) // 4096 * 4096
        view = memoryview(m)
        got = 0
        try:
            os.lseek(self.dfd, pos, 0)
            while got < want:
                n = os.readv(self.dfd, [view[got:aligned]])
                if not n:
                    break
                got += n
        finally:
            view.release()
        return m[:min(got, want)]

    def read_buffered(self, pos, want):
        parts = []
        got = 0
        while got < want:
            b = os.pread(self.fd, want - got, pos + got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return parts[0] if len(parts) == 1 else b''.join(parts)

    def run(self):
        m = mmap.mmap(-1, self.rsize) if self.dfd >= 0 and mmap is not None else None
        pos = self.pos
        while pos < self.end and not self.stop:
            want = min(self.rsize, self.end - pos)
            item = None
            data = None
            try:
                if m is not None:
                    try:
                        data = self.read_direct(m, pos, want)
                        self.direct = True
                    except OSError as e:
                        if e.errno != errno.EINVAL or self.direct:
                            raise
                        m = None  # O_DIRECT refused here: use the page cache
                if data is None:
                    data = self.read_buffered(pos, want)
                if len(data) < want:
                    item = ('error', 'ended at offset %d, expected %d bytes' % (pos + len(data), self.end))
            except OSError as e:
                item = ('error', 'read error at offset %d: %s' % (pos, e.strerror))
            with self.cond:
                while len(self.items) >= 3 and not self.stop:
                    self.cond.wait()
                self.items.append(item or ('data', pos, data))
                self.cond.notify_all()
            if item is not None:
                return
            pos += want

    def get(self):
        with self.cond:
            while not self.items:
                self.cond.wait()
            item = self.items.pop(0)
            self.cond.notify_all()
            return item

    def close(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()


class Pool(object):
    # A fixed set of worker threads (python3-minimal has neither concurrent.futures nor queue).
    def __init__(self, n):
        self.cond = threading.Condition()
        self.jobs = []
        self.stop = False
        for _ in range(n):
            t = threading.Thread(target=self.work)
            t.daemon = True
            t.start()

    def work(self):
        while True:
            with self.cond:
                while not self.jobs and not self.stop:
                    self.cond.wait()
                if not self.jobs:
                    return
                fn, args, slot = self.jobs.pop(0)
            try:
                out = (fn(*args), None)
            except BaseException as e:
                out = (None, e)
            with self.cond:
                slot.append(out)
                self.cond.notify_all()

    def submit(self, fn, *args):
        slot = []
        with self.cond:
            self.jobs.append((fn, args, slot))
            self.cond.notify_all()
        return slot

    def result(self, slot):
        with self.cond:
            while not slot:
                self.cond.wait()
        value, err = slot[0]
        if err is not None:
            raise err
        return value

    def shutdown(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()


def hash_blocks(buf, lo, hi, bs, zero):
    # (block, digest) for the blocks of buf[lo:hi]; runs in a worker thread, and hashlib
    # lets go of the GIL while it hashes, so several blocks hash at once
    out = []
    for o in range(lo, hi, bs):
        b = buf[o:o + bs]
        out.append((b, digest(b, zero)))
    return out


class Helper:
    def __init__(self, bs, window, compress, mchunk, nblocks):
        self.bs, self.window, self.compress, self.mchunk, self.nblocks = bs, window, compress, mchunk, nblocks
        self.zero = bytes(bs)
        self.out = bytearray()
        self.sent = 0
        self.inbuf = bytearray()
        self.maps = {}
        self.asked = set()
        self.cur = -1
        self.pending = {}
        self.pending_bytes = 0
        self.waits = [0.0, 0.0, 0.0, 0.0]  # seconds blocked: window full, map, disk, output
        self.changed = self.data_bytes = self.zero_bytes = self.data_frames = 0

    def put(self, b):
        self.out += b
        self.sent += len(b)
        if len(self.out) >= 262144:
            self.flush()

    def flush(self):
        t0 = time.time()
        view = memoryview(self.out)
        done = 0
        while done < len(view):
            done += os.write(1, view[done:])
        view.release()
        del self.out[:]
        self.waits[3] += time.time() - t0

    def pump(self, timeout):
        # read what the DR side sent; handle complete frames
        r = select.select([0], [], [], timeout)[0]
        if not r:
            return
        data = os.read(0, 262144)
        if not data:
            raise PeerGone()
        self.inbuf += data
        buf = self.inbuf
        pos = 0
        while len(buf) - pos >= 13:
            kind, a, n = F.unpack_from(buf, pos)
            if len(buf) - pos - 13 < n:
                break
            payload = bytes(buf[pos + 13:pos + 13 + n])
            pos += 13 + n
            if kind == b'm':
                self.maps[a // self.mchunk] = payload
            elif kind == b'N':
                self.answer(a, payload)
            else:
                raise ValueError('unexpected frame %r from the DR side' % kind)
        del buf[:pos]

    def ask(self, k):
        if k * self.mchunk < self.nblocks and k not in self.asked:
            self.asked.add(k)
            first = k * self.mchunk
            self.put(F.pack(b'M', first, min(self.mchunk, self.nblocks - first)))

    def old(self, i):
        k = i // self.mchunk
        if k != self.cur:
            # entering map chunk k: ask for it and the next one, forget the ones behind
            self.cur = k
            self.ask(k)
            self.ask(k + 1)
            for x in [x for x in self.maps if x < k]:
                del self.maps[x]
            t0 = time.time()
            while k not in self.maps:
                self.flush()
                self.pump(1.0)
            self.waits[1] += time.time() - t0
        o = (i - k * self.mchunk) * 16
        return self.maps[k][o:o + 16]

    def send_data(self, off, data):
        self.data_bytes += len(data)
        self.data_frames += 1
        if self.compress:
            c = zlib.compress(data, 1)
            if len(c) < len(data):
                self.put(F.pack(b'X', off, len(c)))
                self.put(c)
                return
        self.put(F.pack(b'D', off, len(data)))
        self.put(data)

    def send_pieces(self, base, blk, wanted):
        # runs of wanted pieces: zero runs as '0' frames, the rest as data
        n = (len(blk) + SUB - 1) // SUB
        j = 0
        while j < n:
            if not wanted(j):
                j += 1
                continue
            z = is_zero(blk[j * SUB:(j + 1) * SUB])
            k = j + 1
            while k < n and wanted(k):
                if is_zero(blk[k * SUB:(k + 1) * SUB]) != z:
                    break
                k += 1
            lo, hi = j * SUB, min(k * SUB, len(blk))
            if z:
                self.data_frames += 1
                self.put(F.pack(b'0', base + lo, hi - lo))
            else:
                self.send_data(base + lo, blk[lo:hi])
            j = k

    def answer(self, i, mask):
        blk = self.pending.pop(i)
        self.pending_bytes -= len(blk)
        self.send_pieces(i * self.bs, blk, lambda j: j // 8 < len(mask) and mask[j // 8] >> (j % 8) & 1)

    def block(self, i, blk, new):
        if new == ZD:
            self.zero_bytes += len(blk)
        old = self.old(i)
        if new == old:
            return
        self.changed += 1
        if new == ZD:
            self.put(F.pack(b'Z', i, 0))
        elif old == ZD:
            self.put(F.pack(b'S', i, 16))
            self.put(new)
            self.send_pieces(i * self.bs, blk, lambda j: not is_zero(blk[j * SUB:(j + 1) * SUB]))
        else:
            subs = [digest(blk[j:j + SUB], ZSUB) for j in range(0, len(blk), SUB)]
            payload = new + b''.join(subs)
            self.put(F.pack(b'C', i, len(payload)))
            self.put(payload)
            self.pending[i] = blk
            self.pending_bytes += len(blk)
            if self.pending_bytes > self.window:
                t0 = time.time()
                while self.pending_bytes > self.window:
                    self.flush()
                    self.pump(1.0)
                self.waits[0] += time.time() - t0


def main(argv):
    started = time.time()
    dev = argv[0]
    start, end, bs, rsize, window, budget, flags, mchunk, threads = [int(a) for a in argv[1:10]]
    threads = max(1, min(threads, os.cpu_count() or 1))
    pool = Pool(threads) if threads > 1 else None
    try:
        fd = os.open(dev, os.O_RDONLY)
        size = os.lseek(fd, 0, 2)
    except OSError as e:
        sys.stderr.write('p2v-delta: cannot open %s: %s\n' % (dev, e.strerror))
        return 3
    if hasattr(os, 'posix_fadvise'):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    if end <= 0 or end > size:
        end = size
    nblocks = (size + bs - 1) // bs
    h = Helper(bs, window, flags & 1, mchunk, nblocks)
    h.put(F.pack(b'H', size, bs))
    if start >= end:
        start = end
    dfd = -1
    if hasattr(os, 'O_DIRECT') and rsize % 4096 == 0 and start % 4096 == 0:
        try:
            dfd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            dfd = -1
    reader = Reader(fd, dfd, start, end, rsize)
    reader.start()
    pos = start
    nread = 0
    last = time.time()
    try:
        while pos < end:
            t0 = time.time()
            item = reader.get()
            h.waits[2] += time.time() - t0
            if item[0] == 'error':
                sys.stderr.write('p2v-delta: %s: %s\n' % (dev, item[1]))
                return 2
            buf = item[2]
            n = len(buf)
            if pool is not None and n > bs:
                step = ((n + threads - 1) // threads + bs - 1) // bs * bs
                jobs = [pool.submit(hash_blocks, buf, o, min(n, o + step), bs, h.zero) for o in range(0, n, step)]
                blocks = []
                for job in jobs:
                    blocks.extend(pool.result(job))
            else:
                blocks = hash_blocks(buf, 0, n, bs, h.zero)
            for k, (blk, d) in enumerate(blocks):
                h.block((pos + k * bs) // bs, blk, d)
            nread += n
            pos += n
            if h.pending:
                h.flush()  # let the DR side answer while we read on
            h.pump(0)
            now = time.time()
            if now - last >= 1.0:
                h.put(F.pack(b'P', pos, 0))
                h.flush()
                last = now
            if h.sent >= budget:
                break
        reader.close()
        if pool is not None:
            pool.shutdown()
        while h.pending:
            h.flush()
            h.pump(1.0)
        h.put(F.pack(b'E', pos, T.size))
        ms = [int(w * 1000) for w in h.waits]
        cpu = os.times()
        ms += [int((cpu[0] + cpu[1]) * 1000), int((time.time() - started) * 1000)]
        h.put(T.pack(nread, h.changed, h.data_bytes, h.zero_bytes, h.data_frames, *ms))
        h.flush()
    except PeerGone:
        return 4
    except (BrokenPipeError, ConnectionResetError):
        return 4
    os.close(fd)
    if dfd >= 0:
        os.close(dfd)
    return 0

sys.exit(main(sys.argv[1:]))
"""
