#!/usr/bin/env bash
# arm64_device.sh ROOT — an emulated ARM64 (aarch64) Python 3.11 with onnxruntime + numpy,
# usable as `onnxlr validate --device ROOT/bin/python3`.
#
# Everything comes from package registries: Debian's apt repositories (QEMU's static aarch64 user-mode
# emulator and the arm64 .debs of python3.11 and the shared libraries it loads, unpacked with
# `dpkg-deb -x`) and PyPI (the manylinux aarch64 wheels of onnxruntime and numpy, unpacked beside them).
# No chroot, no binfmt_misc, no change to the host: the package lists live in a private apt state
# under $CACHE/apt (APT_CONFIG), and qemu-aarch64-static is taken out of the qemu-user-static .deb into
# ROOT/qemu/ rather than installed (the package installs all 30 targets, 379 MB). The host's apt is
# used only when the host lacks pip (python3-pip).
#
# Idempotent: each step leaves a stamp recording what it built; a re-run with the same settings only
# rewrites the wrappers and re-checks the imports (a few seconds). ROOT can be moved afterwards.
#
# Settings (environment):
#   ORT_VERSION    onnxruntime version (default 1.32.0, as in onnxlr's .venv)   NUMPY_VERSION (default 2.4.6)
#   MATCH_PYTHON   a Python whose installed onnxruntime/numpy versions to copy instead (e.g. .venv/bin/python)
#   DEBIAN_SUITE   Debian release the arm64 root and QEMU come from (default bookworm: python3.11,
#                  QEMU 7.2). It need not be the host's release.
#   DEBIAN_MIRROR  default http://deb.debian.org/debian   DEBIAN_SECURITY default http://deb.debian.org/debian-security
#   QEMU           an aarch64 user-mode emulator to use instead of the suite's qemu-aarch64-static
#   CACHE          downloads and the private apt state (default ROOT/.build; can be deleted afterwards,
#                  a re-run then downloads again)
#   PIP            how to run pip on the host (default: python3 -m pip)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 ROOT" >&2
    exit 2
fi
mkdir -p "$1"
ROOT=$(cd "$1" && pwd)
CACHE=${CACHE:-$ROOT/.build}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
KEYRING=${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
HOST_ARCH=$(dpkg --print-architecture)
PY=python3.11
START=$(date +%s)

SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
log() { printf '[%3ss] %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }

HOST_APT_UPDATED=
host_apt_install() {   # only for pip
    if [ -z "$HOST_APT_UPDATED" ]; then
        $SUDO apt-get update -q >/dev/null
        HOST_APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# --- 1. .debs from a private apt state: arm64 for ROOT, the host's architecture for QEMU --------------
# The closure of what python3.11, its lib-dynload extension modules and the two wheels load (DT_NEEDED),
# not apt's dependency closure: apt would add dpkg, tar, selinux, pcre2, zstd, acl, media-types… (pulled
# in through Pre-Depends, never loaded). The runner needs only the first line (+ libffi8 for ctypes);
# the rest makes every stdlib extension module importable.
DEBS=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libexpat1
    libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0 libdb5.3
    libncursesw6 libtinfo6 libreadline8
    libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1
)
NEED_QEMU=
[ -n "${QEMU:-}" ] || NEED_QEMU="qemu-user-static:$HOST_ARCH"
DEB_STAMP="$CACHE/debs.stamp"
DEB_WANT="$DEBIAN_SUITE ${DEBS[*]} ${NEED_QEMU}"
if [ "$(cat "$DEB_STAMP" 2>/dev/null)" != "$DEB_WANT" ]; then
    log "fetching .debs from $DEBIAN_SUITE (private apt state in $CACHE/apt)"
    A="$CACHE/apt"
    rm -rf "$A" "$CACHE/debs"
    mkdir -p "$A/etc/apt.conf.d" "$A/etc/sources.list.d" "$A/etc/preferences.d" "$A/etc/trusted.gpg.d" \
             "$A/state/lists/partial" "$A/cache/archives/partial" "$CACHE/debs"
    touch "$A/state/status"   # an empty dpkg status: nothing is "installed" for this apt
    for uri_suite in "$DEBIAN_MIRROR $DEBIAN_SUITE" "$DEBIAN_MIRROR $DEBIAN_SUITE-updates" \
                     "$DEBIAN_SECURITY $DEBIAN_SUITE-security"; do
        echo "deb [arch=arm64,$HOST_ARCH signed-by=$KEYRING] $uri_suite main"
    done > "$A/etc/sources.list"
    # APT_CONFIG is read before /etc/apt/apt.conf.d, so pointing Dir::Etc::Parts at an empty folder
    # keeps the host's settings and hooks (APT::Update::Post-Invoke…) out; a proxy the host uses is kept.
    {
        echo "APT::Architecture \"arm64\";"
        echo "APT::Architectures { \"arm64\"; \"$HOST_ARCH\"; };"
        echo "Dir::Etc \"$A/etc\";"
        echo "Dir::Etc::main \"$A/etc/apt.conf\";"
        echo "Dir::Etc::Parts \"$A/etc/apt.conf.d\";"
        echo "Dir::Etc::SourceList \"$A/etc/sources.list\";"
        echo "Dir::Etc::SourceParts \"$A/etc/sources.list.d\";"
        echo "Dir::Etc::PreferencesParts \"$A/etc/preferences.d\";"
        echo "Dir::Etc::TrustedParts \"$A/etc/trusted.gpg.d\";"
        echo "Dir::State \"$A/state\";"
        echo "Dir::State::status \"$A/state/status\";"
        echo "Dir::Cache \"$A/cache\";"
        echo "Dir::Cache::pkgcache \"\";"      # no 35 MB binary caches of the lists
        echo "Dir::Cache::srcpkgcache \"\";"
        echo "Acquire::Languages \"none\";"
        # as root, apt drops to _apt to download, which cannot write into a root-owned folder
        echo "APT::Sandbox::User \"$(id -un)\";"
        apt-config dump 2>/dev/null | grep -iE '^Acquire::(http|https|ftp)::Proxy' || true
    } > "$A/apt.conf"
    export APT_CONFIG="$A/apt.conf"
    apt-get update -q >/dev/null
    (cd "$CACHE/debs" && apt-get download -q "${DEBS[@]/%/:arm64}" $NEED_QEMU >/dev/null)
    unset APT_CONFIG
    rm -rf "$A/state/lists"   # 50 MB of package lists, needed again only when the list above changes
    log "unpacking ${#DEBS[@]} arm64 .debs into $ROOT"
    rm -rf "$ROOT/usr" "$ROOT/lib" "$ROOT/etc" "$ROOT/var" "$ROOT/sbin" "$ROOT/qemu"
    for pkg in "${DEBS[@]}"; do
        dpkg-deb -x "$CACHE"/debs/"${pkg}"_*_arm64.deb "$ROOT"
    done
    # what python needs stays: documentation, man pages, lintian data and translations go
    rm -rf "$ROOT/usr/share/doc" "$ROOT/usr/share/man" "$ROOT/usr/share/lintian" "$ROOT/usr/share/locale"
    if [ -n "$NEED_QEMU" ]; then
        log "taking qemu-aarch64-static out of qemu-user-static"
        mkdir -p "$ROOT/qemu"
        dpkg-deb --fsys-tarfile "$CACHE"/debs/qemu-user-static_*_"$HOST_ARCH".deb \
            | tar -x -O ./usr/bin/qemu-aarch64-static > "$ROOT/qemu/qemu-aarch64-static"
        chmod +x "$ROOT/qemu/qemu-aarch64-static"
        rm -f "$CACHE"/debs/qemu-user-static_*.deb   # 63 MB, of which 13 MB were kept
    fi
    echo "$DEB_WANT" > "$DEB_STAMP"
fi
if [ -n "${QEMU:-}" ]; then
    QEMU_CMD=$(command -v "$QEMU")
else
    QEMU_CMD='$R/qemu/qemu-aarch64-static'   # expanded by the wrapper: ROOT stays relocatable
fi
log "qemu: $("$(R=$ROOT; eval echo "$QEMU_CMD")" --version | head -1)"

# qemu -L ROOT makes the guest see ROOT/x for any path /x that exists there. glibc's loader would
# otherwise read the host's /etc/ld.so.cache (x86 entries, ignored but needless): an empty cache here
# sends it straight to ROOT's /lib/aarch64-linux-gnu.
: > "$ROOT/etc/ld.so.cache"

# QEMU 7.2 (bookworm) passes the host's /proc/cpuinfo through to an aarch64 guest (it fakes it only for
# a few other targets): onnxruntime's cpuinfo library then parses an x86 /proc/cpuinfo and the import
# dies with SIGSEGV. A plausible aarch64 /proc/cpuinfo under ROOT/proc is what the guest reads instead
# (-L). The ISA features come from AT_HWCAP, which QEMU sets for the emulated CPU (QEMU_CPU), but
# cpuinfo also forces dotprod/fp16/rdm on for MIDRs it knows have them (Cortex-A76, Neoverse N1…): a
# Neoverse-N1 MIDR here makes onnxruntime run SDOT on an emulated Cortex-A72, which dies with SIGILL.
# So the MIDR is a Cortex-A72's (0xd08), which cpuinfo never upgrades: what is used is what QEMU has.
mkdir -p "$ROOT/proc"
ncpu=$(nproc)
: > "$ROOT/proc/cpuinfo"
for ((i = 0; i < ncpu; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$ROOT/proc/cpuinfo"
done

# --- 2. PyPI's aarch64 wheels, unpacked into ROOT/site-packages ---------------------------------------
read -r -a PIPCMD <<< "${PIP:-python3 -m pip}"
if ! "${PIPCMD[@]}" --version >/dev/null 2>&1; then
    log "installing python3-pip (host apt)"
    host_apt_install python3-pip ca-certificates
    PIPCMD=(/usr/bin/python3 -m pip)
fi
HOSTPY=${PIPCMD[0]}
[ "${PIPCMD[1]:-}" = "-m" ] || HOSTPY=python3   # PIP=/path/to/pip: unpack the wheels with python3
if [ -n "${MATCH_PYTHON:-}" ]; then
    ORT_VERSION=${ORT_VERSION:-$("$MATCH_PYTHON" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')}
    NUMPY_VERSION=${NUMPY_VERSION:-$("$MATCH_PYTHON" -c 'import importlib.metadata as m; print(m.version("numpy"))')}
fi
ORT_VERSION=${ORT_VERSION:-1.32.0}
NUMPY_VERSION=${NUMPY_VERSION:-2.4.6}
# onnxruntime >= 1.17 publishes manylinux_2_27/_2_28 aarch64 wheels only: --platform manylinux2014_aarch64
# alone finds nothing newer than 1.16.3. --no-deps: `import onnxruntime` needs numpy only (flatbuffers,
# packaging, protobuf and sympy serve onnxruntime.tools / quantization, which run on the host).
WHEEL_STAMP="$CACHE/wheels.stamp"
WHEEL_WANT="onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION"
if [ "$(cat "$WHEEL_STAMP" 2>/dev/null)" != "$WHEEL_WANT" ] || [ ! -d "$ROOT/site-packages/onnxruntime" ]; then
    log "downloading aarch64 wheels: $WHEEL_WANT"
    rm -rf "$CACHE/wheels"
    mkdir -p "$CACHE/wheels"
    "${PIPCMD[@]}" download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
        -d "$CACHE/wheels" "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
    rm -rf "$ROOT/site-packages"
    mkdir -p "$ROOT/site-packages"
    for whl in "$CACHE"/wheels/*.whl; do
        "$HOSTPY" -m zipfile -e "$whl" "$ROOT/site-packages"
    done
    echo "$WHEEL_WANT" > "$WHEEL_STAMP"
fi

# --- 3. the wrapper onnxlr's --device runs ----------------------------------------------------------
# QEMU_CPU picks the emulated core and so the MLAS kernels onnxruntime takes. Default neoverse-n1
# (NEON + dotprod: Graviton2, Ampere Altra; the ISA of Cortex-A76 phones and the Raspberry Pi 5);
# cortex-a72 = plain NEON (Raspberry Pi 4); max = all QEMU 7.2 has (SVE2, SME, i8mm, bf16). Under SVE
# (max, a64fx) onnxruntime's fp32 convolutions run ~20x slower than under NEON, under max unpredictably
# from one run to the next; under SME (max) its int8 DynamicQuantizeMatMul gives wrong results.
# ONNXLR_EMULATED tells the runner (and whoever reads its output) that its timings are not the device's.
write_wrapper() {   # NAME QEMU-COMMAND EXTRA-ENV EXTRA-QEMU-ARGS
    cat > "$ROOT/bin/$1" <<EOF
#!/bin/sh
# Python 3.11 for aarch64 under QEMU user-mode emulation (built by runtimes/arm64_device.sh).
R=\$(CDPATH= cd -- "\$(dirname -- "\$0")/.." && pwd)
CPU=\${QEMU_CPU:-neoverse-n1}
PYTHONPATH="\$R/site-packages" PYTHONNOUSERSITE=1 ONNXLR_EMULATED="qemu-aarch64 \$CPU" $3\\
    exec "$2" -cpu "\$CPU" $4-L "\$R" "\$R/usr/bin/$PY" "\$@"
EOF
    chmod +x "$ROOT/bin/$1"
}
mkdir -p "$ROOT/bin"
write_wrapper python3 "$QEMU_CMD" "" ""

# --- 4. check ----------------------------------------------------------------------------------------
log "checking: every stdlib extension module, onnxruntime and numpy import under emulation"
"$ROOT/bin/python3" - <<'EOF'
import glob, importlib, os, platform, sys
skip = {"_tkinter"}   # not in python3.11's packages (python3-tk)
failed = []
for so in glob.glob(os.path.join(sys.prefix, "lib", "python3.11", "lib-dynload", "*.so")):
    name = os.path.basename(so).split(".")[0]
    if name not in skip:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {exc}")
import numpy, onnxruntime
assert platform.machine() == "aarch64", platform.machine()
assert not failed, failed
print(f"python {platform.python_version()} {platform.machine()} ({os.environ['ONNXLR_EMULATED']}), numpy "
      f"{numpy.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
EOF
log "done: $ROOT/bin/python3 ($(du -sh --exclude=.build "$ROOT" | cut -f1); downloads kept in $CACHE: $(du -sh "$CACHE" | cut -f1))"
