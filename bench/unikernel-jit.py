#!/usr/bin/python3
"""bench/unikernel-jit's measurement (see bench/unikernel-jit): blocks QEMU translates on the
unikernel's first and second connections, this tree's kernel against a baseline's."""
import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import tempfile
import time

MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off"
IP, GW, MAC = "10.77.1.5", "10.77.0.1", "02:77:00:01:00:05"


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def topology():
    """This namespace: IPv6 off, a bridge with the gateway's address, the guest's tap."""
    sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
    sh("ip link set lo up && ip link add br0 type bridge && ip link set br0 multicast off "
       f"&& ip addr add {GW}/16 dev br0 && ip link set br0 up "
       "&& ip tuntap add dev jqj0 mode tap && ip link set jqj0 master br0 && ip link set jqj0 up")


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.call("qmp_capabilities")

    def call(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                if "error" in r:
                    raise RuntimeError(f"{cmd}: {r['error']}")
                return r["return"]

    def tb_count(self):
        text = self.call("human-monitor-command", **{"command-line": "info jit"})
        for line in text.splitlines():
            if line.startswith("TB count"):
                return int(line.split()[2])
        raise RuntimeError(f"no TB count in info jit:\n{text}")


def fetch():
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "10",
                        "-w", "%{http_code}", f"http://{IP}/"], capture_output=True, text=True)
    if r.stdout != "200":
        raise RuntimeError(f"curl got {r.stdout!r}: {r.stderr}")


def one_boot(kernel, run):
    qmp_path = f"{run}/qmp"
    p = subprocess.Popen(
        ["qemu-system-x86_64", "-M", MACHINE, "-accel", "tcg", "-m", "131072k",
         "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
         "-netdev", "tap,id=net0,ifname=jqj0,script=no,downscript=no",
         "-device", f"virtio-net-device,netdev=net0,mac={MAC}",
         "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
         "-mon", "chardev=qmp,mode=control", "-serial", "stdio",
         "-kernel", kernel, "-append", f"ip={IP}/16 gw={GW}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        qmp = Qmp(qmp_path, deadline)
        # The listening line comes at most 20 ms after the guest listens.
        console = b""

        def listening():
            """The listening line, once whole."""
            return next((l for l in console.split(b"\n")[:-1] if b"listening" in l), None)

        while listening() is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                raise RuntimeError(f"no listening line in 30 s:\n{console.decode(errors='replace')}")
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"QEMU ended first:\n{console.decode(errors='replace')}")
            console += chunk
        line = listening()
        sh(f"ip neigh replace {IP} lladdr {MAC} dev br0 nud stale")
        counts = [qmp.tb_count()]
        for _ in range(2):
            fetch()
            counts.append(qmp.tb_count())
        return counts[1] - counts[0], counts[2] - counts[1], line.decode(errors="replace").strip()
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--baseline", help="the unikernel built from the baseline commit")
    ap.add_argument("--baseline-name", default="baseline")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    topology()
    kernels = [("this tree", a.kernel)]
    if a.baseline:
        kernels.append((a.baseline_name, a.baseline))
    got = {name: ([], []) for name, _ in kernels}
    lines = {}
    with tempfile.TemporaryDirectory() as run:
        for i in range(a.runs):
            # Interleaved, so that the machine's state weighs on both alike.
            for name, kernel in kernels:
                first, second, lines[name] = one_boot(kernel, run)
                got[name][0].append(first)
                got[name][1].append(second)
                print(f"boot {i + 1}, {name}: first connection {first} blocks, second {second}",
                      flush=True)
    for name, _ in kernels:
        print(f"{name}: {lines[name]}")
    print(f"\nblocks of guest code QEMU translated during a connection (median of {a.runs} boots):")
    print(f"  {'kernel':<28} {'first':>6} {'second':>7}")
    med = {}
    for name, _ in kernels:
        firsts, seconds = got[name]
        med[name] = statistics.median(firsts)
        print(f"  {name:<28} {med[name]:>6g} {statistics.median(seconds):>7g}")
    if a.baseline:
        base = med[a.baseline_name]
        print(f"  first connection, this tree / {a.baseline_name}: "
              f"{med['this tree'] / max(base, 1):.2f}x")


if __name__ == "__main__":
    main()
