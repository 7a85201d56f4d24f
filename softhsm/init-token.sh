#!/usr/bin/env bash
# Create a SoftHSM2 token in DIR: DIR/softhsm2.conf, DIR/tokens/, and random PINs in
# DIR/LABEL.user-pin and DIR/LABEL.so-pin (mode 0600). Several tokens may share one DIR.
# Idempotent: an existing token with LABEL is kept as it is.
# The same steps serve `make run` (DIR=var/hsm) and the test suite (a temporary DIR).
#   usage: softhsm/init-token.sh DIR [LABEL]
# Prints the path of the config file; export SOFTHSM2_CONF=that before loading the module.
set -euo pipefail
dir=${1:?usage: init-token.sh DIR [LABEL]}
label=${2:-ecny-dev}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
umask 077
conf="$dir/softhsm2.conf"
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.template" > "$conf"
export SOFTHSM2_CONF="$conf"
# Read the slots whole before searching them: with pipefail, `softhsm2-util … | grep -q` fails when grep
# stops reading first (a long slot list: SIGPIPE), and a second token with the same label was made.
slots=$(softhsm2-util --show-slots 2>/dev/null || true)
if ! grep -q "Label:[[:space:]]*$label[[:space:]]*$" <<<"$slots"; then
  # Fresh random PINs, kept in files (mode 0600) and typed to softhsm2-util on a pseudo-terminal,
  # so that they never appear on a command line.
  head -c 18 /dev/urandom | base64 | tr -d '/+=\n' | head -c 20 > "$dir/$label.user-pin"
  head -c 18 /dev/urandom | base64 | tr -d '/+=\n' | head -c 20 > "$dir/$label.so-pin"
  python3 "$here/init_token.py" "$label" "$dir/$label.so-pin" "$dir/$label.user-pin"
fi
echo "$conf"
