#!/usr/bin/env bash
# The test suite against pyllm built with AddressSanitizer and UndefinedBehaviorSanitizer: every
# out-of-bounds access, use after free or undefined operation in the C++ stops the run with a report.
# Not CI's run (.ci/run): a build of its own (about 10 minutes on 2 cores), then the suite (slower
# than usual under the sanitizers).
#
# Usage: tools/sanitize.sh [pytest arguments]       e.g. tools/sanitize.sh -x -k kernels
# Needs: the developer venv (.venv, with the test extra installed) whose packages it borrows; g++.
# Env: SANITIZE (default address,undefined), PYLLM_SANITIZE_VENV (default .venv-sanitize).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
sanitizers=${SANITIZE:-address,undefined}
venv=${PYLLM_SANITIZE_VENV:-$repo/.venv-sanitize}
dev_site=$("$repo/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# A venv of its own for the sanitized build; the developer venv's packages (numpy, pytest, torch,
# transformers, the build backend) reached through a .pth line, so nothing is installed twice. Its
# editable pyllm is not: a .pth line adds a folder, it does not run that folder's .pth hooks.
if [[ ! -x $venv/bin/python ]]; then
  "$repo/.venv/bin/python" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$dev_site" > "$site/pyllm-dev-packages.pth"

echo "== building pyllm with -fsanitize=$sanitizers"
"$venv/bin/python" -m pip install --no-deps --no-build-isolation --force-reinstall --quiet \
  -Ccmake.define.PYLLM_SANITIZE="$sanitizers" -Cbuild-dir="build/sanitize" .

# Python itself is not instrumented: the runtimes are preloaded. Leaks are not reported (CPython
# keeps objects until exit by design); any other report ends the run.
preload=""
[[ $sanitizers == *address* ]] && preload="$(g++ -print-file-name=libasan.so)"
[[ $sanitizers == *undefined* ]] && preload="$preload:$(g++ -print-file-name=libubsan.so)"
export LD_PRELOAD=${preload#:}
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export CI=1 PYLLM_SANITIZED=1   # the tests of memory use skip: the shadow memory counts too
export PYTHONSAFEPATH=1         # no python (the tests' subprocesses too) puts the source tree first on sys.path

echo "== the test suite under the sanitizers"
# PYTHONSAFEPATH: the current folder (the source tree, whose pyllm/ has no compiled module) stays off sys.path.
"$venv/bin/python" -c 'import pyllm, pyllm._C; print("pyllm from", pyllm.__file__)'
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
