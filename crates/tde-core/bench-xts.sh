#!/usr/bin/env bash
# Compares our AES-256-XTS page cipher with OpenSSL's own speed test.
#
# Why this exists: the page cipher is chosen by benchmark (docs/benchmarks.md), and the
# target is at least 0.9x the throughput of `openssl speed -evp aes-256-xts -bytes 8192`.
# This runs that command and `cargo bench -p tde-core --bench page_cipher`, then prints
# microseconds per 8 KiB page for each and the ratio (our throughput / OpenSSL's).
#
# Usage: crates/tde-core/bench-xts.sh [extra criterion args]
# Honours CARGO_TARGET_DIR and CARGO_BUILD_JOBS. The numbers are noisy on a shared
# machine: run it more than once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

echo "== openssl speed -evp aes-256-xts -bytes 8192 -seconds 3" >&2
speed_out="$(openssl speed -evp aes-256-xts -bytes 8192 -seconds 3 2>/dev/null)"
# Last line: "AES-256-XTS    5848354.71k" (thousands of bytes per second).
openssl_kbps="$(printf '%s\n' "$speed_out" | awk '/^AES-256-XTS/ { v=$NF } END { sub(/k$/, "", v); print v }')"
if [ -z "$openssl_kbps" ]; then
    echo "could not parse openssl speed output:" >&2
    printf '%s\n' "$speed_out" >&2
    exit 1
fi

echo "== cargo bench -p tde-core --bench page_cipher" >&2
cargo bench -p tde-core --bench page_cipher -- "$@" >&2

target_dir="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

python3 - "$target_dir/criterion" "$openssl_kbps" <<'EOF'
import json, os, sys

crit, kbps = sys.argv[1], float(sys.argv[2])
openssl_us = 8192 / (kbps * 1000) * 1e6

rows = [
    ("xts_8192_encrypt/ours", "ours: PageCipher::encrypt, 8192 B"),
    ("xts_8192_decrypt/ours", "ours: PageCipher::decrypt, 8192 B"),
    ("page/encrypt_page", "ours: encrypt_page (8176 B + header copy)"),
    ("page/decrypt_page", "ours: decrypt_page (8176 B in place)"),
    ("xts_8192_encrypt/aes_pipelined", "candidate: pipelined `aes` crate, encrypt"),
    ("xts_8192_decrypt/aes_pipelined", "candidate: pipelined `aes` crate, decrypt"),
    ("xts_8192_encrypt/xts_mode", "reference: xts-mode crate, encrypt"),
    ("xts_8192_decrypt/xts_mode", "reference: xts-mode crate, decrypt"),
]

print()
print(f"{'implementation':<46} {'us/page':>9} {'vs OpenSSL':>11}")
print(f"{'OpenSSL CLI: openssl speed -evp aes-256-xts':<46} {openssl_us:>9.3f} {1.0:>10.2f}x")
for key, label in rows:
    path = os.path.join(crit, key, "new", "estimates.json")
    try:
        with open(path) as f:
            ns = json.load(f)["mean"]["point_estimate"]
    except OSError:
        print(f"{label:<46} {'(missing)':>9}")
        continue
    us = ns / 1000
    print(f"{label:<46} {us:>9.3f} {openssl_us / us:>10.2f}x")
print()
print("vs OpenSSL = our throughput / OpenSSL CLI throughput (higher is better; target >= 0.9)")
EOF
