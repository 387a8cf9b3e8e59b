#!/usr/bin/env python3
"""Traffic for adapters/tests/e2e.sh: TCP and UDP senders and receivers that
check what arrives. Every wait is bounded; the exit status is 0 only when
everything arrived intact (and, for UDP, exactly once).

  tcp-recv ADDR PORT OUT READY   accept one connection, write "SHA256 BYTES" to OUT
  tcp-send ADDR PORT FILE        send FILE, then close
  udp-recv ADDR PORT SPEC READY  receive SPEC's datagrams; report missing,
                                 duplicated and corrupted ones by size
  udp-send ADDR PORT SPEC        send SPEC's datagrams
  seq-recv ADDR PORT COUNT READY receive numbered datagrams for up to 10 s;
                                 fail on a duplicate, a datagram out of
                                 order, or fewer than half arriving
  seq-send ADDR PORT COUNT       send COUNT numbered datagrams of mixed
                                 sizes (long ones with short ones between)

READY is a file created once the socket listens. SPEC is a comma-separated
list of groups, sent in order:

  SIZExCOUNT    COUNT datagrams of SIZE bytes, back to back
  gSEG:TOTAL    one send of TOTAL bytes with UDP_SEGMENT=SEG: the kernel (or
                the TUN's USO offload) splits it into datagrams of SEG bytes,
                the last one shorter

Every datagram has its own content (a counter, then a keyed hash stream), so
a duplicate, a loss or a corrupted byte shows up in the comparison.
"""

import collections
import hashlib
import socket
import struct
import sys
import time

SOL_UDP = 17
UDP_SEGMENT = 103
SO_RCVBUFFORCE = 33


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def payload(n, size):
    """The content of datagram number n of the whole SPEC."""
    head = struct.pack(">I", n)
    if size <= len(head):
        # Tiny datagrams: the low bytes of the counter (unique up to 256).
        return head[len(head) - size:]
    out = bytearray(head)
    block = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d:%d" % (n, size, block)).digest()
        block += 1
    return bytes(out[:size])


def groups(spec):
    """[(kind, seg, datagram payloads)] in sending order."""
    out, n = [], 0
    for token in spec.split(","):
        token = token.strip()
        if token.startswith("g"):
            seg, total = (int(x) for x in token[1:].split(":"))
            sizes = [seg] * (total // seg) + ([total % seg] if total % seg else [])
            kind = "gso"
        else:
            size, count = (int(x) for x in token.split("x"))
            sizes, seg, kind = [size] * count, size, "plain"
        datagrams = []
        for size in sizes:
            datagrams.append(payload(n, size))
            n += 1
        out.append((kind, seg, datagrams))
    return out


def touch(path):
    open(path, "w").close()


def tcp_recv(addr, port, out, ready):
    srv = socket.socket(family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, int(port)))
    srv.listen(1)
    srv.settimeout(30)
    touch(ready)
    conn, _ = srv.accept()
    conn.settimeout(30)
    h, total = hashlib.sha256(), 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        h.update(data)
        total += len(data)
    with open(out, "w") as f:
        f.write("%s %d\n" % (h.hexdigest(), total))
    conn.close()


def tcp_send(addr, port, path):
    s = socket.create_connection((addr, int(port)), timeout=30)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    # The receiver closes once it has read everything: a clean end.
    s.settimeout(30)
    while s.recv(1 << 16):
        pass
    s.close()


def udp_send(addr, port, spec):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.connect((addr, int(port)))
    for kind, seg, datagrams in groups(spec):
        if kind == "gso":
            s.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))])
        else:
            for d in datagrams:
                s.send(d)
        # A breath between groups: each group is one burst of equal sizes
        # (what GSO and GRO batch), and no queue on the way overflows.
        time.sleep(0.005)


def udp_recv(addr, port, spec, ready):
    want = collections.Counter(d for _, _, ds in groups(spec) for d in ds)
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    s.bind((addr, int(port)))
    touch(ready)
    got = collections.Counter()
    deadline = time.monotonic() + 10
    complete_at = None
    while True:
        now = time.monotonic()
        # Once everything is in, listen a little longer for duplicates.
        end = complete_at + 0.3 if complete_at else deadline
        if now >= end:
            break
        s.settimeout(end - now)
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            break
        got[data] += 1
        if complete_at is None and all(got[d] >= c for d, c in want.items()):
            complete_at = time.monotonic()
    missing = want - got
    extra = got - want
    corrupt = [d for d in extra if d not in want]
    dups = [d for d in extra if d in want]

    def by_size(ds, counts):
        c = collections.Counter()
        for d in ds:
            c[len(d)] += counts[d]
        return dict(sorted(c.items()))

    total = sum(want.values())
    print("udp %s:%s: want %d datagrams, got %d" % (addr, port, total, sum(got.values())))
    ok = True
    if missing:
        ok = False
        print("  missing by size:", by_size(missing, missing))
    if dups:
        ok = False
        print("  duplicated by size:", by_size(dups, extra))
    if corrupt:
        ok = False
        print("  not sent (corrupted) by size:", by_size(corrupt, extra))
    return ok


# Sizes of the numbered datagrams, repeated: short ones after long ones of
# the same flow, the pattern a receiver that passes short datagrams ahead of
# long ones must keep in order. All fit a 1280-byte tunnel MTU.
SEQ_SIZES = [1200, 1200, 1200, 60, 200, 900, 30, 1200, 8]


def seq_send(addr, port, count):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.connect((addr, int(port)))
    for i in range(int(count)):
        size = SEQ_SIZES[i % len(SEQ_SIZES)]
        s.send(struct.pack(">I", i) + bytes(size - 4))
        if i % len(SEQ_SIZES) == len(SEQ_SIZES) - 1:
            time.sleep(0.002)


def seq_recv(addr, port, count, ready):
    count = int(count)
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    s.bind((addr, int(port)))
    touch(ready)
    got, last, disorder, dups = 0, -1, [], 0
    seen = set()
    deadline = time.monotonic() + 10
    while got < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            break
        n = struct.unpack(">I", data[:4])[0]
        if n in seen:
            dups += 1
            continue
        seen.add(n)
        got += 1
        if n < last:
            disorder.append((last, n))
        last = max(last, n)
    print("seq %s:%s: %d of %d arrived, %d out of order, %d duplicated"
          % (addr, port, got, count, len(disorder), dups))
    if disorder:
        print("  first out of order (after, got):", disorder[:5])
    return not disorder and dups == 0 and got * 2 >= count


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "tcp-recv":
        tcp_recv(*args)
    elif cmd == "tcp-send":
        tcp_send(*args)
    elif cmd == "udp-send":
        udp_send(*args)
    elif cmd == "udp-recv":
        return 0 if udp_recv(*args) else 1
    elif cmd == "seq-send":
        seq_send(*args)
    elif cmd == "seq-recv":
        return 0 if seq_recv(*args) else 1
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
