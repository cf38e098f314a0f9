#!/usr/bin/python3
"""bench/qemu-start's measurements (see bench/qemu-start): QEMU's own start, option by option."""
import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off"
CMDLINE = "ip=10.0.0.5/24 gw=10.0.0.1"
MAC = "02:00:00:00:00:05"


def backend_line(kernel, run, acpi, sandbox=True, tb=None, mem="131072k"):
    """The QEMU backend's command line (launch.rs), the tap opened by QEMU by name."""
    machine = MACHINE if acpi else MACHINE + ",acpi=off"
    a = ["qemu-system-x86_64", "-name", "guest=uk,debug-threads=off", "-M", machine,
         "-accel", "tcg" if tb is None else f"tcg,tb-size={tb}", "-m", mem,
         "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if sandbox:
        a += ["-sandbox", SANDBOX]
    a += ["-netdev", "tap,id=net0,ifname=jqb0,script=no,downscript=no",
          "-device", f"virtio-net-device,netdev=net0,mac={MAC}",
          "-chardev", f"socket,id=qmp,path={run}/qmp,server=on,wait=off",
          "-mon", "chardev=qmp,mode=control", "-serial", "stdio",
          "-pidfile", f"{run}/pid", "-kernel", kernel, "-append", CMDLINE]
    return a


def variants(kernel, run):
    return {
        "the backend's line (acpi=off)": backend_line(kernel, run, acpi=False),
        "with ACPI (stop_mode=shutdown)": backend_line(kernel, run, acpi=True),
        "without the seccomp sandbox": backend_line(kernel, run, acpi=False, sandbox=False),
        "tb-size=64 (MiB; default 1 GiB)": backend_line(kernel, run, acpi=False, tb=64),
        "-m 32M (default 128M)": backend_line(kernel, run, acpi=False, mem="32M"),
    }


def until_listening(p):
    """Reads the console until the guest's listening line; returns it (b'' if QEMU ended)."""
    while True:
        line = p.stdout.readline()
        if not line or b"listening" in line:
            return line


def firmware_ms(line):
    words = line.decode(errors="replace").split("(firmware ", 1)
    try:
        return float(words[1].split()[0])
    except (IndexError, ValueError):
        return float("nan")


def end(p):
    """Kills QEMU and returns its CPU time (user + system) in ms."""
    p.kill()
    _, _, ru = os.wait4(p.pid, 0)
    return (ru.ru_utime + ru.ru_stime) * 1000


def cold(argv):
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    line = until_listening(p)
    wall = (time.monotonic() - t0) * 1000
    cpu = end(p)
    if not line:
        raise SystemExit(f"QEMU ended before the guest listened: {p.stderr.read()[:400]!r}")
    return wall, cpu, firmware_ms(line)


def version():
    t0 = time.monotonic()
    p = subprocess.Popen(["qemu-system-x86_64", "-version"], stdout=subprocess.DEVNULL)
    _, _, ru = os.wait4(p.pid, 0)
    return (time.monotonic() - t0) * 1000, (ru.ru_utime + ru.ru_stime) * 1000, float("nan")


def qmp(path):
    deadline = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"no QMP socket at {path}")
            time.sleep(0.001)
    s.settimeout(10)
    f = s.makefile("rwb")
    f.readline()

    def execute(command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        f.write((json.dumps(msg) + "\n").encode())
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise SystemExit(f"{command}: {reply['error']}")
            return reply

    execute("qmp_capabilities")
    return s, execute


def spare(kernel, run):
    """A QEMU started ahead with nothing of the VM, given it over QMP."""
    path = f"{run}/spare.qmp"
    if os.path.exists(path):
        os.unlink(path)
    argv = ["qemu-system-x86_64", "--preconfig", "-M", MACHINE + ",acpi=off", "-accel", "tcg",
            "-m", "131072k", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-sandbox", SANDBOX, "-device", "virtio-net-device,netdev=net0",
            "-chardev", f"socket,id=qmp,path={path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control", "-serial", "stdio"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    s, execute = qmp(path)
    # Started ahead: let it settle, as a spare would have.
    time.sleep(0.2)
    t0 = time.monotonic()
    execute("qom-set", path="/machine", property="kernel", value=kernel)
    execute("qom-set", path="/machine", property="append", value=f"{CMDLINE} mac={MAC}")
    execute("netdev_add", type="tap", id="net0", ifname="jqb1", script="no", downscript="no")
    execute("x-exit-preconfig")
    line = until_listening(p)
    wall = (time.monotonic() - t0) * 1000
    s.close()
    end(p)
    if not line:
        raise SystemExit(f"the spare QEMU ended before the guest listened: {p.stderr.read()[:400]!r}")
    return wall, float("nan"), firmware_ms(line)


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="qemu-start.") as run:
        vs = variants(a.kernel, run)
        rows = {name: [] for name in vs}
        rows["-version alone"] = []
        rows["spare: QMP commands -> listening"] = []
        for i in range(a.runs):
            for name, argv in vs.items():
                rows[name].append(cold(argv))
            rows["-version alone"].append(version())
            rows["spare: QMP commands -> listening"].append(spare(a.kernel, run))
            print(f"  {i + 1} of {a.runs} rounds", flush=True)
    print(f"\nqemu-system-x86_64 under TCG, {a.runs} runs each, interleaved; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'exec -> the unikernel listening':40s} {'wall p50':>9s} {'p95':>7s} "
          f"{'CPU p50':>8s} {'firmware':>9s}")
    for name, r in rows.items():
        walls = [w for w, _, _ in r]
        cpus = [c for _, c, _ in r]
        fws = [f for _, _, f in r]
        cpu = statistics.median(cpus)
        fw = statistics.median(fws)
        print(f"{name:40s} {statistics.median(walls):9.1f} {p95(walls):7.1f} "
              f"{'-' if cpu != cpu else f'{cpu:.1f}':>8s} {'-' if fw != fw else f'{fw:.1f}':>9s}")
    print("ms. CPU: QEMU's user + system time until killed at the listening line.")


if __name__ == "__main__":
    main()
