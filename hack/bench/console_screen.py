#!/usr/bin/env python3
"""What a VM's console shows, read the two ways the host can: QEMU's QMP `screendump`, and an RFB
(VNC) client on QEMU's VNC console, the way the gateway reads it. Standard library only (plus
`cryptography` for VNC authentication when a password is given).

  console_screen.py qmp-dump QMP_SOCKET OUT.png        # screendump through QMP
  console_screen.py vnc VNC_SOCKET|HOST:PORT OUT.png [PASSWORD]  # one full frame over RFB 3.8
  console_screen.py vnc-click VNC_SOCKET|HOST:PORT X Y [PASSWORD]  # a left click
  console_screen.py vnc-key VNC_SOCKET|HOST:PORT KEYSYM [PASSWORD]  # a key, e.g. 0xff1b (Escape)
  console_screen.py passwd-file PASSWORD OUT            # TigerVNC's password file (vncpasswd -f)
  console_screen.py qmp QMP_SOCKET 'COMMAND-JSON'      # one QMP command, its answer as JSON

Both capture commands print one JSON line describing the picture:
  {"width":..,"height":..,"non_black":0.93,"colours":412,"panel":true,"menu_open":false,"desktop":true}
`desktop` is the test's criterion: a text console (VGA text mode or the kernel's framebuffer
console) is almost all black with a few text colours; Xfce's desktop is mostly its wallpaper,
with icons, anti-aliased text (hundreds of colours) and its light top panel once that is drawn.
`menu_open`: the applications menu is open below the panel's left end.
"""

import json
import os
import socket
import struct
import sys
import tempfile
import zlib


def stats(width, height, rgb):
    """rgb: bytes, 3 per pixel; every other pixel of every other row is looked at."""

    def light(x0, y0, x1, y1):
        """The fraction of light pixels (an Adwaita panel or menu) in a rectangle."""
        n = lit = 0
        for y in range(y0, min(y1, height), 2):
            for x in range(x0, min(x1, width), 2):
                i = 3 * (y * width + x)
                n += 1
                lit += rgb[i] + rgb[i + 1] + rgb[i + 2] > 600
        return lit / n if n else 0.0

    n = 0
    non_black = 0
    colours = set()
    for i in (3 * (y * width + x) for y in range(0, height, 2) for x in range(0, width, 2)):
        n += 1
        r, g, b = rgb[i], rgb[i + 1], rgb[i + 2]
        if r + g + b > 48:
            non_black += 1
        colours.add((r, g, b))
    frac = non_black / n if n else 0.0
    # Xfce's default top panel (light, Adwaita) across the first rows, items drawn on it.
    panel = light(0, 0, width // 2, 20) >= 0.5
    return {
        "width": width,
        "height": height,
        "non_black": round(frac, 3),
        "colours": len(colours),
        "panel": panel,
        # The applications menu, when open, lies under the panel's left end.
        "menu_open": light(0, 40, 180, 240) >= 0.6,
        "desktop": frac >= 0.5 and len(colours) >= 32 and panel,
    }


def write_png(path, width, height, rgb):
    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    stride = 3 * width
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def read_ppm(path):
    with open(path, "rb") as f:
        data = f.read()
    # P6\n<w> <h>\n255\n<rgb>
    fields = []
    i = 0
    while len(fields) < 4:
        while data[i:i + 1].isspace():
            i += 1
        j = i
        while not data[j:j + 1].isspace():
            j += 1
        fields.append(data[i:j])
        i = j
    if fields[0] != b"P6" or fields[3] != b"255":
        raise SystemExit(f"{path}: not a binary 8-bit PPM")
    w, h = int(fields[1]), int(fields[2])
    return w, h, data[i + 1:i + 1 + 3 * w * h]


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            ans = json.loads(self.f.readline())
            if "return" in ans:
                return ans["return"]
            if "error" in ans:
                raise SystemExit(f"qmp {name}: {ans['error']}")
            # events: skip


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit(f"vnc: connection closed ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


def vnc_des(key, block):
    """DES as VNC uses it: the key (8 bytes, zero padded) with each byte's bits reversed. Triple
    DES with K|K|K is single DES."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes
        try:
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        except ImportError:
            from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
    except ImportError:
        raise SystemExit("vnc: a password needs python3-cryptography (DES)")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in key[:8].ljust(8, b"\0"))
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


# The fixed key VNC servers obfuscate stored passwords with (what `vncpasswd -f` writes;
# operator/gateway/src/rfb/handshake.rs has the same).
PASSWORD_FILE_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])


def vnc_connect(target, password=None):
    """An authenticated RFB 3.8 session: (socket, width, height). target: a unix socket path,
    or HOST:PORT."""
    if os.path.exists(target):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(target)
    else:
        host, port = target.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=60)
    if not recv_exact(s, 12).startswith(b"RFB 003."):
        raise SystemExit("vnc: not an RFB server")
    s.sendall(b"RFB 003.008\n")
    (n,) = struct.unpack("B", recv_exact(s, 1))
    if n == 0:
        (ln,) = struct.unpack(">I", recv_exact(s, 4))
        raise SystemExit(f"vnc: refused: {recv_exact(s, ln).decode(errors='replace')}")
    types = recv_exact(s, n)
    if password is not None:
        if 2 not in types:
            raise SystemExit(f"vnc: a password was given but the server offers {list(types)}")
        s.sendall(b"\x02")
        s.sendall(vnc_des(password.encode(), recv_exact(s, 16)))
    elif 1 in types:
        s.sendall(b"\x01")
    else:
        raise SystemExit(f"vnc: the server wants authentication {list(types)}; give the password")
    (result,) = struct.unpack(">I", recv_exact(s, 4))
    if result != 0:
        raise SystemExit("vnc: authentication failed")
    s.sendall(b"\x01")  # ClientInit: shared
    w, h = struct.unpack(">HH", recv_exact(s, 4))
    recv_exact(s, 16)  # the server's pixel format: replaced below
    (ln,) = struct.unpack(">I", recv_exact(s, 4))
    recv_exact(s, ln)
    return s, w, h


def vnc_click(target, x, y, password=None):
    """A left click at (x, y), as the gateway forwards a browser's: move, press, release."""
    s, _, _ = vnc_connect(target, password)
    # QEMU picks absolute pointer mode (the tablet) when a client sets its encodings, as every
    # viewer does; before that it turns positions into relative PS/2 moves.
    s.sendall(struct.pack(">BxHi", 2, 1, 0))
    for mask in (0, 1, 0):
        s.sendall(struct.pack(">BBHH", 5, mask, x, y))
    # An answer to a framebuffer request means the server has read the events before it.
    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
    recv_exact(s, 1)
    s.close()


def vnc_key(target, keysym, password=None):
    """One key pressed and released (an X keysym, e.g. 0xff1b Escape)."""
    s, _, _ = vnc_connect(target, password)
    s.sendall(struct.pack(">BxHi", 2, 1, 0))
    for down in (1, 0):
        s.sendall(struct.pack(">BBxxI", 4, down, keysym))
    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
    recv_exact(s, 1)
    s.close()


def vnc_frame(target, password=None):
    s, w, h = vnc_connect(target, password)
    # SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits each, r<<16 g<<8 b.
    s.sendall(struct.pack(">BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    s.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw only
    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))  # a full, non-incremental update
    fb = bytearray(w * h * 3)
    covered = 0
    while covered < w * h:
        msg = recv_exact(s, 1)[0]
        if msg == 2:  # Bell
            continue
        if msg == 3:  # ServerCutText (QEMU sends none without a guest clipboard agent)
            recv_exact(s, 3)
            (ln,) = struct.unpack(">I", recv_exact(s, 4))
            recv_exact(s, ln)
            continue
        if msg != 0:
            raise SystemExit(f"vnc: unexpected server message {msg}")
        recv_exact(s, 1)
        (nrects,) = struct.unpack(">H", recv_exact(s, 2))
        for _ in range(nrects):
            x, y, rw, rh, enc = struct.unpack(">HHHHi", recv_exact(s, 12))
            if enc != 0:
                raise SystemExit(f"vnc: unexpected encoding {enc}")
            px = recv_exact(s, rw * rh * 4)
            for row in range(rh):
                line = px[4 * rw * row:4 * rw * (row + 1)]
                rgb = bytearray(3 * rw)
                rgb[0::3], rgb[1::3], rgb[2::3] = line[2::4], line[1::4], line[0::4]
                o = 3 * ((y + row) * w + x)
                fb[o:o + 3 * rw] = rgb
            covered += rw * rh
    s.close()
    return w, h, bytes(fb)


def main(argv):
    if len(argv) >= 4 and argv[1] == "qmp-dump":
        q = Qmp(argv[2])
        fd, ppm = tempfile.mkstemp(suffix=".ppm")
        os.close(fd)
        try:
            q.cmd("screendump", filename=ppm)
            w, h, rgb = read_ppm(ppm)
        finally:
            os.unlink(ppm)
    elif len(argv) >= 4 and argv[1] == "vnc":
        w, h, rgb = vnc_frame(argv[2], argv[4] if len(argv) > 4 else None)
    elif len(argv) >= 5 and argv[1] == "vnc-click":
        vnc_click(argv[2], int(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else None)
        return
    elif len(argv) >= 4 and argv[1] == "vnc-key":
        vnc_key(argv[2], int(argv[3], 0), argv[4] if len(argv) > 4 else None)
        return
    elif len(argv) == 4 and argv[1] == "passwd-file":
        with open(argv[3], "wb") as f:
            f.write(vnc_des(PASSWORD_FILE_KEY, argv[2].encode()[:8].ljust(8, b"\0")))
        return
    elif len(argv) == 4 and argv[1] == "qmp":
        cmd = json.loads(argv[3])
        print(json.dumps(Qmp(argv[2]).cmd(cmd.pop("execute"), **cmd.get("arguments", {}))))
        return
    else:
        raise SystemExit(__doc__)
    write_png(argv[3], w, h, rgb)
    print(json.dumps(stats(w, h, rgb)))


if __name__ == "__main__":
    main(sys.argv)
