#!/usr/bin/env python3
"""The receiving end of sd_notify, as systemd has it: a datagram socket
bound at the address given (a path, or @name in the abstract namespace),
with SO_PASSCRED so that each message carries its sender's pid. Prints
"PID MESSAGE" per datagram on one line (the message's newlines as "|"),
until stdin closes or 60 s pass. A line "pause SECONDS" on stdin stops
reading for that long, as a systemd too busy to read would."""
import array, os, select, socket, struct, sys, time

address = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
sock.bind("\0" + address[1:] if address.startswith("@") else address)
print("listening", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    ready, _, _ = select.select([sock, sys.stdin], [], [], 1)
    if sys.stdin in ready:
        line = os.read(sys.stdin.fileno(), 1024)
        if not line:
            break
        if line.startswith(b"pause "):
            time.sleep(float(line.split()[1]))
            continue
    if sock in ready:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", value[:12])[0]
        print(pid, data.decode().rstrip("\n").replace("\n", "|"), flush=True)
