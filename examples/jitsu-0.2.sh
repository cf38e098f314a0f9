#!/bin/sh
# The command lines of Jitsu 0.2's README (mirage/jitsu README.md, the same in 0.2.0, 0.2.1
# and 0.3.0) and of its `--help` EXAMPLES, for jitsu-dns: verbatim but for the program's
# name (`./jitsu` and `jitsu` are "$jitsu") and `sudo` (left out when already root).
#
#   examples/jitsu-0.2.sh N                             runs example N (1 to 6)
#   JITSU="jitsu-dns --check" examples/jitsu-0.2.sh N   prints what it means, runs nothing
#
# Relative paths (kernel=mirage-www.xen, disk=images/data.iso@xvdb) are read from the
# working directory, as Jitsu read them: run it from the directory that holds them.
# What each one means here, and where it differs from Jitsu, is in jitsu-dns/README.md
# ("Moving from Jitsu 0.2"); tests/tests/jitsu_02.rs checks it.
set -e
jitsu=${JITSU:-jitsu-dns}
if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi

case "$1" in
1)
# README "Running": libvirt's Xen driver; the domain mirage-www is defined in libvirt.
$sudo $jitsu -c xen:/// \
dns=www.openmirage.org,\
ip=192.168.0.22,\
name=mirage-www
;;
2)
# README "libxl backend": a PV domain from ./mirage-www.xen, 64000 KiB ("64MB"), on br0.
$sudo $jitsu -x libxl \
dns=www.example.org,\
ip=10.0.0.1,\
kernel=mirage-www.xen,\
memory=64000,\
name=www,\
nic=br0
;;
3)
# README "Rumprun unikernels": nginx with two raw read-write disks as xvda and xvdb, and
# rumprun's JSON configuration (the trailing space is the README's).
$jitsu -x libxl dns=www.example.org,\
memory=64000,\
ip=10.0.0.1,\
name=rumprun,\
kernel=nginx.bin,\
disk=images/stubetc.iso@xvda,\
disk=images/data.iso@xvdb,\
nic=br0,\
rumprun_config=tmp/json.cfg 
;;
4)
# README "VirtualBox": the VM Ubuntu, reached through port forwarding on 127.0.0.1,
# suspended when idle; options after the VM, as cmdliner allowed.
$sudo $jitsu dns=www.example.com,ip=127.0.0.1,name=Ubuntu -m suspend -c vbox:///session
;;
5)
# `jitsu --help` EXAMPLES, the second: VirtualBox, TTL 60 (suspended after 120 s idle).
$jitsu -c vbox:///session -m suspend dns=home.local,ip=192.168.0.1,name=ubuntu -t 60
;;
6)
# `jitsu --help` EXAMPLES, the first: it has no name= (vm= is read by nothing), so Jitsu
# refused it ("Required key not found: name"); jitsu-dns refuses it too.
$jitsu -c xen:/// -f 8.8.8.8 dns=mirage.io,ip=10.0.0.1,vm=mirage-www
;;
*)
echo "usage: $0 1|2|3|4|5|6 (JITSU=\"jitsu-dns --check\" to only check)" >&2
exit 64
;;
esac
