#!/usr/bin/env bash
# On the GPU machine: move whatever this call carried in .ship/ to /root/ship, out of the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /root/ship
if [ -d .ship ]; then
    for item in .ship/*; do [ -e "$item" ] && cp -r "$item" /root/ship/ && rm -rf "$item"; done
fi
ls /root/ship
