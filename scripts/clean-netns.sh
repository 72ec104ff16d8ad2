#!/usr/bin/env bash
# Removes what an interrupted test or demo run left behind (a run that ends normally, even with
# failures, cleans up after itself): the network namespaces named with the suite's prefixes, and
# the processes still running inside them. Do not run it while a suite is running.
set -euo pipefail

# Every namespace the suite, the demo and the package tests create starts with "ml", a short tag and a dash.
prefixes='^ml[a-z]{1,8}-'

ip netns list | awk '{print $1}' | grep -E "$prefixes" | while read -r ns; do
	pids=$(ip netns pids "$ns" || true)
	if [ -n "$pids" ]; then
		echo "clean-netns: killing processes $pids in $ns"
		# shellcheck disable=SC2086 # one pid per word
		kill -KILL $pids 2>/dev/null || true
	fi
	echo "clean-netns: deleting $ns"
	ip netns del "$ns"
done
tmp=${TMPDIR:-/tmp}
rm -rf "$tmp"/meshless-conformance-* "$tmp"/meshless-bin-* "$tmp"/meshless-demo-bin-* "$tmp"/meshless-bench-bin-* "$tmp"/mlspire-*
