#!/usr/bin/env bash
# make test: every test but the image's run with Label Studio (docker_ls), as two pytest chains at once.
#
# The image tests (tests/test_docker.py) spend most of their time on downloads and image layers, not on the CPU,
# and the tests against a real Label Studio or in Chromium much of theirs in one Python thread (Django, the
# browser) or waiting on another process; the rest of the suite mostly in torch, on both cores. So the image tests,
# then the Label Studio and browser tests, run beside the rest: a first run on a fresh machine takes minutes less.
# The Label Studio virtualenv is built in the background from the start
# (label_studio_harness.ensure_label_studio: a file lock, so the tests that need it wait for it or build it).
# The side chain's reports are printed after the main one; the exit status is the first failure's.
#
#   tests/run_suite.sh BIN    (BIN: the virtualenv's bin directory)
set -uo pipefail
bin=$1
logs=.test-logs
mkdir -p "$logs"
# Job control: each job in a process group of its own, whose SIGINT isn't ignored as a background job's would be,
# so that an interrupted suite interrupts the side chain too (pytest then tears its fixtures down: the containers,
# dockerd and Label Studio it started stop).
set -m
"$bin/python" -c 'import sys; sys.path.insert(0, "tests"); import label_studio_harness as h; h.ensure_label_studio()' \
    > "$logs/label-studio-prefetch.log" 2>&1 &
prefetch=$!
(
    "$bin/python" -m pytest -p no:cacheprovider -m "not docker_ls" tests/test_docker.py > "$logs/docker.log" 2>&1
    docker=$?
    [ "$docker" -eq 2 ] && exit 2  # interrupted
    "$bin/python" -m pytest -p no:cacheprovider -m "(label_studio or browser) and not docker and not docker_ls" \
        --junitxml="$logs/label-studio.xml" > "$logs/label-studio.log" 2>&1
    ls=$?
    [ "$docker" -ne 0 ] && exit "$docker"
    exit "$ls"
) &
side=$!
trap 'kill -INT -- -$side -$prefetch 2>/dev/null' INT TERM
echo "run_suite: the image tests, then the Label Studio and browser tests, run alongside (process group $side);"
echo "           their reports come last, live in $logs/docker.log and $logs/label-studio.log"
"$bin/python" -m pytest -m "not docker and not docker_ls and not label_studio and not browser" \
    --junitxml="$logs/main.xml"  # every test's time, for the slow ones
main=$?
# pytest's 2: interrupted (Ctrl-C reaches the foreground run only).
[ "$main" -eq 2 ] && kill -INT -- -$side -$prefetch 2>/dev/null
wait $prefetch
wait $side
side_status=$?
for part in "the image tests (tests/test_docker.py):docker" "Label Studio and the browser:label-studio"; do
    echo
    echo "======================== ${part%:*} ========================"
    cat "$logs/${part##*:}.log" 2>/dev/null
done
trap - INT TERM
[ "$main" -ne 0 ] && exit "$main"
exit "$side_status"
