#!/usr/bin/env bash
# `make demo`: bake the example app, release it, release a change, roll back.
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_HOME="${KILN_HOME:-$PWD/.kiln-demo}"
kiln=".venv/bin/kiln"
step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

# A clean slate each time: stop what an earlier demo left running.
"$kiln" daemon stop --all >/dev/null 2>&1 || true
rm -f "$KILN_HOME"/state.db*  # fresh release history; the image store is kept

step "bake v1 of examples/hello (the first bake builds the Debian base: ~30 s)"
v1=$("$kiln" bake examples/hello --reason "demo: v1")
"$kiln" inspect "$v1"

step "release v1 to staging (blue-green: new instances, health-checked, then one switch)"
"$kiln" release "$v1" --env staging

step "bake v2: the same app with a new greeting (only the app layer is rebuilt)"
v2src=$(mktemp -d)/hello
cp -r examples/hello "$v2src"
sed -i 's/"Hello"/"Howdy"/' "$v2src/hello/__init__.py"
v2=$("$kiln" bake "$v2src" --reason "demo: v2 says howdy")
"$kiln" diff "$v1" "$v2"

step "release v2 as a canary: 20% → 50% → 100%, judged against v1 on live traffic"
# Some traffic for the analysis to judge (bounded: it stops by itself).
( for _ in $(seq 1 3000); do curl -s -o /dev/null http://127.0.0.1:8081/ || true; done ) &
traffic=$!
"$kiln" release "$v2" --env staging --strategy canary --steps 20,50,100 --interval 3s
kill "$traffic" 2>/dev/null || true
curl -s http://127.0.0.1:8081/
"$kiln" status --env staging
"$kiln" history --env staging

step "roll back to v1: an atomic switch, no instance started"
"$kiln" rollback --env staging
curl -s http://127.0.0.1:8081/

step "a rolling release of v2: instances replaced one by one"
"$kiln" release "$v2" --env staging --strategy rolling
curl -s http://127.0.0.1:8081/
"$kiln" status --env staging
"$kiln" history --env staging

step "done"
echo "kiln serves the example at http://127.0.0.1:8081/  (KILN_HOME=$KILN_HOME)"
echo "stop it with: KILN_HOME=$KILN_HOME $kiln daemon stop --all"
