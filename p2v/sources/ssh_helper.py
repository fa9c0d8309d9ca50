"""The device reader p2v streams to a source host (``python3 -c HELPER_SOURCE ...``).

It runs on the source with Python 3.5+ and the standard library only, reads the
device once in large sequential reads, skips all-zero blocks and writes framed
records to stdout. Every frame starts with :data:`FRAME` (type, offset, length):

``H``  hello: offset = device size in bytes, length = zero-block size
``D``  data: ``length`` bytes of the device at ``offset`` follow
``P``  progress: offset = position reached (sent at least once a second while
       the helper only finds zeros, so the reader can tell "busy" from "stalled")
``E``  end: offset = where this run stopped (the next run starts there), length =
       :data:`END_TOTALS` size; the totals follow (bytes read, data bytes sent,
       zero bytes skipped, data records)

Arguments: ``DEVICE START END BUDGET READ_SIZE ZERO_BLOCK``. The helper reads from
``START`` to ``END`` (0 = end of device) but stops at the first read boundary after
``BUDGET`` data bytes were sent, so each SSH channel carries a bounded amount
(see ``ssh_session`` on re-keying). Exit status 2 with one line on stderr when
the device cannot be read.
"""

from __future__ import annotations

import struct

FRAME = struct.Struct(">cQI")
END_TOTALS = struct.Struct(">QQQQ")
HELLO, DATA, PROGRESS, END = b"H", b"D", b"P", b"E"

# Keep this Python 3.5 compatible: no f-strings, no annotations, no walrus
# (tests/unit/test_ssh_url.py parses it with feature_version=(3, 5)).
HELPER_SOURCE = r"""
import os, struct, sys, time

def main(argv):
    dev = argv[0]
    start, end, budget, rsize, zsize = [int(a) for a in argv[1:6]]
    frame = struct.Struct('>cQI')
    totals = struct.Struct('>QQQQ')
    out = sys.stdout.buffer
    try:
        fd = os.open(dev, os.O_RDONLY)
        size = os.lseek(fd, 0, 2)
        if hasattr(os, 'posix_fadvise'):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.lseek(fd, start, 0)
    except OSError as e:
        sys.stderr.write('p2v-helper: %s: %s\n' % (dev, e.strerror))
        return 2
    if end <= 0 or end > size:
        end = size
    out.write(frame.pack(b'H', size, zsize))
    zero = bytes(zsize)
    zero_read = bytes(rsize)
    pos = start
    nread = nsent = nzero = records = 0
    last = time.time()
    while pos < end and nsent < budget:
        want = min(rsize, end - pos)
        try:
            block = os.read(fd, want)
        except OSError as e:
            sys.stderr.write('p2v-helper: %s: read error at offset %d: %s\n' % (dev, pos, e.strerror))
            return 2
        n = len(block)
        if n == 0:
            sys.stderr.write('p2v-helper: %s: ended at offset %d, expected %d bytes\n' % (dev, pos, end))
            return 2
        nread += n
        if (n == rsize and block == zero_read) or (n < rsize and block.count(0) == n):
            nzero += n
        else:
            view = memoryview(block)
            run = -1
            i = 0
            while i < n:
                j = min(i + zsize, n)
                chunk = block[i:j]
                if chunk == zero or (j - i < zsize and chunk.count(0) == j - i):
                    nzero += j - i
                    if run >= 0:
                        out.write(frame.pack(b'D', pos + run, i - run))
                        out.write(view[run:i])
                        nsent += i - run
                        records += 1
                        run = -1
                elif run < 0:
                    run = i
                i = j
            if run >= 0:
                out.write(frame.pack(b'D', pos + run, n - run))
                out.write(view[run:n])
                nsent += n - run
                records += 1
            last = time.time()
        pos += n
        now = time.time()
        if now - last >= 1.0:
            out.write(frame.pack(b'P', pos, 0))
            out.flush()
            last = now
    out.write(frame.pack(b'E', pos, totals.size))
    out.write(totals.pack(nread, nsent, nzero, records))
    out.flush()
    os.close(fd)
    return 0

sys.exit(main(sys.argv[1:]))
"""
