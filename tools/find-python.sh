#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter, or explain and fail.
# Order: $PYTHON (the Makefile's override), python3.12 on PATH, pyenv's 3.12 installs
# (`pyenv prefix 3.12.1`; the pyenv shim answers only with PYENV_VERSION set), then python3.
set -u
want="3.12"
is312() { [ -n "$1" ] && [ -x "$(command -v "$1" 2>/dev/null)" ] &&
  [ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; }

if [ -n "${PYTHON:-}" ]; then
  if is312 "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "find-python: PYTHON=$PYTHON is not a Python $want interpreter" >&2; exit 1
fi
cands=()
if command -v pyenv >/dev/null 2>&1; then
  for v in 3.12.1 $(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.|$)" | sort -rV); do
    p=$(pyenv prefix "$v" 2>/dev/null) && cands+=("$p/bin/python$want")
  done
fi
for p in "$HOME"/.pyenv/versions/${want}*/bin/python$want; do cands+=("$p"); done
cands+=(python$want /usr/local/bin/python$want /usr/bin/python$want python3)
for c in "${cands[@]}"; do
  if is312 "$c"; then command -v "$c"; exit 0; fi
done
echo "find-python: no Python $want found (tried PATH, pyenv, ~/.pyenv). Install it" \
  "(e.g. 'pyenv install $want') or pass PYTHON=/path/to/python$want" >&2
exit 1
