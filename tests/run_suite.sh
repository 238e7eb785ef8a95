#!/usr/bin/env bash
# make test: every test but the image's run with Label Studio (docker_ls), as two pytest runs at once.
#
# The image tests (tests/test_docker.py) spend most of their time on downloads and image layers, not on the CPU,
# and the rest of the suite mostly on the CPU: side by side, a first run on a fresh machine takes minutes less.
# The Label Studio virtualenv for the end-to-end tests is built in the background meanwhile
# (label_studio_harness.ensure_label_studio: a file lock, so the tests that need it wait for it or build it).
# The image tests' report is printed after the main one; the exit status is the worse of the two.
#
#   tests/run_suite.sh BIN    (BIN: the virtualenv's bin directory)
set -uo pipefail
bin=$1
logs=.test-logs
mkdir -p "$logs"
# Job control: each run in a process group of its own, whose SIGINT isn't ignored as a background job's would be,
# so that an interrupted suite interrupts the image tests too (pytest then tears its fixtures down: the containers
# and the dockerd it started stop).
set -m
"$bin/python" -c 'import sys; sys.path.insert(0, "tests"); import label_studio_harness as h; h.ensure_label_studio()' \
    > "$logs/label-studio-prefetch.log" 2>&1 &
prefetch=$!
"$bin/python" -m pytest -p no:cacheprovider -m "not docker_ls" tests/test_docker.py > "$logs/docker.log" 2>&1 &
docker=$!
trap 'kill -INT $docker $prefetch 2>/dev/null' INT TERM
echo "run_suite: the image tests run alongside (PID $docker); their report comes last, live in $logs/docker.log"
"$bin/python" -m pytest -m "not docker and not docker_ls" --junitxml="$logs/main.xml"  # every test's time, for the slow ones
main=$?
# pytest's 2: interrupted (Ctrl-C reaches the foreground run only).
[ "$main" -eq 2 ] && kill -INT $docker $prefetch 2>/dev/null
wait $prefetch
wait $docker
docker_status=$?
echo
echo "======================== the image tests (tests/test_docker.py) ========================"
cat "$logs/docker.log"
trap - INT TERM
[ "$main" -ne 0 ] && exit "$main"
exit "$docker_status"
