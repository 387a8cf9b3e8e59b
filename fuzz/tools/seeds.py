#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/. Run from fuzz/."""
import hashlib, ipaddress, os, random, struct, glob, re

def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def v4(src, dst, proto, payload, extra=b''):
    ihl = 5 + len(extra)//4
    h = struct.pack('!BBHHHBBH4s4s', 0x40|ihl, 0, ihl*4+len(payload), 1, 0, 64, proto, 0,
                    ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + extra
    h = h[:10] + struct.pack('!H', csum(h)) + h[12:]
    return h + payload

def v6(src, dst, nh, payload):
    return struct.pack('!IHBB16s16s', 0x60000000, len(payload), nh, 64,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload

def udp(sp, dp, data): return struct.pack('!HHHH', sp, dp, 8+len(data), 0) + data
def tcp(sp, dp, flags): return struct.pack('!HHIIBBHHH', sp, dp, 1, 0, 0x50, flags, 65535, 0, 0)
def icmp(t, ident, seq, data):
    m = struct.pack('!BBHHH', t, 0, 0, ident, seq) + data
    return m[:2] + struct.pack('!H', csum(m)) + m[4:]

A4, B4 = '100.64.0.1', '100.64.0.2'
A6, B6 = 'fd7a:115c:a1e0::1', 'fd7a:115c:a1e0::2'

def write(target, name, data):
    d = os.path.join('corpus', target)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)

ip = {
    'v4-udp': v4(A4, B4, 17, udp(5000, 6000, b'hello')),
    'v4-tcp-syn': v4(A4, B4, 6, tcp(40000, 22, 0x02)),
    'v4-tcp-synack': v4(B4, A4, 6, tcp(22, 40000, 0x12)),
    'v4-tcp-rst': v4(B4, A4, 6, tcp(22, 40000, 0x04)),
    'v4-icmp-req': v4(A4, B4, 1, icmp(8, 0x1234, 1, b'ping')),
    'v4-icmp-rep': v4(B4, A4, 1, icmp(0, 0x1234, 1, b'ping')),
    'v4-tsmp-ping': v4(A4, B4, 99, b'p' + bytes(range(8))),
    'v4-options': v4(A4, B4, 17, udp(1, 2, b'x'), extra=b'\x01\x01\x01\x00'),
    'v4-fragment': v4(A4, B4, 17, b'later fragment')[:6] + b'\x00\x10' + v4(A4, B4, 17, b'later fragment')[8:],
    'v4-trailing': v4(A4, B4, 17, udp(1, 2, b'x')) + b'trailing junk',
    'v4-truncated': v4(A4, B4, 17, udp(1, 2, b'xyz'))[:24],
    'v6-udp': v6(A6, B6, 17, udp(5000, 6000, b'hello6')),
    'v6-icmp-req': v6(A6, B6, 58, icmp(128, 7, 9, b'ping6')),
    'v6-icmp-rep': v6(B6, A6, 58, icmp(129, 7, 9, b'ping6')),
    'v6-tcp-syn': v6(A6, B6, 6, tcp(40000, 443, 0x02)),
    'v6-hopbyhop-udp': v6(A6, B6, 0, bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp(1, 2, b'ext')),
    'v6-routing-dst-udp': v6(A6, B6, 43, bytes([60, 0, 0, 0, 0, 0, 0, 0]) + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp(1, 2, b'e')),
    'v6-fragment': v6(A6, B6, 44, bytes([17, 0, 0, 8, 0, 0, 0, 1]) + b'frag'),
    'v6-tsmp-pong': v6(B6, A6, 99, b'o' + bytes(8) + b'\x1f\x90'),
    'empty': b'',
    'bad-version': b'\x75' + bytes(39),
}
for k, v in ip.items(): write('ip_parsers', k, v)

ts = {
    'ping': b'p' + bytes(range(8)), 'pong': b'o' + bytes(range(8)), 'pong-port': b'o' + bytes(8) + b'\x1f\x90',
    'pong-10': b'o' + bytes(9), 'reject': b'!\x06A\x9c\x40\x00\x16', 'reject-flags': b'!\x11S\x00\x35\x00\x35\x01',
    'reject-other': b'!\x06Z\x00\x01\x00\x02\x00', 'truncated': b'p\x01\x02', 'unknown': b'?', 'empty': b'',
}
for k, v in ts.items(): write('tsmp', k, v)

MAGIC = bytes([0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac])
def ep(addr, port):
    a = ipaddress.ip_address(addr)
    p = a.packed if a.version == 6 else bytes(10) + b'\xff\xff' + a.packed
    return p + struct.pack('!H', port)
dm = {
    'ping': b'\x01\x00' + bytes(range(12)), 'ping-key': b'\x01\x00' + bytes(range(12)) + bytes(range(32, 64)),
    'ping-padded': b'\x01\x00' + bytes(range(12)) + bytes(100), 'pong-v4': b'\x02\x00' + bytes(12) + ep('198.51.100.7', 41641),
    'pong-v6': b'\x02\x00' + bytes(12) + ep('2001:db8::7', 443), 'cmm-0': b'\x03\x00',
    'cmm-3': b'\x03\x00' + ep('192.0.2.1', 1) + ep('2001:db8::1', 2) + ep('10.0.0.1', 3),
    'cmm-partial': b'\x03\x00' + ep('192.0.2.1', 1) + b'\x00\x01', 'version-1': b'\x01\x01' + bytes(12),
    'unknown': b'\x09\x00', 'short': b'\x01',
    'datagram': MAGIC + bytes(range(32)) + bytes(24) + bytes(16) + b'\x01\x00' + bytes(12),
    'datagram-truncated': MAGIC + bytes(40),
}
for k, v in dm.items(): write('disco_open', k, v)

# config: the example and variations of it.
base = open('../adapters/examples/wgmesh0.toml').read().replace(
    'private_key_file = "/etc/wgmesh/private.key"', 'private_key = "YGz6xq0+hOVBKzEuoqCbN2dCEAj4mK0CwLCB8JeLQW0="')
cfgs = {
    'example': base,
    'no-key': base.replace('private_key = "YGz6xq0+hOVBKzEuoqCbN2dCEAj4mK0CwLCB8JeLQW0="', ''),
    'bad-mtu': base.replace('mtu = 1280', 'mtu = 100'),
    'bad-ip': base.replace('"100.64.0.2/32"', '"100.64.0.999/32"'),
    'dup-peer': base + base[base.index('[[peer]]'):],
    'overlap': base + '\n[[peer]]\nname = "thief"\npublic_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="\nallowed_ips = ["100.64.0.2/32"]\n',
    'unknown-field': base.replace('[dns]', '[dns]\nbogus = 1'),
    'wrong-type': base.replace('listen_port = 41641', 'listen_port = "x"'),
    'v6-only': base.replace('"100.64.0.1/32", ', '').replace('"100.64.0.2/32", ', ''),
    'subnet': base.replace('advertised_routes', 'advertised_routes = ["192.168.10.0/24"]\n#').replace('# primary_routes = ["192.168.10.0/24"]', 'primary_routes = ["192.168.10.0/24"]'),
    'empty': '',
    'minimal': '[interface]\nprivate_key = "YGz6xq0+hOVBKzEuoqCbN2dCEAj4mK0CwLCB8JeLQW0="\n',
    'bad-name': base.replace('name = "wgmesh0"', 'name = "a/b c"'),
    'both-keys': base.replace('[interface]', '[interface]\nprivate_key_file = "/nonexistent"'),
}
for k, v in cfgs.items(): write('config', k + '.toml', v.encode())

for f in sorted(glob.glob('../sim/scenarios/*.toml') + glob.glob('../corpus/*.toml')):
    write('scenario', os.path.basename(f), open(f, 'rb').read())

# engine: hand-made sequences (op, node, args...) and random ones.
E = {
    'send-advance': bytes([0, 0, 0, 8]) + b'payload!' + bytes([7, 0, 50]),
    'ping-all-kinds': bytes([14, 0, 0, 0, 0, 14, 0, 1, 1, 0, 14, 0, 2, 0, 0, 7, 0, 255, 8, 0, 1]),
    'idle-trim-wake': bytes([0, 0, 0, 4]) + b'wake' + bytes([7, 0, 100, 8, 0, 30, 0, 1, 0, 4]) + b'back' + bytes([7, 0, 100]),
    'restart': bytes([0, 0, 0, 2]) + b'hi' + bytes([7, 0, 100, 17, 1, 5, 0, 0, 0, 2]) + b'yo' + bytes([7, 0, 200]),
    'corrupt-replay': bytes([0, 0, 0, 4]) + b'abcd' + bytes([9, 0, 1, 0, 5, 0x10, 7, 0, 50, 10, 0, 0, 0, 10, 0, 1, 1, 7, 0, 10]),
    'invalid-reconfigs': bytes([12, 0, 0, 12, 0, 1, 12, 0, 2, 12, 0, 3, 12, 0, 4, 12, 0, 5, 12, 0, 6]),
    'outsider': bytes([11, 0, 1, 0x80 | 0, 2, 0, 0, 4]) + b'from' + bytes([7, 2, 100]),
    'link-changes': bytes([0, 0, 0, 1, 120, 15, 0, 1, 7, 0, 100, 15, 0, 2, 7, 0, 100, 15, 0, 0, 7, 0, 100]),
    'flood': bytes([19, 0, 39, 0, 7, 0, 255]),
    'close': bytes([14, 0, 1, 0, 0, 18, 0, 0xc1, 0, 0, 0, 1, 65, 7, 0, 10]),
    'filter-capture': bytes([16, 1, 4, 1, 16, 1, 2, 0, 0, 0, 3]) + b'abc' + bytes([7, 0, 40]),
    'tcp-syn-unanswered': bytes([2, 0, 0, 2, 1, 7, 0, 255, 7, 0, 255]),
    'fake-icmp': bytes([11, 0, 8, 3, 0, 0, 0, 0, 1, 0, 2, 7, 0, 20]),
    'disco-forged': bytes([6, 0, 1, 0, 0, 0, 6, 0, 2, 1, 3, 0, 0, 0, 0, 1, 6, 0, 3, 2, 2, 0, 0, 1, 7, 0, 10]),
    'delta': bytes([13, 0, 1, 7, 0, 10, 13, 0, 0, 0, 0, 0, 2]) + b'ok' + bytes([7, 0, 50]),
}
for k, v in E.items(): write('engine', k, v)
rng = random.Random(1)
for i in range(12):
    write('engine', 'random-%02d' % i, bytes(rng.randrange(256) for _ in range(rng.randrange(16, 160))))
